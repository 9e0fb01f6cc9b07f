"""Processes that are not our children, recognised and reached safely: a pid alone may name
another process by now, so a process is recorded with its start time and recognised again only
when that still matches; from then on it is held by a pidfd (pidfd_open(2)), which keeps naming
that one process, and its fds can be copied with pidfd_getfd(2).
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# pidfd_getfd(2), Linux 5.6; new system calls have one number on every architecture since 5.1
# (the asm-generic table), so 438 holds for x86-64 and arm64 alike.
SYS_PIDFD_GETFD = 438
# proc(5), /proc/<pid>/stat: field 22, starttime, "the time the process started after system
# boot", in clock ticks. A pid is reused only by a process that starts later.
_STAT_STARTTIME_FIELD = 22


@functools.cache
def _syscall() -> Callable[..., int]:
    return ctypes.CDLL(None, use_errno=True).syscall


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate, in this process, of fd ``target_fd`` of the process ``pidfd`` refers to
    (close-on-exec; needs ptrace access to it, e.g. root). Raises OSError."""
    fd = _syscall()(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {target_fd}): {os.strerror(err)}")
    return int(fd)


def socket_of(pidfd: int, target_fd: int) -> socket.socket:
    """The socket at ``target_fd`` of the process ``pidfd`` refers to, as a socket of ours
    (family and type as the kernel reports them). Raises OSError, also when it is no socket."""
    fd = pidfd_getfd(pidfd, target_fd)
    try:
        return socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise


def has_exited(pidfd: int) -> bool:
    """Whether the process has exited (pidfd_open(2): the pidfd polls readable from then on)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


@dataclass(frozen=True)
class ProcessIdentity:
    """What tells one process from another that later got the same pid."""

    pid: int
    start_time: int  # /proc/<pid>/stat field 22
    comm: str  # /proc/<pid>/comm: a forked proxy renames itself "pyengine-proxy"
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, pid: int, cmdline_known: tuple[str, ...] | None = None) -> ProcessIdentity | None:
        """The identity of the process that has ``pid`` now; None if there is none (or it is a
        zombie: its cmdline is empty then). ``cmdline_known``: its command line, when the
        caller knows it (reading it costs the kernel a walk of the process's memory)."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            if cmdline_known is None:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        # The comm field is in parentheses and may itself contain ") ": split at the last one.
        head, _, rest = stat.rpartition(b")")
        comm = head.partition(b"(")[2]
        fields = rest.split()
        # fields[0] is field 3 (state).
        start_time = int(fields[_STAT_STARTTIME_FIELD - 3])
        if cmdline_known is not None:
            if fields[0] == b"Z":
                return None
            return cls(pid, start_time, comm.decode("utf-8", "replace"), cmdline_known)
        if not cmdline:
            return None
        args = tuple(arg.decode("utf-8", "replace") for arg in cmdline.rstrip(b"\0").split(b"\0"))
        return cls(pid, start_time, comm.decode("utf-8", "replace"), args)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "comm": self.comm,
            "cmdline": list(self.cmdline),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessIdentity:
        return cls(
            int(data["pid"]),
            int(data["start_time"]),
            str(data["comm"]),
            tuple(str(arg) for arg in data["cmdline"]),
        )


def open_pidfd(identity: ProcessIdentity) -> int | None:
    """A pidfd of the process ``identity`` describes, or None when that process is gone.

    The pidfd is opened first and the identity checked afterwards: if the process still has
    the recorded start time and has not exited, the pidfd refers to it (a pid is reused only
    after its process has exited and only by one that starts later)."""
    try:
        pidfd = os.pidfd_open(identity.pid)
    except (ProcessLookupError, OSError):
        return None
    if ProcessIdentity.of(identity.pid) != identity or has_exited(pidfd):
        os.close(pidfd)
        return None
    return pidfd
