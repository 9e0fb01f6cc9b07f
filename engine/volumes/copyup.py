"""Mount points inside a container's rootfs, and the copy-up of the image's content into a new
volume (moby ``container.CopyImagePathContent``).

The rootfs is the image's: every path in it is resolved beneath it (``engine.inroot``), so a
symlinked ``VOLUME`` path never makes pyengined create, read or mount anything outside. The
copy walks by directory descriptors, never follows a symlink (it copies it as one), stays on
the rootfs's file system and is bounded in entries and depth. Blocking: run off the loop.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from common.errors import InvalidParameter
from engine import inroot

MAX_ENTRIES = 200_000
MAX_DEPTH = 128
_CHUNK = 1 << 20


class MountPathError(InvalidParameter):
    pass


class _Budget:
    def __init__(self) -> None:
        self.entries = 0

    def take(self) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise MountPathError(f"copy-up: more than {MAX_ENTRIES} entries")


def _open_root(rootfs: Path) -> int:
    return os.open(rootfs, inroot.DIR_FLAGS)


def _prepare_file(root_fd: int, parts: list[str], destination: str) -> list[str]:
    """The mount point of a file bind: an existing file, or a new empty one. A symlink there
    is followed inside the rootfs, as runc's securejoin does (Debian's nginx has
    /etc/nginx/sites-enabled/default -> /etc/nginx/sites-available/default); a directory is
    refused."""
    for _ in range(inroot.MAX_SYMLINK_HOPS):
        fd, resolved = inroot.open_dir(root_fd, parts[:-1], create=True)
        try:
            name = parts[-1]
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(name, flags, 0o644, dir_fd=fd))
                return [*resolved, name]
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=fd)
                base = [] if target.startswith("/") else resolved
                parts = [*base, *inroot.split(target)]
                if not parts:
                    break  # a link to the root: a directory
                continue
            if stat.S_ISDIR(st.st_mode):
                break
            return [*resolved, name]
        finally:
            os.close(fd)
    else:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), destination)
    raise MountPathError(f"cannot mount a file on {destination}: it is not a file")


def prepare_destination(rootfs: Path, destination: str, is_dir: bool) -> str:
    """Make the mount point ``destination`` beneath ``rootfs`` (a directory, or an empty file
    for a file bind) and return its path with every symlink resolved inside the rootfs: the
    one runc is given. The rootfs itself is refused as a destination."""
    parts = inroot.split(destination)
    root_fd = _open_root(rootfs)
    try:
        try:
            if is_dir:
                fd, resolved = inroot.open_dir(root_fd, parts, create=True)
                os.close(fd)
            else:
                resolved = _prepare_file(root_fd, parts, destination)
        except MountPathError:
            raise
        except OSError as e:
            raise MountPathError(
                f"cannot make mount point {destination} in the container: {e.strerror}"
            ) from None
    finally:
        os.close(root_fd)
    if not resolved:
        raise MountPathError(f"mount point {destination} resolves to the container's root")
    return "/" + "/".join(resolved)


def copy_up(rootfs: Path, resolved_destination: str, volume_data: Path) -> int:
    """Copy what the rootfs holds at ``resolved_destination`` into the (empty) volume
    directory; the number of entries copied (0 when there is nothing there)."""
    root_fd = _open_root(rootfs)
    try:
        try:
            src_fd, resolved = inroot.open_dir(root_fd, inroot.split(resolved_destination))
        except (FileNotFoundError, NotADirectoryError):
            return 0
        except OSError as e:
            if e.errno == errno.ELOOP:
                return 0
            raise
        try:
            if not resolved:
                return 0
            dst_fd = os.open(volume_data, inroot.DIR_FLAGS)
            try:
                budget = _Budget()
                _copy_dir(src_fd, dst_fd, os.fstat(src_fd).st_dev, budget, 0)
                return budget.entries
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
    finally:
        os.close(root_fd)


def _set_metadata(fd: int, st: os.stat_result) -> None:
    """Owner, then mode (a chown clears set-id bits), then times, through the new entry's own
    descriptor: a name another container swapped meanwhile is never followed."""
    os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_file(name: str, src_dir: int, dst_dir: int, st: os.stat_result) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):  # swapped meanwhile
            return
        dst = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=dst_dir,
        )  # fmt: skip
        try:
            remaining = st.st_size  # the size it had when listed: a growing file is cut
            while remaining > 0:
                chunk = os.read(src, min(remaining, _CHUNK))
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
                remaining -= len(chunk)
            _set_metadata(dst, st)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_dir(src: int, dst: int, dev: int, budget: _Budget, level: int) -> None:
    if level > MAX_DEPTH:
        raise MountPathError(f"copy-up: directories nested deeper than {MAX_DEPTH}")
    for name in sorted(os.listdir(src)):
        budget.take()
        try:
            _copy_entry(name, src, dst, dev, budget, level)
        except FileExistsError:
            continue  # written meanwhile by a container that already runs with the volume
        except FileNotFoundError:
            continue  # gone from the rootfs meanwhile
    # The directory (the volume's root too) takes the image directory's owner, mode, times.
    _set_metadata(dst, os.fstat(src))


def _copy_entry(name: str, src: int, dst: int, dev: int, budget: _Budget, level: int) -> None:
    """Copy one entry of the directory ``src`` into ``dst``, with its owner, mode and times."""
    st = os.stat(name, dir_fd=src, follow_symlinks=False)
    mode = st.st_mode
    if st.st_dev != dev:
        return  # another file system mounted here: not the image's content
    if stat.S_ISDIR(mode):
        os.mkdir(name, 0o700, dir_fd=dst)
        sub_src = os.open(name, inroot.DIR_FLAGS, dir_fd=src)
        try:
            sub_dst = os.open(name, inroot.DIR_FLAGS, dir_fd=dst)
            try:
                _copy_dir(sub_src, sub_dst, dev, budget, level + 1)
            finally:
                os.close(sub_dst)
        finally:
            os.close(sub_src)
    elif stat.S_ISREG(mode):
        _copy_file(name, src, dst, st)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst)
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(mode):
                return  # swapped meanwhile
            # An O_PATH descriptor takes no fchmod(2); its /proc/self/fd link is the same inode.
            proc = f"/proc/self/fd/{fd}"
            os.chown(proc, st.st_uid, st.st_gid)
            os.chmod(proc, stat.S_IMODE(mode))
            os.utime(proc, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
    # sockets are not copied
