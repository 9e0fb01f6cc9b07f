"""The content-addressed image store: its records, loading, pulling's commit, lookup, removal.

Layout under ``root`` (the daemon passes ``<data-root>/image``)::

    oci-layout, index.json       an OCI image layout (image-spec ``image-layout.md``); index.json is
                                 a view regenerated from repositories.json
    blobs/, layers/, downloads/  the content (engine/images/content.py)
    repositories.json            {"refs": {normalized ref: image id},
                                  "images": {image id: {"manifest": digest, "loaded": time}},
                                  "layers": {diff_id: {"size": bytes}}}
    lock                         flock(2)ed while the store changes

An image's ID is the digest of its config blob, as in Docker. Archives are staged and fully
verified (every blob against its descriptor, every unpacked layer against its diff_id;
engine/images/archive.py) before anything is committed, and a failed load removes whatever it
had added.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from common.jsonstate import CorruptRecord, read_record, set_aside, write_json_atomic
from common.reference import Reference
from common.timefmt import utc_rfc3339
from engine.images.archive import PendingImage, plan_archive, plan_pulled, stage_archive
from engine.images.content import ContentStore, undo
from engine.images.image import Image, ImageConflict, ImageLoadError, ImageNotFound
from engine.images.layers import LayerError
from engine.images.oci import (
    ANNOTATION_REF_NAME,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    OCI_LAYOUT_VERSION,
    as_dict,
    as_list,
    normalized_ref,
    parse_json,
)

# What callers import from here: the store, what it hands out and what it raises.
__all__ = ["Image", "ImageConflict", "ImageLoadError", "ImageNotFound", "ImageStore"]

_FULL_ID_RE = re.compile(r"(?:sha256:)?([a-f0-9]{64})")
_SHORT_ID_RE = re.compile(r"(?:sha256:)?([a-f0-9]{12,63})")


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._content = ContentStore(self.root)
        self._state_path = self.root / "repositories.json"
        self._thread_lock = threading.Lock()
        self._configs: dict[str, dict[str, Any]] = {}
        layout = self.root / "oci-layout"
        if not layout.exists():
            write_json_atomic(layout, {"imageLayoutVersion": OCI_LAYOUT_VERSION})

    # -- locking and state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize changes between threads (the lock) and processes (flock(2) on ``lock``)."""
        with self._thread_lock:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the last descriptor releases the flock

    def _read_state(self) -> dict[str, Any]:
        """repositories.json; one that cannot be read is set aside (logged): the images are
        to be loaded again, the store serves meanwhile."""
        try:
            state = read_record(self._state_path, {}) or {}
            if not isinstance(state, dict) or not all(
                isinstance(state.get(key, {}), dict) for key in ("refs", "images", "layers")
            ):
                raise CorruptRecord("not the image store's state")
        except CorruptRecord as e:
            set_aside(self._state_path, e)
            state = {}
        for key in ("refs", "images", "layers"):
            state.setdefault(key, {})
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self._state_path, state)
        self._write_index(state)

    def _write_index(self, state: dict[str, Any]) -> None:
        """index.json, so that OCI tools can read the store as a layout."""
        manifests = []
        for image_id, record in sorted(state["images"].items()):
            digest = record["manifest"]
            blob = self._content.blob_path(digest)
            base = {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest, "size": blob.stat().st_size}
            refs = sorted(r for r, i in state["refs"].items() if i == image_id)
            for ref in refs:
                manifests.append({**base, "annotations": {ANNOTATION_REF_NAME: ref}})
            if not refs:
                manifests.append(base)
        index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests}
        write_json_atomic(self.root / "index.json", index)

    # -- loading

    def load(self, archive: BinaryIO | Path | str) -> builtins.list[str]:
        """Load a docker-archive or OCI-layout tarball; the familiar refs (or IDs) loaded."""
        with self._locked():
            self._content.remove_temporaries()
            staging = Path(tempfile.mkdtemp(prefix=".tmp-load-", dir=self.root))
            try:
                plans = plan_archive(stage_archive(archive, staging))
                return self._commit(plans)
            except ImageLoadError:
                raise
            except (LayerError, OSError) as e:
                raise ImageLoadError(f"cannot load image: {e}") from e
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _commit(
        self,
        plans: builtins.list[PendingImage],
        on_layer: Callable[[int, str], None] | None = None,
    ) -> builtins.list[str]:
        state = self._read_state()
        created: builtins.list[Path] = []
        try:
            for plan in plans:
                for index, layer in enumerate(plan.layers):
                    if on_layer is not None:
                        on_layer(index, "extracting")
                    self._content.commit_layer(layer, state["layers"], created)
                    if layer.blob is not None:
                        self._content.commit_blob_file(layer.blob, layer.blob_digest, created)
                    if on_layer is not None:
                        on_layer(index, "complete")
                self._content.commit_blob_bytes(plan.config_bytes, created)
                self._content.commit_blob_bytes(plan.manifest_bytes, created)
            loaded: builtins.list[str] = []
            for plan in plans:
                state["images"].setdefault(plan.id, {"loaded": utc_rfc3339(digits=6)})
                state["images"][plan.id]["manifest"] = plan.manifest_digest
                for ref in plan.refs:
                    state["refs"][ref] = plan.id  # a tag moves to the newly loaded image
                loaded.extend(Reference.parse(r).familiar() for r in plan.refs)
                if not plan.refs:
                    loaded.append(plan.id)
            write_json_atomic(self._state_path, state)
        except BaseException:
            undo(created)
            raise
        self._write_index(state)
        return loaded

    # -- pulling (engine/images/registry.py downloads, the store verifies and commits)

    def has_layer(self, diff_id: str) -> bool:
        """Whether the layer ``diff_id`` is unpacked here, so a pull can skip its blob."""
        return self._content.has_layer(diff_id)

    @contextlib.contextmanager
    def download_dir(self) -> Iterator[Path]:
        """A private directory on the store's filesystem for blobs being downloaded.

        Each is flock(2)ed while in use, so the ones a killed daemon left behind (nobody holds
        their lock) are removed when the next download starts.
        """
        with self._locked():
            path, fd = self._content.new_download_dir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)

    def add_pulled(
        self,
        ref: str | None,
        manifest_bytes: bytes,
        config_bytes: bytes,
        layer_blobs: builtins.list[Path | None],
        on_layer: Callable[[int, str], None] | None = None,
    ) -> Image:
        """Import an image downloaded from a registry, tagged ``ref`` (None: untagged).

        ``layer_blobs[i]`` is the downloaded blob of the manifest's i-th layer (in
        download_dir()), or None when has_layer() said its diff_id is unpacked here already.
        Everything is checked again (config and blobs against the manifest, layers against their
        diff_ids) and nothing is kept on failure. ``on_layer(i, "extracting" | "complete")`` is
        called from this thread as each layer is committed.
        """
        ref_key = normalized_ref(ref, "pulled image") if ref else None
        manifest = as_dict(parse_json(manifest_bytes, "manifest"), "manifest")
        descriptors = as_list(manifest.get("layers"), "manifest layers")
        if len(descriptors) != len(layer_blobs):
            raise ImageLoadError(
                f"manifest has {len(descriptors)} layers, {len(layer_blobs)} blobs were given"
            )
        with self._locked():
            self._content.remove_temporaries()
            staging = Path(tempfile.mkdtemp(prefix=".tmp-pull-", dir=self.root))
            try:
                plan = plan_pulled(staging, manifest_bytes, manifest, config_bytes, layer_blobs)
                if ref_key is not None:
                    plan.refs.append(ref_key)
                self._commit([plan], on_layer)
                return self._image(self._read_state(), plan.id)
            except ImageLoadError:
                raise
            except (LayerError, OSError) as e:
                raise ImageLoadError(f"cannot store pulled image: {e}") from e
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    # -- lookup

    def _resolve(self, state: dict[str, Any], ref_or_id: str) -> tuple[str, str | None]:
        """(image id, the tag ``ref_or_id`` named, or None when it named an ID or digest)."""
        wanted = ref_or_id.strip()
        images: dict[str, Any] = state["images"]
        full = _FULL_ID_RE.fullmatch(wanted)
        if full is not None:
            image_id = f"sha256:{full[1]}"
            if image_id in images:
                return image_id, None
            raise ImageNotFound(f"No such image: {wanted}")
        display = wanted
        try:
            ref = Reference.parse(wanted)
        except ValueError:
            ref = None
        if ref is not None:
            if ref.digest is not None:
                for image_id, record in images.items():
                    if ref.digest in (record.get("manifest"), image_id):
                        return image_id, None
            else:
                key = str(ref.with_default_tag())
                display = ref.with_default_tag().familiar()
                if key in state["refs"] and state["refs"][key] in images:
                    return state["refs"][key], key
        short = _SHORT_ID_RE.fullmatch(wanted)
        if short is not None:
            matches = [i for i in images if i.removeprefix("sha256:").startswith(short[1])]
            if len(matches) == 1:
                return matches[0], None
            if len(matches) > 1:
                raise ImageNotFound(f"No such image: {wanted} (the ID prefix is ambiguous)")
        raise ImageNotFound(f"No such image: {display}")

    def _config(self, image_id: str) -> dict[str, Any]:
        if image_id not in self._configs:
            try:
                data = self._content.blob_path(image_id).read_bytes()
            except FileNotFoundError:  # removed meanwhile by another thread or process
                raise ImageNotFound(f"No such image: {image_id}") from None
            self._configs[image_id] = json.loads(data)
        return self._configs[image_id]

    def _image(self, state: dict[str, Any], image_id: str) -> Image:
        config = self._config(image_id)
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        layer_sizes = state["layers"]
        return Image(
            id=image_id,
            repo_tags=sorted(r for r, i in state["refs"].items() if i == image_id),
            config=config,
            diff_ids=diff_ids,
            size=sum(layer_sizes.get(d, {}).get("size", 0) for d in dict.fromkeys(diff_ids)),
            created=str(config.get("created") or ""),
            manifest_digest=state["images"][image_id].get("manifest", ""),
        )

    def get(self, ref_or_id: str) -> Image:
        """By ``name[:tag]``, ``name@digest``, or full or short (12+ hex) ID, ``sha256:`` or not."""
        state = self._read_state()
        image_id, _ = self._resolve(state, ref_or_id)
        return self._image(state, image_id)

    def list(self) -> builtins.list[Image]:
        """Every image, newest first."""
        state = self._read_state()
        images = [self._image(state, image_id) for image_id in state["images"]]
        images.sort(key=lambda image: image.id)
        images.sort(key=lambda image: image.created, reverse=True)
        return images

    def layer_dirs(self, image: Image) -> builtins.list[Path]:
        """The unpacked layer directories, LOWEST FIRST (reverse them for overlayfs lowerdir)."""
        # A diff_id can occur twice in one image (e.g. two empty layers). Keeping only the
        # highest occurrence is equivalent: its files and whiteouts re-apply there anyway.
        highest = {diff_id: i for i, diff_id in enumerate(image.diff_ids)}
        dirs = []
        for i, diff_id in enumerate(image.diff_ids):
            if highest[diff_id] != i:
                continue
            path = self._content.layer_path(diff_id)
            if not path.is_dir():
                raise ImageNotFound(f"image {image.short_id}: layer {diff_id} is missing")
            dirs.append(path)
        return dirs

    # -- changes

    def tag(self, ref_or_id: str, new_ref: str) -> None:
        """Point ``new_ref`` (normalized, ``:latest`` by default) at an existing image."""
        parsed = Reference.parse(new_ref)
        if parsed.digest is not None:
            raise ValueError(f"refusing to create a tag with a digest reference: {new_ref}")
        with self._locked():
            state = self._read_state()
            image_id, _ = self._resolve(state, ref_or_id)
            state["refs"][str(parsed.with_default_tag())] = image_id
            self._save_state(state)

    def remove(self, ref_or_id: str, force: bool = False) -> builtins.list[str]:
        """Untag, and delete the image when no tag is left; Docker's CLI lines, in order.

        Returns e.g. ``["Untagged: nginx:latest", "Deleted: sha256:..."]``. Naming an ID that
        several tags share raises ImageConflict unless ``force``. Whether a container still
        uses the image is the caller's business.
        """
        with self._locked():
            state = self._read_state()
            image_id, tag = self._resolve(state, ref_or_id)
            tags = sorted(r for r, i in state["refs"].items() if i == image_id)
            report = []
            if tag is not None:
                del state["refs"][tag]
                report.append(f"Untagged: {Reference.parse(tag).familiar()}")
                if len(tags) > 1:
                    self._save_state(state)
                    return report
            else:
                if len(tags) > 1 and not force:
                    short = image_id.removeprefix("sha256:")[:12]
                    raise ImageConflict(
                        f"conflict: unable to delete {short} (must be forced) - image is "
                        "referenced in multiple repositories"
                    )
                for ref in tags:
                    del state["refs"][ref]
                    report.append(f"Untagged: {Reference.parse(ref).familiar()}")
            del state["images"][image_id]
            self._configs.pop(image_id, None)
            report.append(f"Deleted: {image_id}")
            self._collect_garbage(state)
            return report

    def _collect_garbage(self, state: dict[str, Any]) -> None:
        """Save ``state``, then delete every blob and layer no remaining image refers to."""
        blobs: set[str] = set()
        diff_ids: set[str] = set()
        for image_id, record in state["images"].items():
            blobs.add(image_id)
            manifest_digest = record.get("manifest")
            if manifest_digest:
                blobs.add(manifest_digest)
                manifest = json.loads(self._content.blob_path(manifest_digest).read_bytes())
                blobs.update(layer["digest"] for layer in manifest.get("layers", []))
            diff_ids.update(self._config(image_id).get("rootfs", {}).get("diff_ids", []))
        state["layers"] = {d: v for d, v in state["layers"].items() if d in diff_ids}
        self._save_state(state)
        # Files go after the state: a crash in between leaves orphans, which the next
        # collection removes, never a state that points at missing files.
        self._content.keep_only(blobs, diff_ids)
