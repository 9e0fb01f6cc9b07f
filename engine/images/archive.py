"""Image archives being loaded: ``docker save`` tarballs and OCI image layouts.

An archive is first staged (its regular files copied out of the tar, which may be a stream),
then planned: every image in it becomes a PendingImage whose config, manifest and layer blobs
have been verified against their descriptors. The store commits plans (engine/images/store.py);
a pull builds a staged archive of the blobs it downloaded and plans it the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from engine import inroot
from engine.images.image import ImageLoadError
from engine.images.layers import GZIP_MAGIC, MAX_SYMLINK_HOPS, ZSTD_MAGIC
from engine.images.oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    CHUNK,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    as_dict,
    as_list,
    config_diff_ids,
    digest_hex,
    host_architecture,
    normalized_ref,
    parse_json,
    sha256_bytes,
    sha256_file,
)

_MAX_INDEX_DEPTH = 4


def _member_parts(name: str) -> list[str]:
    try:
        return inroot.relative_parts(name, "the archive")
    except ValueError as e:
        raise ImageLoadError(f"archive member {e}") from None


@dataclass
class StagedArchive:
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
                shutil.copyfileobj(source, out, CHUNK)
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
        parts = inroot.split(name)
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
            self.digests[path] = sha256_file(path)
        return self.digests[path]

    def verified_blob(self, descriptor: Any, what: str) -> Path:
        """The blob a descriptor points to, after checking its size and digest."""
        descriptor = as_dict(descriptor, f"{what} descriptor")
        digest = descriptor.get("digest")
        hex_digest = digest_hex(digest, what)
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


def stage_archive(archive: BinaryIO | Path | str, staging: Path) -> StagedArchive:
    staged = StagedArchive(staging)
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
class PendingLayer:
    diff_id: str
    blob: Path | None  # staged file; None when a pull found the layer unpacked here already
    blob_digest: str
    media_type: str
    blob_size: int


@dataclass
class PendingImage:
    config_bytes: bytes
    config: dict[str, Any]
    manifest_bytes: bytes
    layers: list[PendingLayer]
    refs: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return sha256_bytes(self.config_bytes)

    @property
    def manifest_digest(self) -> str:
        return sha256_bytes(self.manifest_bytes)


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
    return normalized_ref(str(name), "index.json annotation")


def _pick_platform(index: dict[str, Any], what: str) -> dict[str, Any]:
    manifests = [as_dict(m, f"{what} entry") for m in as_list(index.get("manifests"), what)]
    arch = host_architecture()
    for descriptor in manifests:
        plat = descriptor.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return descriptor
    if len(manifests) == 1 and not manifests[0].get("platform"):
        return manifests[0]
    raise ImageLoadError(f"{what}: no manifest for linux/{arch}")


def plan_from_manifest(
    staged: StagedArchive,
    manifest_bytes: bytes,
    manifest: dict[str, Any],
    present: frozenset[str] = frozenset(),
) -> PendingImage:
    """``present``: diff_ids already unpacked in the store, whose blobs a pull skipped."""
    config_path = staged.verified_blob(manifest.get("config"), "config")
    config_bytes = config_path.read_bytes()
    config = as_dict(parse_json(config_bytes, "image config"), "image config")
    diff_ids = config_diff_ids(config, "image config")
    layer_descriptors = as_list(manifest.get("layers"), "manifest layers")
    if len(layer_descriptors) != len(diff_ids):
        raise ImageLoadError(
            f"manifest has {len(layer_descriptors)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    layers = []
    for descriptor, diff_id in zip(layer_descriptors, diff_ids, strict=True):
        media_type = str(as_dict(descriptor, "layer descriptor").get("mediaType", ""))
        if "foreign" in media_type or "nondistributable" in media_type:
            raise ImageLoadError(f"layer {descriptor.get('digest')}: foreign layers not supported")
        if "zstd" in media_type:
            raise ImageLoadError(f"layer {descriptor.get('digest')}: zstd layers not supported")
        if diff_id in present and not staged.has(
            f"blobs/sha256/{digest_hex(descriptor.get('digest'), 'layer')}"
        ):
            layers.append(
                PendingLayer(
                    diff_id, None, descriptor["digest"], media_type, descriptor.get("size", 0)
                )
            )
            continue
        blob = staged.verified_blob(descriptor, "layer")
        layers.append(
            PendingLayer(
                diff_id=diff_id,
                blob=blob,
                blob_digest=descriptor["digest"],
                media_type=media_type or _layer_media_type(blob),
                blob_size=blob.stat().st_size,
            )
        )
    return PendingImage(config_bytes, config, manifest_bytes, layers)


def plan_pulled(
    staging: Path,
    manifest_bytes: bytes,
    manifest: dict[str, Any],
    config_bytes: bytes,
    layer_blobs: list[Path | None],
) -> PendingImage:
    """The plan for an image a pull downloaded: ``layer_blobs[i]`` is the manifest's i-th layer
    blob, or None when the store has that layer unpacked already (the caller checked that there
    is one entry per layer)."""
    staged = StagedArchive(staging)
    config_path = staging / "config"
    config_path.write_bytes(config_bytes)
    staged.files[f"blobs/sha256/{sha256_bytes(config_bytes)[7:]}"] = config_path
    descriptors = as_list(manifest.get("layers"), "manifest layers")
    for descriptor, blob in zip(descriptors, layer_blobs, strict=True):
        hex_digest = digest_hex(as_dict(descriptor, "layer").get("digest"), "layer")
        if blob is not None:
            staged.files[f"blobs/sha256/{hex_digest}"] = blob
    config = as_dict(parse_json(config_bytes, "image config"), "image config")
    diff_ids = config_diff_ids(config, "image config")
    # A count mismatch is reported by plan_from_manifest.
    present = frozenset(d for d, b in zip(diff_ids, layer_blobs, strict=False) if b is None)
    return plan_from_manifest(staged, manifest_bytes, manifest, present)


def _resolve_manifest(
    staged: StagedArchive, descriptor: dict[str, Any], depth: int = 0
) -> tuple[bytes, dict[str, Any]]:
    """Follow a descriptor through image indexes down to this platform's manifest."""
    if depth > _MAX_INDEX_DEPTH:
        raise ImageLoadError("index.json: image indexes nested too deep")
    data = staged.verified_blob(descriptor, "manifest").read_bytes()
    obj = as_dict(parse_json(data, "manifest"), "manifest")
    # umoci writes manifests without a mediaType field, so the JSON shape decides last.
    media_type = descriptor.get("mediaType") or obj.get("mediaType")
    if media_type in INDEX_MEDIA_TYPES or (media_type is None and "manifests" in obj):
        return _resolve_manifest(staged, _pick_platform(obj, "image index"), depth + 1)
    if media_type in MANIFEST_MEDIA_TYPES or (media_type is None and "layers" in obj):
        return data, obj
    raise ImageLoadError(f"manifest {descriptor.get('digest')}: unsupported type {media_type}")


def _plan_oci_layout(staged: StagedArchive) -> list[PendingImage]:
    layout = as_dict(parse_json(staged.read("oci-layout"), "oci-layout"), "oci-layout")
    if "imageLayoutVersion" not in layout:
        raise ImageLoadError("oci-layout has no imageLayoutVersion")
    index = as_dict(parse_json(staged.read("index.json"), "index.json"), "index.json")
    plans: dict[str, PendingImage] = {}
    for entry in as_list(index.get("manifests"), "index.json manifests"):
        descriptor = as_dict(entry, "index.json entry")
        ref = _ref_from_annotations(as_dict(descriptor.get("annotations") or {}, "annotations"))
        manifest_bytes, manifest = _resolve_manifest(staged, descriptor)
        key = sha256_bytes(manifest_bytes)
        if key not in plans:
            plans[key] = plan_from_manifest(staged, manifest_bytes, manifest)
        if ref is not None and ref not in plans[key].refs:
            plans[key].refs.append(ref)
    return list(plans.values())


def _synthesized_manifest(config_bytes: bytes, layers: list[PendingLayer]) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_OCI_CONFIG,
            "digest": sha256_bytes(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.blob_digest, "size": layer.blob_size}
            for layer in layers
        ],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def _plan_docker_archive(staged: StagedArchive) -> list[PendingImage]:
    """``docker save`` output: manifest.json lists each image's config, tags and layer files."""
    entries = as_list(parse_json(staged.read("manifest.json"), "manifest.json"), "manifest.json")
    plans: dict[str, PendingImage] = {}
    for raw_entry in entries:
        entry = as_dict(raw_entry, "manifest.json entry")
        config_name = entry.get("Config")
        if not isinstance(config_name, str):
            raise ImageLoadError("manifest.json entry has no Config")
        config_bytes = staged.read(config_name)
        config_digest = sha256_bytes(config_bytes)
        # docker save names the config by its digest ("<hex>.json" or "blobs/sha256/<hex>").
        stem = config_name.rsplit("/", 1)[-1].removesuffix(".json")
        if re.fullmatch(r"[a-f0-9]{64}", stem) and f"sha256:{stem}" != config_digest:
            raise ImageLoadError(
                f"config {config_name}: digest mismatch (content is {config_digest})"
            )
        config = as_dict(parse_json(config_bytes, "image config"), "image config")
        diff_ids = config_diff_ids(config, "image config")
        layer_names = as_list(entry.get("Layers"), "manifest.json Layers")
        if len(layer_names) != len(diff_ids):
            raise ImageLoadError(
                f"manifest.json lists {len(layer_names)} layers but the config has "
                f"{len(diff_ids)} diff_ids"
            )
        layers = []
        for layer_name, diff_id in zip(layer_names, diff_ids, strict=True):
            blob = staged.path(str(layer_name))
            layers.append(
                PendingLayer(
                    diff_id=diff_id,
                    blob=blob,
                    blob_digest=staged.digest(blob),
                    media_type=_layer_media_type(blob),
                    blob_size=blob.stat().st_size,
                )
            )
        refs = [
            normalized_ref(str(t), "manifest.json RepoTags") for t in entry.get("RepoTags") or []
        ]
        plan = plans.setdefault(
            config_digest,
            PendingImage(config_bytes, config, _synthesized_manifest(config_bytes, layers), layers),
        )
        plan.refs.extend(r for r in refs if r not in plan.refs)
    return list(plans.values())


def plan_archive(staged: StagedArchive) -> list[PendingImage]:
    if staged.has("index.json") and staged.has("oci-layout"):
        plans = _plan_oci_layout(staged)
    elif staged.has("manifest.json"):
        plans = _plan_docker_archive(staged)
    else:
        raise ImageLoadError("archive has neither index.json + oci-layout nor manifest.json")
    if not plans:
        raise ImageLoadError("archive holds no image")
    return plans
