"""Images built offline: a root filesystem tar turned into an OCI-layout archive.

No registry is reachable from where pyengine is developed, so its images are built here:
``nginx`` and ``redis`` from Debian's own packages with mmdebstrap (about 30 s each), and
``busybox`` from the host's busybox-static binary (well under a second), small enough for tests.

    python -m engine.images.build nginx --out /var/cache/pyengine/images/nginx-oci.tar
    python -m engine.images.build busybox --out busybox-oci.tar

Builds are reproducible: the same rootfs tar gives byte-identical archives (gzip mtime 0, sorted
archive members with fixed times, sorted JSON keys, ``created`` from SOURCE_DATE_EPOCH).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from common.reference import normalize
from common.timefmt import utc_rfc3339
from engine.images.oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    OCI_LAYOUT_VERSION,
    host_architecture,
)

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SOURCE_DATE_EPOCH = 1700000000
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
DEFAULT_SUITE = "bookworm"
GZIP_LEVEL = 6
_CHUNK = 1 << 20

NGINX_CONFIG: dict[str, Any] = {
    "Cmd": ["nginx", "-g", "daemon off;"],
    "Env": [DEFAULT_PATH_ENV],
    "ExposedPorts": {"80/tcp": {}},
    "StopSignal": "SIGQUIT",
    "WorkingDir": "/",
}
BUSYBOX_CONFIG: dict[str, Any] = {
    "Cmd": ["sh"],
    "Env": [DEFAULT_PATH_ENV],
    "WorkingDir": "/",
}
# Debian's redis-server without its systemd unit: in the foreground, listening on every
# address of the container (protected mode would refuse other containers without a password),
# its data in /data, a VOLUME as in the Docker Official Image.
REDIS_CONFIG: dict[str, Any] = {
    "Cmd": ["redis-server", "--protected-mode", "no", "--dir", "/data"],
    "Env": [DEFAULT_PATH_ENV],
    "ExposedPorts": {"6379/tcp": {}},
    "Volumes": {"/data": {}},
    "WorkingDir": "/data",
}
REDIS_HOOKS = ('mkdir -p "$1"/data',)
BUSYBOX_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
BUSYBOX_GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"


class ImageBuildError(Exception):
    """A build that could not run: a missing tool, or a tool that failed."""


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH from the environment (reproducible-builds.org), or a fixed default."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.isdigit() else DEFAULT_SOURCE_DATE_EPOCH


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _HashingWriter:
    """A write-only stream that hashes and counts what goes through it."""

    def __init__(self, out: io.BufferedWriter) -> None:
        self._out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def _gzip_layer(rootfs_tar: Path, out: Path) -> tuple[str, str, int]:
    """Compress ``rootfs_tar`` into ``out``; (diff_id, blob digest, blob size)."""
    diff_id = hashlib.sha256()
    with open(rootfs_tar, "rb") as src, open(out, "wb") as raw:
        blob = _HashingWriter(raw)
        # mtime=0 and no file name keep the gzip header identical between builds (RFC 1952).
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=blob, compresslevel=GZIP_LEVEL, mtime=0
        ) as gz:
            while chunk := src.read(_CHUNK):
                diff_id.update(chunk)
                gz.write(chunk)
    return "sha256:" + diff_id.hexdigest(), "sha256:" + blob.hash.hexdigest(), blob.size


def _archive_entry(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


def write_oci_archive(
    rootfs_tar: Path,
    config: dict[str, Any],
    ref: str,
    out: Path,
    created: str,
    created_by: str = "pyengine imagebuild",
) -> None:
    """Write an OCI-layout tarball holding one image: ``rootfs_tar`` as its only layer.

    ``config`` is the container part of the image config (Cmd, Env, ExposedPorts...); the rest
    (rootfs.diff_ids, history, os, architecture, created) is filled in here. ``ref`` is
    normalized and recorded in index.json under both org.opencontainers.image.ref.name and
    io.containerd.image.name. ``out`` is replaced atomically.
    """
    normalized = normalize(ref)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pyengine-build-", dir=out.parent) as tmp:
        layer_path = Path(tmp) / "layer.tar.gz"
        diff_id, layer_digest, layer_size = _gzip_layer(Path(rootfs_tar), layer_path)
        image_config = {
            "architecture": host_architecture(),
            "config": config,
            "created": created,
            "history": [{"created": created, "created_by": created_by}],
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
        config_bytes = _canonical_json(image_config)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        manifest_bytes = _canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_MANIFEST,
                "config": {
                    "mediaType": MEDIA_OCI_CONFIG,
                    "digest": config_digest,
                    "size": len(config_bytes),
                },
                "layers": [
                    {"mediaType": MEDIA_OCI_LAYER_GZIP, "digest": layer_digest, "size": layer_size}
                ],
            }
        )
        manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        index_bytes = _canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": MEDIA_OCI_MANIFEST,
                        "digest": manifest_digest,
                        "size": len(manifest_bytes),
                        "annotations": {
                            ANNOTATION_CONTAINERD_NAME: normalized,
                            ANNOTATION_REF_NAME: normalized,
                        },
                    }
                ],
            }
        )
        small_files: dict[str, bytes] = {
            f"blobs/sha256/{config_digest[7:]}": config_bytes,
            f"blobs/sha256/{manifest_digest[7:]}": manifest_bytes,
            "index.json": index_bytes,
            "oci-layout": _canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
        }
        layer_name = f"blobs/sha256/{layer_digest[7:]}"
        names = sorted([*small_files, layer_name, "blobs/", "blobs/sha256/"])
        partial = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
                for name in names:
                    if name.endswith("/"):
                        tar.addfile(_archive_entry(name, directory=True))
                    elif name == layer_name:
                        with open(layer_path, "rb") as layer:
                            tar.addfile(_archive_entry(name, layer_size), layer)
                    else:
                        data = small_files[name]
                        tar.addfile(_archive_entry(name, len(data)), io.BytesIO(data))
            os.rename(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


# --- busybox --------------------------------------------------------------------------------


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable with no PT_INTERP program header (no dynamic loader)."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF":
            return False
        is_64 = ident[4] == 2
        order = "<" if ident[5] == 1 else ">"
        header = f.read(48 if is_64 else 36)
        if is_64:
            phoff = struct.unpack_from(order + "Q", header, 16)[0]
            phentsize, phnum = struct.unpack_from(order + "HH", header, 38)
        else:
            phoff = struct.unpack_from(order + "I", header, 12)[0]
            phentsize, phnum = struct.unpack_from(order + "HH", header, 26)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (p_type,) = struct.unpack(order + "I", f.read(4))
            if p_type == 3:  # PT_INTERP, elf(5)
                return False
    return True


def find_busybox() -> Path:
    """The host's busybox from PATH, which must be static (Debian's busybox-static)."""
    found = shutil.which("busybox")
    if found is None:
        raise ImageBuildError("busybox is not installed (apt-get install busybox-static)")
    return checked_busybox(Path(found))


def checked_busybox(path: Path) -> Path:
    """``path`` resolved, if it is a static executable that can run inside any rootfs."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ImageBuildError(f"{path} does not exist (apt-get install busybox-static)")
    if not _is_static_elf(path):
        raise ImageBuildError(f"{path} is not a static binary (apt-get install busybox-static)")
    return path


def write_busybox_rootfs(out_tar: Path, busybox: Path, epoch: int) -> None:
    """A minimal rootfs tar: /bin/busybox, one symlink per applet, /etc/passwd and group, /tmp."""
    listed = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=False, timeout=30
    )
    if listed.returncode != 0:
        raise ImageBuildError(f"{busybox} --list failed: {listed.stderr.strip()}")
    applets = sorted(set(listed.stdout.split()) - {"busybox"})

    def entry(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, link
        info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "root", "root"
        return info

    files = {"etc/group": BUSYBOX_GROUP.encode(), "etc/passwd": BUSYBOX_PASSWD.encode()}
    dirs = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700}
    dirs |= {"sys": 0o555, "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755, "var": 0o755}
    members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for name, mode in dirs.items():
        members[name] = (entry(name, tarfile.DIRTYPE, mode), None)
    for name, data in files.items():
        members[name] = (entry(name, tarfile.REGTYPE, 0o644, len(data)), data)
    binary = busybox.read_bytes()
    members["bin/busybox"] = (entry("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), binary)
    for applet in applets:
        name = f"bin/{applet}"
        members[name] = (entry(name, tarfile.SYMTYPE, 0o777, link="busybox"), None)
    # /usr/bin/env is what "#!/usr/bin/env sh" scripts look for.
    members["usr/bin/env"] = (entry("usr/bin/env", tarfile.SYMTYPE, 0o777, link="/bin/env"), None)
    with tarfile.open(out_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info, content = members[name]
            tar.addfile(info, io.BytesIO(content) if content is not None else None)


def build_busybox_image(
    out: Path, ref: str = "busybox:latest", busybox: Path | None = None, epoch: int | None = None
) -> None:
    """Write the busybox image archive to ``out``."""
    epoch = source_date_epoch() if epoch is None else epoch
    busybox = checked_busybox(busybox) if busybox else find_busybox()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pyengine-rootfs-", dir=out.parent) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        write_busybox_rootfs(rootfs, busybox, epoch)
        write_oci_archive(
            rootfs,
            BUSYBOX_CONFIG,
            ref,
            out,
            utc_rfc3339(epoch * 1_000_000_000, digits=0),
            f"busybox-static {busybox.name}",
        )


# --- images from Debian packages -----------------------------------------------------------

NGINX_LOG_HOOKS = (
    'ln -sf /dev/stdout "$1"/var/log/nginx/access.log',
    'ln -sf /dev/stderr "$1"/var/log/nginx/error.log',
)


def debian_mmdebstrap_command(
    out_tar: Path,
    suite: str,
    mirror: str | None,
    packages: list[str],
    customize_hooks: tuple[str, ...] = (),
) -> list[str]:
    """The mmdebstrap invocation for a slim rootfs holding ``packages`` (see the images
    reference notes: essential variant, merged-usr hook, no docs, no device nodes)."""
    command = [
        "mmdebstrap",
        "--variant=essential",
        f"--include={','.join(packages)}",
        f"--hook-dir={MERGED_USR_HOOKS}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        *(f"--customize-hook={hook}" for hook in customize_hooks),
        "--skip=output/dev",
        suite,
        str(out_tar),
    ]
    if mirror:
        command.append(mirror)
    return command


def default_mirror() -> str | None:
    """The host's apt sources (mmdebstrap ignores them unless told); None: mmdebstrap's own."""
    return str(DEBIAN_SOURCES) if DEBIAN_SOURCES.exists() else None


def write_debian_rootfs(
    out_tar: Path,
    suite: str,
    mirror: str | None,
    epoch: int,
    packages: list[str],
    customize_hooks: tuple[str, ...] = (),
    verbose: bool = False,
    timeout: float | None = None,
) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    if not MERGED_USR_HOOKS.is_dir():
        raise ImageBuildError(f"{MERGED_USR_HOOKS} is missing (mmdebstrap too old?)")
    result = subprocess.run(
        debian_mmdebstrap_command(out_tar, suite, mirror, packages, customize_hooks),
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
        stdin=subprocess.DEVNULL,
        stdout=None if verbose else subprocess.PIPE,
        stderr=None if verbose else subprocess.STDOUT,
        text=True,
        check=False,
        timeout=timeout,
    )
    if result.returncode != 0:
        tail = (result.stdout or "").strip().splitlines()[-1:] or ["see its output"]
        raise ImageBuildError(f"mmdebstrap failed with status {result.returncode}: {tail[0]}")


def build_debian_image(
    out: Path,
    packages: list[str],
    config: dict[str, Any],
    ref: str,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    epoch: int | None = None,
    customize_hooks: tuple[str, ...] = (),
    verbose: bool = False,
    timeout: float | None = None,
) -> None:
    """Write an image archive to ``out``: Debian's ``packages`` in a slim rootfs, one layer,
    ``config`` as the image config (mirror: None means the host's sources)."""
    epoch = source_date_epoch() if epoch is None else epoch
    mirror = mirror or default_mirror()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pyengine-rootfs-", dir=out.parent) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        write_debian_rootfs(
            rootfs, suite, mirror, epoch, packages, customize_hooks, verbose, timeout
        )
        write_oci_archive(
            rootfs,
            config,
            ref,
            out,
            utc_rfc3339(epoch * 1_000_000_000, digits=0),
            f"mmdebstrap --variant=essential --include={','.join(packages)} {suite}",
        )


# Images made of Debian packages: name -> (packages, image config, mmdebstrap customize hooks).
DEBIAN_IMAGES: dict[str, tuple[list[str], dict[str, Any], tuple[str, ...]]] = {
    "nginx": (["nginx"], NGINX_CONFIG, NGINX_LOG_HOOKS),  # logging to stdout/stderr
    "redis": (["redis-server"], REDIS_CONFIG, REDIS_HOOKS),  # redis-server and redis-cli
}


def build_named_image(
    name: str,
    out: Path,
    ref: str | None = None,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    epoch: int | None = None,
    verbose: bool = False,
) -> None:
    """Write the archive of one of DEBIAN_IMAGES to ``out`` (ref: ``NAME:latest``)."""
    packages, config, hooks = DEBIAN_IMAGES[name]
    build_debian_image(
        out, packages, config, ref or f"{name}:latest", suite, mirror, epoch, hooks, verbose
    )


def build_nginx_image(out: Path, ref: str = "nginx:latest", verbose: bool = False) -> None:
    build_named_image("nginx", out, ref, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.images.build", description="Build an image archive offline."
    )
    parser.add_argument("image", choices=["nginx", "redis", "busybox"])
    parser.add_argument("--out", type=Path, required=True, help="the OCI archive to write")
    parser.add_argument("--tag", help="reference to record (default: IMAGE:latest)")
    parser.add_argument("--suite", default=DEFAULT_SUITE, help="Debian suite (nginx)")
    parser.add_argument("--mirror", help="mmdebstrap mirror or sources file (nginx)")
    parser.add_argument("--verbose", action="store_true", help="show mmdebstrap's output")
    args = parser.parse_args(argv)
    ref = args.tag or f"{args.image}:latest"
    try:
        if args.image in DEBIAN_IMAGES:
            build_named_image(
                args.image, args.out, ref, args.suite, args.mirror, verbose=args.verbose
            )
        else:
            build_busybox_image(args.out, ref)
    except (ImageBuildError, ValueError, OSError) as e:
        print(f"imagebuild: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {normalize(ref)} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
