"""User and group lookup in a container's root filesystem: Docker's ``--user`` and an image's
``User`` turned into (uid, gid, additional gids) with runc's GetExecUser rules.

The root filesystem is the image's (and the container's own writes): /etc/passwd and
/etc/group are resolved inside it (``inroot``), read only when they are regular files and at
most ``MAX_FILE_SIZE`` bytes of them. Blocking reads, so callers on the event loop use
``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from engine import inroot

PASSWD = "/etc/passwd"
GROUP = "/etc/group"
MAX_FILE_SIZE = 1 << 20  # glibc and runc read these a line at a time; 1 MiB is ~20,000 users
MAX_ID = 2**31 - 1  # runc's user.maxID: ids are int32 in the kernel's ABI


class UserLookupError(ValueError):
    """A user or group that cannot be found, or a passwd/group file that cannot be read."""


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def read_file(rootfs: Path, path: str) -> str | None:
    """The text of ``path`` inside ``rootfs`` (None when it does not exist there)."""
    root_fd = os.open(rootfs, inroot.DIR_FLAGS)
    try:
        try:
            handle = inroot.open_path(root_fd, path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise UserLookupError(f"cannot open {path}: {_reason(e)}") from None
    finally:
        os.close(root_fd)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise UserLookupError(f"{path} is not a regular file")
        # An O_PATH fd cannot be read; reopening it through /proc gives the same inode.
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UserLookupError(f"cannot open {path}: {_reason(e)}") from None
    finally:
        os.close(handle)
    with open(fd, "rb") as f:
        data = f.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise UserLookupError(f"{path} is larger than {MAX_FILE_SIZE >> 20} MiB")
    return data.decode("utf-8", errors="replace")


def _reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return e.strerror or str(e)


def _rows(text: str | None) -> list[list[str]]:
    rows = []
    for line in (text or "").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _parse_id(text: str) -> int | None:
    """A decimal id (ASCII digits only), None for anything else."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    if value > MAX_ID:
        raise UserLookupError(f"uids and gids must be in range 0-{MAX_ID}")
    return value


def passwd_entries(text: str | None) -> list[PasswdEntry]:
    entries = []
    for row in _rows(text):
        if len(row) < 4:
            continue
        try:
            uid, gid = _parse_id(row[2]), _parse_id(row[3])
        except UserLookupError:
            continue
        if uid is not None and gid is not None:
            entries.append(PasswdEntry(name=row[0], uid=uid, gid=gid))
    return entries


def group_entries(text: str | None) -> list[GroupEntry]:
    entries = []
    for row in _rows(text):
        if len(row) < 3:
            continue
        try:
            gid = _parse_id(row[2])
        except UserLookupError:
            continue
        if gid is None:
            continue
        members = tuple(m for m in row[3].split(",") if m) if len(row) > 3 else ()
        entries.append(GroupEntry(name=row[0], gid=gid, members=members))
    return entries


def resolve_user(rootfs: Path, user: str) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) for a Docker ``--user`` spec, looked up in the files of
    ``rootfs``.

    Follows runc's GetExecUser: a numeric uid without a passwd entry is used as is (gid 0);
    supplementary groups come from /etc/group only when no group is given explicitly.
    """
    user_part, _, group_part = user.partition(":")
    passwd = passwd_entries(read_file(rootfs, PASSWD))
    uid, gid = 0, 0
    matched_name = ""
    wanted_uid = _parse_id(user_part)
    if user_part == "":
        match = next((e for e in passwd if e.uid == 0), None)
    elif wanted_uid is not None:
        match = next((e for e in passwd if e.uid == wanted_uid), None)
        uid = wanted_uid
    else:
        match = next((e for e in passwd if e.name == user_part), None)
        if match is None:
            raise UserLookupError(
                f"unable to find user {user_part}: no matching entries in passwd file"
            )
    if match is not None:
        uid, gid, matched_name = match.uid, match.gid, match.name

    additional: list[int] = []
    groups = group_entries(read_file(rootfs, GROUP))
    if group_part:
        wanted_gid = _parse_id(group_part)
        if wanted_gid is not None:
            gid = wanted_gid
        else:
            group = next((g for g in groups if g.name == group_part), None)
            if group is None:
                raise UserLookupError(
                    f"unable to find group {group_part}: no matching entries in group file"
                )
            gid = group.gid
    elif matched_name:
        additional = [g.gid for g in groups if matched_name in g.members]
    return uid, gid, additional
