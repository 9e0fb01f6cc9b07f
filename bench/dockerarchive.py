"""An OCI image-layout archive made loadable by Docker 20.10's ``docker load``.

Docker before 25.0 loads only the "docker-archive" layout: a ``manifest.json`` at the top
listing, per image, the config file, the repository tags and the layer files (moby's
image/tarexport). An OCI layout archive (``index.json``, ``oci-layout``, ``blobs/``) already
holds those files under ``blobs/sha256/``; adding the ``manifest.json`` that names them makes
one archive both layouts, with no blob rewritten (gzip layers are fine: the loader
decompresses them and checks them against the config's diff_ids).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any


class ArchiveError(Exception):
    pass


def _blob_path(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _read_json(archive: tarfile.TarFile, name: str) -> dict[str, Any]:
    member = archive.extractfile(name)
    if member is None:
        raise ArchiveError(f"{name} is not a file in the archive")
    return json.load(member)


def short_name(reference: str) -> str:
    """``docker.io/library/nginx:latest`` -> ``nginx:latest`` (Docker's own short form)."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if reference.startswith(prefix):
            return reference[len(prefix) :]
    return reference


def docker_manifest(archive: tarfile.TarFile, tag: str | None) -> list[dict[str, object]]:
    """The docker-archive ``manifest.json`` for the first image of the OCI index, tagged
    ``tag`` or, when None, with the name the index annotates it with."""
    try:
        index = _read_json(archive, "index.json")
        descriptor = index["manifests"][0]
        annotations = descriptor.get("annotations", {})
        tag = tag or short_name(
            annotations.get("io.containerd.image.name")
            or annotations.get("org.opencontainers.image.ref.name", "")
        )
        if ":" not in tag.rsplit("/", 1)[-1]:
            raise ArchiveError("the OCI index names no image (pass a tag)")
        manifest = _read_json(archive, _blob_path(descriptor["digest"]))
        config = manifest["config"]["digest"]
        layers = [layer["digest"] for layer in manifest["layers"]]
    except (KeyError, IndexError) as exc:
        raise ArchiveError(f"not an OCI image layout archive: missing {exc}") from exc
    return [
        {
            "Config": _blob_path(config),
            "RepoTags": [tag],
            "Layers": [_blob_path(d) for d in layers],
        }
    ]


def write_docker_archive(oci_archive: Path, out: Path, tag: str | None = None) -> None:
    """Copy ``oci_archive`` to ``out`` with a docker-archive ``manifest.json`` tagging the
    image ``tag`` (``name:tag``; None: the name in the OCI index)."""
    try:
        with tarfile.open(oci_archive) as src:
            manifest = json.dumps(docker_manifest(src, tag)).encode()
            with tarfile.open(out, "w") as dst:
                for member in src.getmembers():
                    if member.name == "manifest.json":
                        continue
                    dst.addfile(member, src.extractfile(member) if member.isfile() else None)
                info = tarfile.TarInfo("manifest.json")
                info.size = len(manifest)
                info.mode = 0o644
                dst.addfile(info, io.BytesIO(manifest))
    except (OSError, tarfile.TarError) as exc:
        out.unlink(missing_ok=True)
        raise ArchiveError(f"{oci_archive}: {exc}") from exc
