"""Unpacking image layer tarballs into directories that overlayfs can stack.

A layer is a tar (plain or gzip). Its OCI whiteouts (image-spec ``layer.md``) are turned into the
overlayfs ones (kernel ``Documentation/filesystems/overlayfs.rst``):

- ``dir/.wh.name``   → ``dir/name`` as a character device 0/0 (hides ``name`` in lower layers);
- ``dir/.wh..wh..opq`` → xattr ``trusted.overlay.opaque=y`` on ``dir`` (hides all lower entries).

Member paths are resolved as if the layer directory were ``/`` (the way Docker extracts inside a
chroot): ``..`` and absolute names are refused, and symlinks met on the way are followed but never
out of the directory (``engine.inroot``). A whiteout is ``.wh.<name>`` (``name`` neither empty,
``.`` nor ``..``) or ``.wh..wh..opq``; AUFS metadata (``.wh..wh.*``) is skipped, and any other
``.wh.`` name in a member's path is refused. A hard link must name a file of the same layer.
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

from engine import inroot

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_SYMLINK_HOPS = inroot.MAX_SYMLINK_HOPS
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
                yield unzipped  # type: ignore[misc]  # a GzipFile reads as a BinaryIO
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
    try:
        return inroot.relative_parts(name, "the layer root")
    except ValueError as e:
        raise LayerError(f"{what} {e}") from None


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


_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _whiteout_target(base: str, member: str) -> str | None:
    """The name a whiteout ``base`` hides; None for AUFS metadata (``.wh..wh.*``)."""
    if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        return None
    hidden = base[len(WHITEOUT_PREFIX) :]
    if hidden in ("", ".", ".."):
        raise LayerError(f"member {member!r}: {base!r} is not a valid whiteout")
    return hidden


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove the entry ``name`` of ``dir_fd`` (never following a symlink); no error when
    absent. ``name`` is one component, so nothing outside ``dir_fd`` can be touched."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


@dataclass
class _Unpacker:
    """Every entry is made in a directory fd that ``inroot`` opened below the layer root's, by
    a one-component name, so no member can act outside the layer, whatever symlinks earlier
    members planted."""

    root_fd: int
    size: int = 0
    dir_times: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    is_root_user: bool = field(default_factory=lambda: os.geteuid() == 0)

    def open_dir(self, parts: list[str], what: str, create: bool = True) -> tuple[int, list[str]]:
        """A new fd of the directory ``parts`` names and its real components below the root,
        following symlinks as if the root were ``/``."""
        try:
            return inroot.open_dir(self.root_fd, parts, create=create)
        except FileNotFoundError as e:
            raise LayerError(f"{what}: {e.filename} does not exist") from None
        except NotADirectoryError as e:
            raise LayerError(f"{what}: {e.filename} is not a directory") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LayerError(f"{what}: too many levels of symbolic links") from None
            raise

    def apply_attributes(
        self, dir_fd: int, name: str, member: tarfile.TarInfo, fd: int | None = None
    ) -> None:
        """Owner, mode, xattrs and mtime of ``name`` in ``dir_fd`` (or of ``fd``, its open
        file or directory), never following a symlink."""
        # Order matters: chown(2) clears set-uid bits and file capabilities, so chmod and
        # the xattrs (security.capability) come after it. As Docker's createTarFile, the
        # mode is the tar's with its set-uid, set-gid and sticky bits, on all but symlinks.
        is_link = member.issym()
        if self.is_root_user:
            if fd is not None:
                os.chown(fd, member.uid, member.gid)
            else:
                os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        if fd is not None:
            os.chmod(fd, stat.S_IMODE(member.mode))
        elif not is_link:  # a node this unpacker just made: not a symlink
            os.chmod(name, stat.S_IMODE(member.mode), dir_fd=dir_fd)
        for key, value in _xattrs(member).items():
            if key.startswith("trusted.overlay."):
                continue  # only our whiteout conversion may speak to overlayfs
            try:
                if fd is not None:
                    os.setxattr(fd, key, value)
                else:  # no setxattrat(2) before Linux 6.13: the entry through its dir's fd
                    path = f"/proc/self/fd/{dir_fd}/{name}"
                    os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENOTSUP or (is_link and e.errno == errno.EPERM):
                    continue
                raise LayerError(f"member {member.name!r}: setxattr {key}: {e.strerror}") from e
        mtime_ns = int(member.mtime * 1_000_000_000)
        if fd is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        else:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _clean_parts(member.name, "member")
        if not parts:  # the root entry "./": the layer directory itself
            if member.isdir():
                self.apply_attributes(self.root_fd, ".", member, fd=self.root_fd)
                self.dir_times.append(((), int(member.mtime * 1_000_000_000)))
            return
        if parts[0].startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX) and parts != [OPAQUE_WHITEOUT]:
            return  # AUFS metadata (.wh..wh.plnk/...), skipped as Docker's UnpackLayer does
        for part in parts[:-1]:
            if part.startswith(WHITEOUT_PREFIX):
                raise LayerError(f"member {member.name!r}: whiteout {part!r} used as a directory")
        where = f"member {member.name!r}"
        parent, resolved = self.open_dir(parts[:-1], where)
        try:
            self.add_at(tar, member, parent, resolved, parts[-1])
        finally:
            os.close(parent)

    def add_at(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parent: int,
        resolved: list[str],
        base: str,
    ) -> None:
        if base.startswith(WHITEOUT_PREFIX):
            self.add_whiteout(parent, base, member)
            return
        if member.isdir():
            try:
                st = os.stat(base, dir_fd=parent, follow_symlinks=False)
                keep = stat.S_ISDIR(st.st_mode)
            except FileNotFoundError:
                keep = False
            if not keep:
                _remove_at(parent, base)
                os.mkdir(base, 0o700, dir_fd=parent)
            fd = os.open(base, inroot.DIR_FLAGS, dir_fd=parent)
            try:
                self.apply_attributes(parent, base, member, fd=fd)
            finally:
                os.close(fd)
            self.dir_times.append(((*resolved, base), int(member.mtime * 1_000_000_000)))
            return
        if member.isfile():
            _remove_at(parent, base)
            self.write_file(tar, member, parent, base)
            return
        if member.islnk():
            self.add_hard_link(member, parent, base)
            return
        if member.issym():
            _remove_at(parent, base)
            os.symlink(member.linkname, base, dir_fd=parent)
        elif member.ischr() or member.isblk():
            if not self.is_root_user:
                return  # mknod(2) takes CAP_MKNOD; Docker skips devices in a user namespace
            # Created as root would (Docker does too): the container's device cgroup, which
            # denies every device but runc's defaults, keeps it from being opened.
            _remove_at(parent, base)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(base, kind | 0o600, device, dir_fd=parent)
        elif member.isfifo():
            _remove_at(parent, base)
            os.mkfifo(base, 0o600, dir_fd=parent)
        else:
            return  # e.g. GNU volume headers: nothing to create
        self.apply_attributes(parent, base, member)

    def add_hard_link(self, member: tarfile.TarInfo, parent: int, base: str) -> None:
        # As Docker: the target is a name inside the layer (an absolute one counts from the
        # layer root), and must already be in it.
        what = f"member {member.name!r}: hard link target {member.linkname!r}"
        link_parts = _clean_parts(member.linkname.lstrip("/"), "hard link target")
        if not link_parts:
            raise LayerError(f"{what} is the layer root")
        source_dir, _ = self.open_dir(link_parts[:-1], what, create=False)
        try:
            _remove_at(parent, base)
            try:
                os.link(
                    link_parts[-1],
                    base,
                    src_dir_fd=source_dir,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
            except FileNotFoundError:
                raise LayerError(f"{what} is missing") from None
        finally:
            os.close(source_dir)
        # The inode's attributes came with its first name.

    def add_whiteout(self, parent: int, base: str, member: tarfile.TarInfo) -> None:
        if base == OPAQUE_WHITEOUT:
            os.setxattr(parent, OVERLAY_OPAQUE_XATTR, b"y")
            return
        hidden = _whiteout_target(base, member.name)
        if hidden is None:
            return  # other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): meaningless here
        _remove_at(parent, hidden)
        # overlayfs treats a character device with device number 0/0 as a whiteout.
        os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
        if self.is_root_user:
            os.chown(hidden, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)

    def write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent: int, base: str
    ) -> None:
        source = tar.extractfile(member)
        if source is None:
            raise LayerError(f"member {member.name!r}: no data")
        with source, open(os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent), "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
            out.flush()
            self.apply_attributes(parent, base, member, fd=out.fileno())
        self.size += member.size

    def finish(self) -> None:
        # Directory times last: creating their entries changed them. A directory replaced
        # since (by a later member) is skipped: nothing is followed to find it.
        for parts, mtime_ns in reversed(self.dir_times):
            fd = os.dup(self.root_fd)
            try:
                for part in parts:
                    fd = _replace(fd, os.open(part, inroot.DIR_FLAGS, dir_fd=fd))
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            except OSError:
                continue
            finally:
                os.close(fd)


def unpack_layer(source: Path, dest: Path) -> UnpackedLayer:
    """Unpack the layer tar ``source`` (plain or gzip) into the new directory ``dest``.

    Returns the diff_id computed over the whole uncompressed stream; the caller compares it to
    the one the image config promises. ``dest`` is left half-filled on error: unpack into a
    temporary directory and rename it only on success.
    """
    os.mkdir(dest, 0o755)
    root_fd = os.open(dest, inroot.DIR_FLAGS)
    unpacker = _Unpacker(root_fd)
    try:
        with open_uncompressed(source) as stream:
            reader = _HashingReader(stream)
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]  # read() is all r| needs
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
    except (ValueError, OverflowError) as e:  # an id, time or device number out of range
        raise LayerError(f"{source.name}: {e}") from e
    finally:
        os.close(root_fd)
    return UnpackedLayer(diff_id=reader.digest(), size=unpacker.size)
