"""The content-addressed image store.

Layout under ``root`` (the daemon passes ``<data-root>/image``)::

    oci-layout, index.json       an OCI image layout (image-spec ``image-layout.md``); index.json is
                                 a view regenerated from repositories.json
    blobs/sha256/<hex>           manifests, configs and layer blobs, named by their digest
    layers/<diff_id hex>/        each layer unpacked once, shared by every image that has it
    repositories.json            {"refs": {normalized ref: image id},
                                  "images": {image id: {"manifest": digest, "loaded": time}},
                                  "layers": {diff_id: {"size": bytes}}}
    lock                         flock(2)ed while the store changes

An image's ID is the digest of its config blob, as in Docker. Archives are staged and fully
verified (every blob against its descriptor, every unpacked layer against its diff_id) before
anything is committed, and a failed load removes whatever it had added.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from common import errors
from common.jsonstate import CorruptRecord, read_record, set_aside, write_json_atomic
from common.reference import Reference
from common.timefmt import utc_rfc3339
from engine.images.layers import (
    GZIP_MAGIC,
    MAX_SYMLINK_HOPS,
    ZSTD_MAGIC,
    LayerError,
    diff_id_of,
    unpack_layer,
)

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_MEDIA_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
OCI_LAYOUT_VERSION = "1.0.0"

_DIGEST_RE = re.compile(r"sha256:([a-f0-9]{64})")
_FULL_ID_RE = re.compile(r"(?:sha256:)?([a-f0-9]{64})")
_SHORT_ID_RE = re.compile(r"(?:sha256:)?([a-f0-9]{12,63})")
_CHUNK = 1 << 20
_MAX_INDEX_DEPTH = 4

# Go's GOARCH names, which image configs and platforms use.
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_architecture() -> str:
    """This machine's architecture as OCI platforms spell it (``amd64``, ``arm64``...)."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


class ImageNotFound(errors.NotFound):
    """No image answers to a name or ID (message: ``No such image: nginx:latest``)."""


class ImageLoadError(errors.InvalidParameter):
    """An archive that cannot be loaded; nothing of it was kept."""


class ImageConflict(errors.Conflict):
    """An operation that would be ambiguous or destructive without being forced."""


@dataclass
class Image:
    id: str  # "sha256:<config digest>", Docker's image ID
    repo_tags: list[str]  # normalized refs
    config: dict[str, Any]  # the whole image config JSON ("config", "rootfs", "history"...)
    diff_ids: list[str]
    size: int  # bytes of unpacked layers
    created: str  # RFC 3339 from the config, or ""
    manifest_digest: str = ""  # the manifest the image was loaded with

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]


def _sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _tree_size(root: Path) -> int:
    """Bytes of regular-file content under ``root``, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def _digest_hex(digest: Any, what: str) -> str:
    if not isinstance(digest, str):
        raise ImageLoadError(f"{what}: missing digest")
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ImageLoadError(f"{what}: unsupported or malformed digest {digest!r}")
    return match[1]


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageLoadError(f"{what} is not a JSON object")
    return value


def _as_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ImageLoadError(f"{what} is not a JSON array")
    return value


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError and CPython's limit on integer digits.
        raise ImageLoadError(f"{what} is not valid JSON: {e}") from e


def _normalized_ref(ref: str, what: str) -> str:
    try:
        parsed = Reference.parse(ref)
    except ValueError as e:
        raise ImageLoadError(f"{what}: {e}") from e
    if parsed.digest is not None:
        raise ImageLoadError(f"{what}: {ref!r} is a digest reference, not a tag")
    return str(parsed.with_default_tag())


def _diff_ids(config: dict[str, Any], what: str) -> list[str]:
    rootfs = _as_dict(config.get("rootfs"), f"{what} rootfs")
    diff_ids = _as_list(rootfs.get("diff_ids"), f"{what} rootfs.diff_ids")
    for diff_id in diff_ids:
        _digest_hex(diff_id, f"{what} diff_id")
    return diff_ids


# --- the archive being loaded ----------------------------------------------------------------


def _member_parts(name: str) -> list[str]:
    if name.startswith("/"):
        raise ImageLoadError(f"archive member {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageLoadError(f"archive member {name!r} escapes the archive")
    return parts


@dataclass
class _StagedArchive:
    """The regular files of an image archive, copied out of the (possibly streamed) tar."""

    dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    digests: dict[Path, str] = field(default_factory=dict)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, index: int) -> None:
        name = "/".join(_member_parts(member.name))
        if member.isfile():
            source = tar.extractfile(member)
            if source is None:
                raise ImageLoadError(f"archive member {name!r} has no data")
            path = self.dir / f"member-{index}"
            with source, open(path, "xb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
            self.files[name] = path
        elif member.issym():
            self.symlinks[name] = member.linkname
        elif member.islnk():
            target = "/".join(_member_parts(member.linkname))
            if target in self.files:
                self.files[name] = self.files[target]

    def has(self, name: str) -> bool:
        return name in self.files or name in self.symlinks

    def path(self, name: str) -> Path:
        """The staged file for ``name``, following the archive's own symlinks."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        for _ in range(MAX_SYMLINK_HOPS):
            key = "/".join(parts)
            if key in self.files:
                return self.files[key]
            if key not in self.symlinks:
                raise ImageLoadError(f"archive has no file {name!r}")
            target = self.symlinks[key]
            joined = ([] if target.startswith("/") else parts[:-1]) + target.split("/")
            parts = []
            for part in joined:
                if part == "..":
                    if parts:
                        parts.pop()
                elif part not in ("", "."):
                    parts.append(part)
        raise ImageLoadError(f"archive: too many symbolic links resolving {name!r}")

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def digest(self, path: Path) -> str:
        if path not in self.digests:
            self.digests[path] = _sha256_file(path)
        return self.digests[path]

    def verified_blob(self, descriptor: Any, what: str) -> Path:
        """The blob a descriptor points to, after checking its size and digest."""
        descriptor = _as_dict(descriptor, f"{what} descriptor")
        digest = descriptor.get("digest")
        hex_digest = _digest_hex(digest, what)
        path = self.path(f"blobs/sha256/{hex_digest}")
        size = descriptor.get("size")
        if isinstance(size, int) and path.stat().st_size != size:
            raise ImageLoadError(
                f"{what} {digest}: size is {path.stat().st_size}, descriptor says {size}"
            )
        actual = self.digest(path)
        if actual != digest:
            raise ImageLoadError(f"{what} {digest}: digest mismatch (content is {actual})")
        return path


def _stage_archive(archive: BinaryIO | Path | str, staging: Path) -> _StagedArchive:
    staged = _StagedArchive(staging)
    with contextlib.ExitStack() as stack:
        if isinstance(archive, (str, Path)):
            try:
                stream: BinaryIO = stack.enter_context(open(archive, "rb"))
            except OSError as e:
                raise ImageLoadError(f"cannot open {archive}: {e.strerror}") from e
        else:
            stream = archive
        try:
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|*"))
            for index, member in enumerate(tar):
                staged.add(tar, member, index)
        except (tarfile.TarError, EOFError) as e:
            raise ImageLoadError(f"not a valid image archive: {e}") from e
    return staged


@dataclass
class _PendingLayer:
    diff_id: str
    blob: Path | None  # staged file; None when a pull found the layer unpacked here already
    blob_digest: str
    media_type: str
    blob_size: int


@dataclass
class _PendingImage:
    config_bytes: bytes
    config: dict[str, Any]
    manifest_bytes: bytes
    layers: list[_PendingLayer]
    refs: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return _sha256_bytes(self.config_bytes)

    @property
    def manifest_digest(self) -> str:
        return _sha256_bytes(self.manifest_bytes)


def _layer_media_type(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(GZIP_MAGIC):
        return MEDIA_OCI_LAYER_GZIP
    if magic == ZSTD_MAGIC:
        raise ImageLoadError(f"layer {path.name}: zstd-compressed layers are not supported")
    return MEDIA_OCI_LAYER


def _ref_from_annotations(annotations: dict[str, Any]) -> str | None:
    # Docker (25+) writes the full name in io.containerd.image.name and only the tag in
    # ref.name; umoci and skopeo write a name or tag in ref.name.
    name = annotations.get(ANNOTATION_CONTAINERD_NAME) or annotations.get(ANNOTATION_REF_NAME)
    if not name:
        return None
    return _normalized_ref(str(name), "index.json annotation")


def _pick_platform(index: dict[str, Any], what: str) -> dict[str, Any]:
    manifests = [_as_dict(m, f"{what} entry") for m in _as_list(index.get("manifests"), what)]
    arch = host_architecture()
    for descriptor in manifests:
        plat = descriptor.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return descriptor
    if len(manifests) == 1 and not manifests[0].get("platform"):
        return manifests[0]
    raise ImageLoadError(f"{what}: no manifest for linux/{arch}")


def _plan_from_manifest(
    staged: _StagedArchive,
    manifest_bytes: bytes,
    manifest: dict[str, Any],
    present: frozenset[str] = frozenset(),
) -> _PendingImage:
    """``present``: diff_ids already unpacked in the store, whose blobs a pull skipped."""
    config_path = staged.verified_blob(manifest.get("config"), "config")
    config_bytes = config_path.read_bytes()
    config = _as_dict(_parse_json(config_bytes, "image config"), "image config")
    diff_ids = _diff_ids(config, "image config")
    layer_descriptors = _as_list(manifest.get("layers"), "manifest layers")
    if len(layer_descriptors) != len(diff_ids):
        raise ImageLoadError(
            f"manifest has {len(layer_descriptors)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    layers = []
    for descriptor, diff_id in zip(layer_descriptors, diff_ids, strict=True):
        media_type = str(_as_dict(descriptor, "layer descriptor").get("mediaType", ""))
        if "foreign" in media_type or "nondistributable" in media_type:
            raise ImageLoadError(f"layer {descriptor.get('digest')}: foreign layers not supported")
        if "zstd" in media_type:
            raise ImageLoadError(f"layer {descriptor.get('digest')}: zstd layers not supported")
        if diff_id in present and not staged.has(
            f"blobs/sha256/{_digest_hex(descriptor.get('digest'), 'layer')}"
        ):
            layers.append(
                _PendingLayer(
                    diff_id, None, descriptor["digest"], media_type, descriptor.get("size", 0)
                )
            )
            continue
        blob = staged.verified_blob(descriptor, "layer")
        layers.append(
            _PendingLayer(
                diff_id=diff_id,
                blob=blob,
                blob_digest=descriptor["digest"],
                media_type=media_type or _layer_media_type(blob),
                blob_size=blob.stat().st_size,
            )
        )
    return _PendingImage(config_bytes, config, manifest_bytes, layers)


def _resolve_manifest(
    staged: _StagedArchive, descriptor: dict[str, Any], depth: int = 0
) -> tuple[bytes, dict[str, Any]]:
    """Follow a descriptor through image indexes down to this platform's manifest."""
    if depth > _MAX_INDEX_DEPTH:
        raise ImageLoadError("index.json: image indexes nested too deep")
    data = staged.verified_blob(descriptor, "manifest").read_bytes()
    obj = _as_dict(_parse_json(data, "manifest"), "manifest")
    # umoci writes manifests without a mediaType field, so the JSON shape decides last.
    media_type = descriptor.get("mediaType") or obj.get("mediaType")
    if media_type in INDEX_MEDIA_TYPES or (media_type is None and "manifests" in obj):
        return _resolve_manifest(staged, _pick_platform(obj, "image index"), depth + 1)
    if media_type in MANIFEST_MEDIA_TYPES or (media_type is None and "layers" in obj):
        return data, obj
    raise ImageLoadError(f"manifest {descriptor.get('digest')}: unsupported type {media_type}")


def _plan_oci_layout(staged: _StagedArchive) -> list[_PendingImage]:
    layout = _as_dict(_parse_json(staged.read("oci-layout"), "oci-layout"), "oci-layout")
    if "imageLayoutVersion" not in layout:
        raise ImageLoadError("oci-layout has no imageLayoutVersion")
    index = _as_dict(_parse_json(staged.read("index.json"), "index.json"), "index.json")
    plans: dict[str, _PendingImage] = {}
    for entry in _as_list(index.get("manifests"), "index.json manifests"):
        descriptor = _as_dict(entry, "index.json entry")
        ref = _ref_from_annotations(_as_dict(descriptor.get("annotations") or {}, "annotations"))
        manifest_bytes, manifest = _resolve_manifest(staged, descriptor)
        key = _sha256_bytes(manifest_bytes)
        if key not in plans:
            plans[key] = _plan_from_manifest(staged, manifest_bytes, manifest)
        if ref is not None and ref not in plans[key].refs:
            plans[key].refs.append(ref)
    return list(plans.values())


def _synthesized_manifest(config_bytes: bytes, layers: list[_PendingLayer]) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_OCI_CONFIG,
            "digest": _sha256_bytes(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.blob_digest, "size": layer.blob_size}
            for layer in layers
        ],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def _plan_docker_archive(staged: _StagedArchive) -> list[_PendingImage]:
    """``docker save`` output: manifest.json lists each image's config, tags and layer files."""
    entries = _as_list(_parse_json(staged.read("manifest.json"), "manifest.json"), "manifest.json")
    plans: dict[str, _PendingImage] = {}
    for raw_entry in entries:
        entry = _as_dict(raw_entry, "manifest.json entry")
        config_name = entry.get("Config")
        if not isinstance(config_name, str):
            raise ImageLoadError("manifest.json entry has no Config")
        config_bytes = staged.read(config_name)
        config_digest = _sha256_bytes(config_bytes)
        # docker save names the config by its digest ("<hex>.json" or "blobs/sha256/<hex>").
        stem = config_name.rsplit("/", 1)[-1].removesuffix(".json")
        if re.fullmatch(r"[a-f0-9]{64}", stem) and f"sha256:{stem}" != config_digest:
            raise ImageLoadError(
                f"config {config_name}: digest mismatch (content is {config_digest})"
            )
        config = _as_dict(_parse_json(config_bytes, "image config"), "image config")
        diff_ids = _diff_ids(config, "image config")
        layer_names = _as_list(entry.get("Layers"), "manifest.json Layers")
        if len(layer_names) != len(diff_ids):
            raise ImageLoadError(
                f"manifest.json lists {len(layer_names)} layers but the config has "
                f"{len(diff_ids)} diff_ids"
            )
        layers = []
        for layer_name, diff_id in zip(layer_names, diff_ids, strict=True):
            blob = staged.path(str(layer_name))
            layers.append(
                _PendingLayer(
                    diff_id=diff_id,
                    blob=blob,
                    blob_digest=staged.digest(blob),
                    media_type=_layer_media_type(blob),
                    blob_size=blob.stat().st_size,
                )
            )
        refs = [
            _normalized_ref(str(t), "manifest.json RepoTags") for t in entry.get("RepoTags") or []
        ]
        plan = plans.setdefault(
            config_digest,
            _PendingImage(
                config_bytes, config, _synthesized_manifest(config_bytes, layers), layers
            ),
        )
        plan.refs.extend(r for r in refs if r not in plan.refs)
    return list(plans.values())


def _plan_archive(staged: _StagedArchive) -> list[_PendingImage]:
    if staged.has("index.json") and staged.has("oci-layout"):
        plans = _plan_oci_layout(staged)
    elif staged.has("manifest.json"):
        plans = _plan_docker_archive(staged)
    else:
        raise ImageLoadError("archive has neither index.json + oci-layout nor manifest.json")
    if not plans:
        raise ImageLoadError("archive holds no image")
    return plans


def _remove_if_unlocked(path: Path) -> None:
    """Remove a download directory unless a live download holds its flock(2)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(path, ignore_errors=True)
    except BlockingIOError:
        pass  # in use
    finally:
        os.close(fd)


# --- the store ----------------------------------------------------------------------------------


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._layers = self.root / "layers"
        self._state_path = self.root / "repositories.json"
        self._thread_lock = threading.Lock()
        self._configs: dict[str, dict[str, Any]] = {}
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._layers.mkdir(parents=True, exist_ok=True)
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
            blob = self._blob_path(digest)
            base = {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest, "size": blob.stat().st_size}
            refs = sorted(r for r, i in state["refs"].items() if i == image_id)
            for ref in refs:
                manifests.append({**base, "annotations": {ANNOTATION_REF_NAME: ref}})
            if not refs:
                manifests.append(base)
        index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests}
        write_json_atomic(self.root / "index.json", index)

    def _blob_path(self, digest: str) -> Path:
        return self._blobs / _digest_hex(digest, "blob")

    def _layer_path(self, diff_id: str) -> Path:
        return self._layers / _digest_hex(diff_id, "layer")

    def _remove_temporaries(self) -> None:
        """Leftovers of a load or removal that crashed; only called with the lock held."""
        for directory, prefixes in (
            (self.root, (".tmp-",)),
            (self._layers, (".tmp-", ".trash-")),
            (self._blobs, (".tmp-",)),
        ):
            for entry in directory.iterdir():
                if entry.name.startswith(prefixes):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)

    # -- loading

    def load(self, archive: BinaryIO | Path | str) -> builtins.list[str]:
        """Load a docker-archive or OCI-layout tarball; the familiar refs (or IDs) loaded."""
        with self._locked():
            self._remove_temporaries()
            staging = Path(tempfile.mkdtemp(prefix=".tmp-load-", dir=self.root))
            try:
                plans = _plan_archive(_stage_archive(archive, staging))
                return self._commit(plans)
            except ImageLoadError:
                raise
            except (LayerError, OSError) as e:
                raise ImageLoadError(f"cannot load image: {e}") from e
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _commit(
        self,
        plans: builtins.list[_PendingImage],
        on_layer: Callable[[int, str], None] | None = None,
    ) -> builtins.list[str]:
        state = self._read_state()
        created: builtins.list[Path] = []
        try:
            for plan in plans:
                for index, layer in enumerate(plan.layers):
                    if on_layer is not None:
                        on_layer(index, "extracting")
                    self._commit_layer(layer, state, created)
                    if layer.blob is not None:
                        self._commit_blob_file(layer.blob, layer.blob_digest, created)
                    if on_layer is not None:
                        on_layer(index, "complete")
                self._commit_blob_bytes(plan.config_bytes, created)
                self._commit_blob_bytes(plan.manifest_bytes, created)
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
            for path in reversed(created):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
        self._write_index(state)
        return loaded

    def _commit_layer(
        self, layer: _PendingLayer, state: dict[str, Any], created: builtins.list[Path]
    ) -> None:
        dest = self._layer_path(layer.diff_id)
        if layer.blob is None:  # a pull skipped the blob because the layer was here
            if not dest.is_dir():
                raise ImageLoadError(f"layer {layer.diff_id} was removed meanwhile; pull again")
            state["layers"].setdefault(layer.diff_id, {"size": _tree_size(dest)})
            return
        if dest.is_dir():
            # Already unpacked: still make sure this blob really is that layer.
            actual = diff_id_of(layer.blob)
            if actual != layer.diff_id:
                raise ImageLoadError(
                    f"layer {layer.blob_digest}: diff_id is {actual}, config says {layer.diff_id}"
                )
            if layer.diff_id not in state["layers"]:  # an orphan left by a crash, reused
                state["layers"][layer.diff_id] = {"size": _tree_size(dest)}
            return
        tmp = self._layers / f".tmp-{dest.name}-{secrets.token_hex(4)}"
        try:
            unpacked = unpack_layer(layer.blob, tmp)
            if unpacked.diff_id != layer.diff_id:
                raise ImageLoadError(
                    f"layer {layer.blob_digest}: diff_id is {unpacked.diff_id}, "
                    f"config says {layer.diff_id}"
                )
        except LayerError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ImageLoadError(f"layer {layer.diff_id}: {e}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, dest)
        created.append(dest)
        state["layers"][layer.diff_id] = {"size": unpacked.size}

    def _commit_blob_file(self, source: Path, digest: str, created: builtins.list[Path]) -> None:
        dest = self._blob_path(digest)
        if dest.exists():
            return
        # The staging directory is on the same filesystem: a hard link is a free copy.
        os.link(source, dest)
        os.chmod(dest, 0o644)
        created.append(dest)

    def _commit_blob_bytes(self, data: bytes, created: builtins.list[Path]) -> None:
        dest = self._blob_path(_sha256_bytes(data))
        if dest.exists():
            return
        tmp = self._blobs / f".tmp-{dest.name}-{secrets.token_hex(4)}"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, dest)
        created.append(dest)

    # -- pulling (engine/images/registry.py downloads, the store verifies and commits)

    def has_layer(self, diff_id: str) -> bool:
        """Whether the layer ``diff_id`` is unpacked here, so a pull can skip its blob."""
        return self._layer_path(diff_id).is_dir()

    @contextlib.contextmanager
    def download_dir(self) -> Iterator[Path]:
        """A private directory on the store's filesystem for blobs being downloaded.

        Each is flock(2)ed while in use, so the ones a killed daemon left behind (nobody holds
        their lock) are removed when the next download starts.
        """
        parent = self.root / "downloads"
        with self._locked():
            parent.mkdir(exist_ok=True)
            for entry in parent.iterdir():
                _remove_if_unlocked(entry)
            path = Path(tempfile.mkdtemp(prefix="pull-", dir=parent))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
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
        ref_key = _normalized_ref(ref, "pulled image") if ref else None
        manifest = _as_dict(_parse_json(manifest_bytes, "manifest"), "manifest")
        descriptors = _as_list(manifest.get("layers"), "manifest layers")
        if len(descriptors) != len(layer_blobs):
            raise ImageLoadError(
                f"manifest has {len(descriptors)} layers, {len(layer_blobs)} blobs were given"
            )
        with self._locked():
            self._remove_temporaries()
            staging = Path(tempfile.mkdtemp(prefix=".tmp-pull-", dir=self.root))
            try:
                staged = _StagedArchive(staging)
                config_path = staging / "config"
                config_path.write_bytes(config_bytes)
                staged.files[f"blobs/sha256/{_sha256_bytes(config_bytes)[7:]}"] = config_path
                for descriptor, blob in zip(descriptors, layer_blobs, strict=True):
                    hex_digest = _digest_hex(_as_dict(descriptor, "layer").get("digest"), "layer")
                    if blob is not None:
                        staged.files[f"blobs/sha256/{hex_digest}"] = blob
                config = _as_dict(_parse_json(config_bytes, "image config"), "image config")
                diff_ids = _diff_ids(config, "image config")
                # A count mismatch is reported by _plan_from_manifest.
                present = frozenset(
                    d for d, b in zip(diff_ids, layer_blobs, strict=False) if b is None
                )
                plan = _plan_from_manifest(staged, manifest_bytes, manifest, present)
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
                data = self._blob_path(image_id).read_bytes()
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
            path = self._layer_path(diff_id)
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
                manifest = json.loads(self._blob_path(manifest_digest).read_bytes())
                blobs.update(layer["digest"] for layer in manifest.get("layers", []))
            diff_ids.update(self._config(image_id).get("rootfs", {}).get("diff_ids", []))
        state["layers"] = {d: v for d, v in state["layers"].items() if d in diff_ids}
        self._save_state(state)
        # Files go after the state: a crash in between leaves orphans, which the next
        # collection removes, never a state that points at missing files.
        self._remove_temporaries()
        for entry in self._blobs.iterdir():
            if f"sha256:{entry.name}" not in blobs:
                entry.unlink(missing_ok=True)
        for entry in self._layers.iterdir():
            if f"sha256:{entry.name}" in diff_ids:
                continue
            if entry.is_dir() and not entry.is_symlink():
                # Renamed first, so a half-deleted tree never sits under a layer's name.
                trash = self._layers / f".trash-{entry.name}-{secrets.token_hex(4)}"
                os.rename(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
