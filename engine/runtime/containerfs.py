"""``docker cp`` beneath a container's root: stat a path, tar it, extract a tar into a
directory (moby daemon/archive.go, pkg/archive). The tree is attacker-controlled: every path is
resolved below the root's file descriptor (engine.inroot, openat2 RESOLVE_IN_ROOT semantics),
every entry is opened relative to its directory's descriptor with ``O_NOFOLLOW``, and a tar's
members are resolved the same way, so no symlink or ``..`` reaches outside the root.

Blocking: the API runs these in a thread and streams the tar through a pipe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO

from engine import inroot

MAX_DEPTH = 256  # directory levels a tar of a tree descends (each holds a descriptor)
MAX_EXTRACT_BYTES = 64 << 30  # file contents one PUT may write
MAX_MEMBERS = 1 << 20
_READ = 1 << 16
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Go's os.FileMode type bits (what X-Docker-Container-Path-Stat's "mode" carries).
_GO_DIR, _GO_SYMLINK, _GO_DEVICE, _GO_PIPE, _GO_SOCKET = 1 << 31, 1 << 27, 1 << 26, 1 << 25, 1 << 24
_GO_SETUID, _GO_SETGID, _GO_CHARDEV, _GO_STICKY = 1 << 23, 1 << 22, 1 << 21, 1 << 20


class CopyError(ValueError):
    """A request Docker refuses (400): not a directory, an entry escaping the target..."""


class PathNotFound(FileNotFoundError):
    """The path does not exist in the container (404)."""


@dataclass
class PathStat:
    name: str
    size: int
    mode: int  # Go's os.FileMode
    mtime: str
    link_target: str

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "mode": self.mode,
            "mtime": self.mtime,
            "linkTarget": self.link_target,
        }


def go_mode(st_mode: int) -> int:
    mode = stat.S_IMODE(st_mode) & 0o777
    kind = stat.S_IFMT(st_mode)
    mode |= {
        stat.S_IFDIR: _GO_DIR,
        stat.S_IFLNK: _GO_SYMLINK,
        stat.S_IFIFO: _GO_PIPE,
        stat.S_IFSOCK: _GO_SOCKET,
        stat.S_IFBLK: _GO_DEVICE,
        stat.S_IFCHR: _GO_DEVICE | _GO_CHARDEV,
    }.get(kind, 0)
    if st_mode & stat.S_ISUID:
        mode |= _GO_SETUID
    if st_mode & stat.S_ISGID:
        mode |= _GO_SETGID
    if st_mode & stat.S_ISVTX:
        mode |= _GO_STICKY
    return mode


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _follows_last(path: str) -> bool:
    """Docker follows a final symlink only when the path ends in ``/`` or ``/.``."""
    return path.endswith("/") or path.endswith("/.")


@contextlib.contextmanager
def _entry(root_fd: int, path: str) -> Any:
    """(directory fd, name, its components) of what ``path`` names below the root: the
    directories on the way resolved in the root, the last component itself not followed."""
    parts = inroot.split(path)
    try:
        if _follows_last(path) or not parts or parts[-1] == "..":
            dir_fd, resolved = inroot.open_dir(root_fd, parts)
            name = "."
        else:
            dir_fd, resolved = inroot.open_dir(root_fd, parts[:-1])
            name = parts[-1]
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            resolved = [*resolved, name]
    except (FileNotFoundError, NotADirectoryError):
        raise PathNotFound(errno.ENOENT, "no such file or directory", path) from None
    except OSError as e:  # ELOOP, ENAMETOOLONG, EACCES...
        raise CopyError(f"{path}: {os.strerror(e.errno or errno.EINVAL)}") from None
    try:
        yield dir_fd, name, resolved
    finally:
        os.close(dir_fd)


def stat_path(root_fd: int, path: str) -> PathStat:
    with _entry(root_fd, path) as (dir_fd, name, resolved):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        link_target = ""
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=dir_fd)
            base = "/" + "/".join(resolved[:-1])
            link_target = posixpath.normpath(posixpath.join(base, target))
        display = posixpath.basename(path.rstrip("/")) or "/"
        return PathStat(
            display, st.st_size, go_mode(st.st_mode), _rfc3339(st.st_mtime), link_target
        )


class _Padded:
    """A file's contents as the tar header announced them: a file that shrank meanwhile is
    padded with zeros, one that grew is cut."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.left = fd, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = os.read(self.fd, n) if n else b""
        data = data or b"\0" * n
        self.left -= len(data)
        return data


def _tarinfo(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    return info


def _add(tar: tarfile.TarFile, dir_fd: int, name: str, arcname: str, depth: int) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # removed meanwhile
    info = _tarinfo(arcname, st)
    if stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError:
            return  # replaced meanwhile (by a symlink: ELOOP)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            info.size = st.st_size
            tar.addfile(info, _Padded(fd, st.st_size))
        finally:
            os.close(fd)
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
        tar.addfile(info)
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        if depth >= MAX_DEPTH:
            raise CopyError(f"{arcname}: more than {MAX_DEPTH} directory levels")
        try:
            sub = os.open(name, inroot.DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            return
        try:
            with os.scandir(sub) as entries:
                names = sorted(e.name for e in entries)
            for child in names:
                _add(tar, sub, child, f"{arcname}/{child}", depth + 1)
        finally:
            os.close(sub)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        tar.addfile(info)
    # Sockets have no tar type: left out, as Go's archive/tar does.


def write_tar(root_fd: int, path: str, out: IO[bytes]) -> None:
    """A tar of ``path`` (a tree: recursively) to ``out``; the members are named after the
    path's last component (``.`` for ``dir/.``: its contents), as Docker's TarResourceRebase."""
    with _entry(root_fd, path) as (dir_fd, name, _resolved):
        base = "." if path.endswith("/.") else posixpath.basename(path.rstrip("/")) or "."
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, dir_fd, name, base, 0)


@dataclass
class ExtractOptions:
    no_overwrite_dir_non_dir: bool = False
    copy_uid_gid: bool = False  # else everything is root's, as Docker without copyUIDGID


def _remove(dir_fd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _existing(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class _Extractor:
    def __init__(self, root_fd: int, dest: list[str], options: ExtractOptions) -> None:
        self.root_fd, self.dest, self.options = root_fd, dest, options
        self.written = 0

    def member_parts(self, name: str) -> list[str]:
        """The member's components below the destination; ``..`` may not climb out of it
        (moby: breakoutError), a leading ``/`` is dropped."""
        parts: list[str] = []
        for part in inroot.split(name):
            if part == "..":
                if not parts:
                    raise CopyError(f"{name!r} is outside of the destination directory")
                parts.pop()
            else:
                parts.append(part)
        return parts

    def extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self.member_parts(member.name)
        if not parts:
            return  # "." or "/": the destination itself
        # The parent directories resolved in the container's root: a symlink the archive
        # made (or the tree had) is followed there, never out of it.
        dir_fd, _ = inroot.open_dir(self.root_fd, self.dest + parts[:-1], create=True)
        try:
            self._entry(tar, member, dir_fd, parts[-1])
        finally:
            os.close(dir_fd)

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo, dir_fd: int, name: str) -> None:
        old = _existing(dir_fd, name)
        if old is not None:
            old_dir = stat.S_ISDIR(old.st_mode)
            if self.options.no_overwrite_dir_non_dir and old_dir != m.isdir():
                kind = "directory" if old_dir else "non-directory"
                raise CopyError(f"cannot overwrite {kind} {m.name!r} with a {m.type!r} entry")
            if not (old_dir and m.isdir()):
                _remove(dir_fd, name)
        mode = m.mode & 0o7777
        if m.isdir():
            if old is None or not stat.S_ISDIR(old.st_mode):
                os.mkdir(name, 0o700, dir_fd=dir_fd)
        elif m.isreg():
            self.written += m.size
            if self.written > MAX_EXTRACT_BYTES:
                raise CopyError(f"archive too large (more than {MAX_EXTRACT_BYTES} bytes)")
            fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as f:
                src = tar.extractfile(m)
                if src is not None:
                    shutil.copyfileobj(src, f, _READ)
        elif m.issym():
            os.symlink(m.linkname, name, dir_fd=dir_fd)
        elif m.islnk():
            target = self.member_parts(m.linkname)
            if not target:
                raise CopyError(f"hard link {m.name!r} to the destination directory")
            src_fd, _ = inroot.open_dir(self.root_fd, self.dest + target[:-1])
            try:
                os.link(
                    target[-1], name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False
                )
            finally:
                os.close(src_fd)
            return
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=dir_fd)
        else:
            return  # device nodes are not made in a container's tree (nor are they by cp -a)
        uid, gid = (m.uid, m.gid) if self.options.copy_uid_gid else (0, 0)
        if m.issym():
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            os.utime(name, (m.mtime, m.mtime), dir_fd=dir_fd, follow_symlinks=False)
            return
        # A running container may swap what was just made for a symlink: change the inode
        # through an O_PATH descriptor of it (its /proc/self/fd link names that inode), never
        # by name (chmod(2) follows a symlink, and Linux has no lchmod).
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise CopyError(f"{m.name!r} was replaced while being extracted")
            magic = f"/proc/self/fd/{fd}"
            os.chown(magic, uid, gid)
            os.chmod(magic, mode)
            os.utime(magic, (m.mtime, m.mtime))
        finally:
            os.close(fd)


MAX_HEADER_BYTES = 1 << 20  # a pax or GNU long-name header, which tarfile reads whole
_LONG_HEADERS = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header's data into memory, whatever size the
    header claims: refuse one larger than MAX_HEADER_BYTES before it is read."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _LONG_HEADERS and self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def extract_tar(root_fd: int, path: str, src: BinaryIO, options: ExtractOptions) -> None:
    """Extract the tar stream ``src`` into the directory ``path`` names in the root."""
    parts = inroot.split(path)
    try:
        dir_fd, dest = inroot.open_dir(root_fd, parts)
    except FileNotFoundError:
        raise PathNotFound(errno.ENOENT, "no such file or directory", path) from None
    except NotADirectoryError:
        raise CopyError("extraction point is not a directory") from None
    except OSError as e:
        raise CopyError(f"{path}: {os.strerror(e.errno or errno.EINVAL)}") from None
    os.close(dir_fd)
    extractor = _Extractor(root_fd, dest, options)
    try:
        with tarfile.open(fileobj=src, mode="r|*", tarinfo=_BoundedTarInfo) as tar:
            for count, member in enumerate(tar):
                if count >= MAX_MEMBERS:
                    raise CopyError(f"archive has more than {MAX_MEMBERS} entries")
                extractor.extract(tar, member)
    except tarfile.TarError as e:
        raise CopyError(f"invalid tar archive: {e}") from None
    except NotADirectoryError as e:
        raise CopyError(f"cannot extract {e.filename!r}: not a directory") from None
