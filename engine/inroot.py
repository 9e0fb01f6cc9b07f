"""Path resolution confined to a directory, as openat2(2) ``RESOLVE_IN_ROOT`` does it.

Every component is opened with ``O_NOFOLLOW`` relative to the file descriptor of the one
before it, starting from the root's; a symlink is read and its target walked the same way, an
absolute target from the root again, and ``..`` never climbs above the root. Whatever the tree
holds (symlinks to ``/``, ``../../..``, a directory swapped for a link meanwhile), nothing
outside the root is opened. Python has no openat2 binding (and the ``pathrs`` bindings need
libpathrs, which no Debian package ships), hence the walk by directory descriptors.

Errors are the ``OSError`` subclasses openat2 would give: ``FileNotFoundError`` (ENOENT),
``NotADirectoryError`` (ENOTDIR) and ``OSError`` with ELOOP (too many symlinks).
"""

from __future__ import annotations

import errno
import os
import stat

MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS (path_resolution(7))
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def split(path: str) -> list[str]:
    """The components of ``path``, without the empty and ``.`` ones."""
    return [p for p in path.split("/") if p not in ("", ".")]


def relative_parts(name: str, root: str) -> list[str]:
    """The components of a member's path inside an archive or layer (``root`` names it in the
    message); ValueError when the path is absolute or climbs out with ``..``."""
    if name.startswith("/"):
        raise ValueError(f"{name!r} is an absolute path")
    parts = split(name)
    if ".." in parts:
        raise ValueError(f"{name!r} escapes {root}")
    return parts


def _loop(name: str) -> OSError:
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)


def _not_a_directory(name: str) -> OSError:
    return NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)


class _Walk:
    """One resolution: the current directory fd, its components below the root, the hops."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.fd = os.dup(root_fd)
        self.resolved: list[str] = []
        self.hops = 0

    def close(self) -> None:
        os.close(self.fd)

    def enter(self, name: str) -> None:
        new = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        os.close(self.fd)
        self.fd = new
        self.resolved.append(name)

    def up(self) -> None:
        if self.resolved:  # the parent of a directory entered by name: still below the root
            new = os.open("..", DIR_FLAGS, dir_fd=self.fd)
            os.close(self.fd)
            self.fd = new
            self.resolved.pop()

    def link_target(self, name: str) -> list[str]:
        """The components to walk instead of the symlink ``name``; moves to the root first
        for an absolute target."""
        self.hops += 1
        if self.hops > MAX_SYMLINK_HOPS:
            raise _loop(name)
        target = os.readlink(name, dir_fd=self.fd)
        if target.startswith("/"):
            os.close(self.fd)
            self.fd = os.dup(self.root_fd)
            self.resolved = []
        return target.split("/")

    def is_symlink(self, name: str) -> bool:
        return stat.S_ISLNK(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)

    def directories(self, parts: list[str], create: bool) -> None:
        """Walk into the directory ``parts`` names (making missing ones when ``create``)."""
        pending = list(parts)
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                self.up()
                continue
            try:
                self.enter(part)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=self.fd)
                self.enter(part)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not self.is_symlink(part):
                    raise _not_a_directory(part) from None
                pending = self.link_target(part) + pending


def open_dir(root_fd: int, parts: list[str], *, create: bool = False) -> tuple[int, list[str]]:
    """A new ``O_RDONLY`` fd of the directory ``parts`` names below ``root_fd``, and its real
    components; with ``create``, missing directories are made (mode 0755) on the way."""
    walk = _Walk(root_fd)
    try:
        walk.directories(parts, create)
    except BaseException:
        walk.close()
        raise
    return walk.fd, walk.resolved


def open_path(root_fd: int, path: str) -> int:
    """A new ``O_PATH`` fd of what ``path`` names below ``root_fd``, every symlink followed
    (the last one too) inside the root. ``O_PATH`` opens nothing: a FIFO does not block, a
    device driver is not called; check the type with ``os.fstat`` before reopening it."""
    walk = _Walk(root_fd)
    try:
        parts = split(path)
        while True:
            if not parts or parts[-1] == "..":
                walk.directories(parts, create=False)
                return os.dup(walk.fd)
            walk.directories(parts[:-1], create=False)
            name = parts[-1]
            fd = os.open(name, _PATH_FLAGS, dir_fd=walk.fd)
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            # Relative targets are walked from the link's directory, where the walk stands.
            parts = split("/".join(walk.link_target(name)))
    finally:
        walk.close()
