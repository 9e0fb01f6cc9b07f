"""A container's root filesystem: an overlayfs of the image layers plus a writable upper dir."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path
from typing import NoReturn

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

# The new mount API (fsopen(2), fsconfig(2), fsmount(2), move_mount(2)). Their numbers come
# from the unified syscall table, so they are the same on every architecture.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
# fsconfig(2) copies at most 256 bytes of a string value (strndup_user in fs/fsopen.c).
_FSCONFIG_MAX_STRING = 255

_MNT_DETACH = 0x2
_MAX_STACKED_MOUNTS = 32


class MountError(OSError):
    """A mount or unmount the kernel refused."""


def _raise_errno(what: str, target: Path, detail: str = "") -> NoReturn:
    err = ctypes.get_errno()
    suffix = f": {detail}" if detail else ""
    raise MountError(err, f"{what} {target}: {os.strerror(err)}{suffix}")


def _overlay_data(lower_top_first: list[Path], upper: Path, work: Path) -> str:
    lowerdir = ":".join(str(p) for p in lower_top_first)
    return f"lowerdir={lowerdir},upperdir={upper},workdir={work}"


def _needs_escaping(path: Path) -> bool:
    return any(c in str(path) for c in ",:\\")


def _fs_context_log(fs_fd: int) -> str:
    """The kernel's messages queued on an fs context (fsopen(2): read(2) the fd for them)."""
    messages = []
    for _ in range(16):
        try:
            chunk = os.read(fs_fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        messages.append(chunk.decode(errors="replace").strip())
    return "; ".join(messages)


def _mount_with_fsconfig(
    lower_top_first: list[Path], upper: Path, work: Path, target: Path
) -> None:
    """Mount through the new mount API, one ``lowerdir+`` call per layer (Linux >= 6.8), which
    has no one-page limit on the option string and needs no escaping of ':' or ','."""
    syscall = _libc.syscall
    fs_fd = syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    if fs_fd < 0:
        _raise_errno("fsopen overlay for", target)
    try:
        options = [("lowerdir+", p) for p in lower_top_first]
        options += [("upperdir", upper), ("workdir", work)]
        for key, path in options:
            value = os.fsencode(str(path))
            if len(value) > _FSCONFIG_MAX_STRING:
                raise MountError(
                    errno.ENAMETOOLONG, f"overlay {key} path is longer than 255 bytes: {path}"
                )
            rc = syscall(
                _SYS_FSCONFIG,
                ctypes.c_int(fs_fd),
                ctypes.c_uint(_FSCONFIG_SET_STRING),
                ctypes.c_char_p(key.encode()),
                ctypes.c_char_p(value),
                ctypes.c_int(0),
            )
            if rc < 0:
                _raise_errno(f"overlay option {key}={path} for", target, _fs_context_log(fs_fd))
        rc = syscall(
            _SYS_FSCONFIG,
            ctypes.c_int(fs_fd),
            ctypes.c_uint(_FSCONFIG_CMD_CREATE),
            None,
            None,
            ctypes.c_int(0),
        )
        if rc < 0:
            _raise_errno("create overlay for", target, _fs_context_log(fs_fd))
        mnt_fd = syscall(_SYS_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(_FSMOUNT_CLOEXEC), 0)
        if mnt_fd < 0:
            _raise_errno("fsmount overlay for", target)
        try:
            rc = syscall(
                _SYS_MOVE_MOUNT,
                ctypes.c_int(mnt_fd),
                ctypes.c_char_p(b""),
                ctypes.c_int(-100),  # AT_FDCWD; ignored, to_path is absolute
                ctypes.c_char_p(os.fsencode(str(target))),
                ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
            )
            if rc < 0:
                _raise_errno("move_mount overlay to", target)
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def _mount_with_data(lower_top_first: list[Path], upper: Path, work: Path, target: Path) -> None:
    data = _overlay_data(lower_top_first, upper, work)
    rc = _libc.mount(b"overlay", os.fsencode(str(target)), b"overlay", 0, data.encode())
    if rc != 0:
        _raise_errno("mount overlay on", target)


def mount_overlay(lower: list[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount an overlayfs at ``target``: ``lower`` layers given lowest first (as the image
    store lists them), writes going to ``upper``. ``upper``, ``work`` and ``target`` are
    created when missing (and removed again when the mount fails).

    overlayfs stacks "lowerdir=" from the top down (Documentation/filesystems/overlayfs.rst,
    "Multiple lower layers"), so the list is reversed. mount(2) takes at most one page of
    option data; longer lists, or paths with ':' ',' '\\', go through fsconfig(2) instead.
    """
    if not lower:
        raise ValueError("overlay needs at least one lower layer")
    lower_abs = [Path(os.path.abspath(p)) for p in lower]
    for layer in lower_abs:
        if not layer.is_dir():
            raise FileNotFoundError(f"overlay lower layer is not a directory: {layer}")
    upper, work, target = (Path(os.path.abspath(p)) for p in (upper, work, target))
    created = []
    for directory in (upper, work, target):
        if not directory.exists():
            directory.mkdir(parents=True)
            created.append(directory)
    top_first = list(reversed(lower_abs))
    data = _overlay_data(top_first, upper, work)
    fits_one_page = len(data.encode()) < os.sysconf("SC_PAGE_SIZE")
    try:
        if fits_one_page and not any(map(_needs_escaping, [*lower_abs, upper, work])):
            _mount_with_data(top_first, upper, work, target)
        else:
            _mount_with_fsconfig(top_first, upper, work, target)
    except BaseException:
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:
                pass
        raise


def _unescape_mountinfo(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo (proc(5)).
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount_points() -> list[str]:
    """Every mount point in this process's mount namespace (/proc/self/mountinfo field 5)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [
            _unescape_mountinfo(fields[4])
            for fields in (line.split(" ") for line in f)
            if len(fields) > 4
        ]


def is_mounted(target: Path) -> bool:
    """Whether something is mounted on ``target`` in this process's mount namespace."""
    return os.path.realpath(target) in _mount_points()


def mounts_under(directory: Path) -> list[str]:
    """The mount points at or below ``directory``, deepest first (the order to unmount)."""
    root = os.path.realpath(directory)
    found = [p for p in _mount_points() if p == root or p.startswith(root + "/")]
    return sorted(found, key=len, reverse=True)


def unmount(target: Path) -> None:
    """Unmount ``target`` (every mount stacked on it); nothing to do when it is not mounted.
    A busy mount is detached lazily (umount2(2) MNT_DETACH)."""
    path = os.fsencode(os.path.realpath(target))
    for _ in range(_MAX_STACKED_MOUNTS):
        if not is_mounted(target):
            return
        if _libc.umount2(path, 0) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT) and not is_mounted(target):
            return
        if err == errno.EBUSY:
            if _libc.umount2(path, _MNT_DETACH) == 0:
                continue
            err = ctypes.get_errno()
        raise MountError(err, f"unmount {target}: {os.strerror(err)}")
    raise MountError(
        errno.EBUSY, f"unmount {target}: still mounted after {_MAX_STACKED_MOUNTS} tries"
    )
