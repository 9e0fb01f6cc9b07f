"""Unpacking image layer tarballs into directories that overlayfs can stack.

A layer is a tar (plain or gzip). Its OCI whiteouts (image-spec ``layer.md``) are turned into the
overlayfs ones (kernel ``Documentation/filesystems/overlayfs.rst``):

- ``dir/.wh.name``   → ``dir/name`` as a character device 0/0 (hides ``name`` in lower layers);
- ``dir/.wh..wh..opq`` → xattr ``trusted.overlay.opaque=y`` on ``dir`` (hides all lower entries).

Member paths are resolved as if the layer directory were ``/`` (the way Docker extracts inside a
chroot): ``..`` and absolute names are refused, and symlinks met on the way are followed but never
out of the directory.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS (path_resolution(7))
CHUNK = 1 << 20


class LayerError(Exception):
    """A layer that cannot be unpacked safely (bad member, unsupported compression...)."""


@dataclass(frozen=True)
class UnpackedLayer:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream
    size: int  # bytes of regular-file content


class _HashingReader:
    """A read-only stream that hashes every byte it hands out."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


@contextmanager
def open_uncompressed(path: Path) -> Iterator[BinaryIO]:
    """``path`` as an uncompressed tar stream, whatever its compression (by magic number)."""
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]
        elif magic == ZSTD_MAGIC:
            raise LayerError(f"{path.name}: zstd-compressed layers are not supported")
        else:
            yield raw


def diff_id_of(path: Path) -> str:
    """The diff_id of a layer blob: sha256 of its uncompressed bytes."""
    try:
        with open_uncompressed(path) as stream:
            reader = _HashingReader(stream)
            reader.drain()
            return reader.digest()
    except (OSError, EOFError) as e:
        raise LayerError(f"{path.name}: cannot decompress: {e}") from e


def _clean_parts(name: str, what: str) -> list[str]:
    """The components of a member path, refusing anything that could leave the root."""
    if name.startswith("/"):
        raise LayerError(f"{what} {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what} {name!r} escapes the layer root")
    return parts


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """Extended attributes recorded in PAX headers (GNU tar/Go style and libarchive style)."""
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            found[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return found


def _remove(path: Path) -> None:
    """Remove whatever is at ``path`` (never following a symlink); no error when absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


@dataclass
class _Unpacker:
    root: Path
    size: int = 0
    dir_times: list[tuple[Path, int]] = field(default_factory=list)
    is_root_user: bool = field(default_factory=lambda: os.geteuid() == 0)

    def resolve_dir(self, parts: list[str], member: str, create: bool = True) -> Path:
        """The directory ``parts`` names, following symlinks as if ``root`` were ``/``."""
        resolved: list[str] = []
        pending = list(parts)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.root.joinpath(*resolved, part)
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                if not create:
                    raise LayerError(
                        f"member {member!r}: {candidate.name} does not exist"
                    ) from None
                os.mkdir(candidate, 0o755)
                resolved.append(part)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise LayerError(f"member {member!r}: too many levels of symbolic links")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                pending = target.split("/") + pending
            elif stat.S_ISDIR(st.st_mode):
                resolved.append(part)
            else:
                raise LayerError(f"member {member!r}: {'/'.join(parts)} is not a directory")
        return self.root.joinpath(*resolved)

    def apply_attributes(self, path: Path, member: tarfile.TarInfo) -> None:
        # Order matters: chown(2) clears set-uid bits and file capabilities, so chmod and
        # the xattrs (security.capability) come after it.
        is_link = member.issym()
        if self.is_root_user:
            os.lchown(path, member.uid, member.gid)
        if not is_link:
            os.chmod(path, stat.S_IMODE(member.mode))
        for name, value in _xattrs(member).items():
            if name.startswith("trusted.overlay."):
                continue  # only our whiteout conversion may speak to overlayfs
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENOTSUP or (is_link and e.errno == errno.EPERM):
                    continue
                raise LayerError(f"member {member.name!r}: setxattr {name}: {e.strerror}") from e
        mtime_ns = int(member.mtime * 1_000_000_000)
        if member.isdir():
            self.dir_times.append((path, mtime_ns))
        else:
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _clean_parts(member.name, "member")
        if not parts:  # the root entry "./": the layer directory itself
            if member.isdir():
                self.apply_attributes(self.root, member)
            return
        parent = self.resolve_dir(parts[:-1], member.name)
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self.add_whiteout(parent, base, member)
            return
        target = parent / base
        if member.isdir():
            if not (target.is_dir() and not target.is_symlink()):
                _remove(target)
                os.mkdir(target, 0o700)
        elif member.isfile():
            _remove(target)
            self.write_file(tar, member, target)
        elif member.issym():
            _remove(target)
            os.symlink(member.linkname, target)
        elif member.islnk():
            link_parts = _clean_parts(member.linkname, "hard link target")
            if not link_parts:
                raise LayerError(f"member {member.name!r}: hard link to the layer root")
            source_dir = self.resolve_dir(link_parts[:-1], member.name, create=False)
            _remove(target)
            try:
                os.link(source_dir / link_parts[-1], target, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(
                    f"member {member.name!r}: hard link target {member.linkname!r} is missing"
                ) from None
            return  # the inode's attributes came with its first name
        elif member.ischr() or member.isblk():
            _remove(target)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            _remove(target)
            os.mkfifo(target, 0o600)
        else:
            return  # e.g. GNU volume headers: nothing to create
        self.apply_attributes(target, member)

    def add_whiteout(self, parent: Path, base: str, member: tarfile.TarInfo) -> None:
        if base == OPAQUE_WHITEOUT:
            os.setxattr(parent, OVERLAY_OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): meaningless here
        hidden = parent / base[len(WHITEOUT_PREFIX) :]
        _remove(hidden)
        # overlayfs treats a character device with device number 0/0 as a whiteout.
        os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0))
        if self.is_root_user:
            os.lchown(hidden, member.uid, member.gid)

    def write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
        source = tar.extractfile(member)
        if source is None:
            raise LayerError(f"member {member.name!r}: no data")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with source, open(os.open(target, flags, 0o600), "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
        self.size += member.size

    def finish(self) -> None:
        # Directory times last: creating their entries changed them.
        for path, mtime_ns in reversed(self.dir_times):
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def unpack_layer(source: Path, dest: Path) -> UnpackedLayer:
    """Unpack the layer tar ``source`` (plain or gzip) into the new directory ``dest``.

    Returns the diff_id computed over the whole uncompressed stream; the caller compares it to
    the one the image config promises. ``dest`` is left half-filled on error: unpack into a
    temporary directory and rename it only on success.
    """
    os.mkdir(dest, 0o755)
    unpacker = _Unpacker(dest)
    try:
        with open_uncompressed(source) as stream:
            reader = _HashingReader(stream)
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    unpacker.add(tar, member)
            reader.drain()  # the end-of-archive padding belongs to the diff_id too
        unpacker.finish()
    except tarfile.TarError as e:
        raise LayerError(f"{source.name}: not a valid tar: {e}") from e
    except (EOFError, gzip.BadGzipFile) as e:
        raise LayerError(f"{source.name}: truncated or corrupt: {e}") from e
    except OSError as e:
        raise LayerError(f"{source.name}: {e}") from e
    return UnpackedLayer(diff_id=reader.digest(), size=unpacker.size)
