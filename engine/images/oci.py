"""The OCI image-spec and Docker distribution vocabulary: media types, annotations, platforms,
and the checks every manifest, index and config goes through (JSON shape, sha256 digests).

Everything malformed is an ImageLoadError with a one-line message naming what was wrong.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Any

from common.reference import Reference
from engine.images.image import ImageLoadError

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
CHUNK = 1 << 20  # bytes per read when hashing or copying a blob

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


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def digest_hex(digest: Any, what: str) -> str:
    if not isinstance(digest, str):
        raise ImageLoadError(f"{what}: missing digest")
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ImageLoadError(f"{what}: unsupported or malformed digest {digest!r}")
    return match[1]


def as_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageLoadError(f"{what} is not a JSON object")
    return value


def as_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ImageLoadError(f"{what} is not a JSON array")
    return value


def parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError and CPython's limit on integer digits.
        raise ImageLoadError(f"{what} is not valid JSON: {e}") from e


def normalized_ref(ref: str, what: str) -> str:
    try:
        parsed = Reference.parse(ref)
    except ValueError as e:
        raise ImageLoadError(f"{what}: {e}") from e
    if parsed.digest is not None:
        raise ImageLoadError(f"{what}: {ref!r} is a digest reference, not a tag")
    return str(parsed.with_default_tag())


def config_diff_ids(config: dict[str, Any], what: str) -> list[str]:
    rootfs = as_dict(config.get("rootfs"), f"{what} rootfs")
    diff_ids = as_list(rootfs.get("diff_ids"), f"{what} rootfs.diff_ids")
    for diff_id in diff_ids:
        digest_hex(diff_id, f"{what} diff_id")
    return diff_ids
