"""Whether the host lets the supervisor start N more proxies: checked before a batch starts,
so that a publish the host cannot hold fails at once with one line naming the limit, instead
of part-way through, with EMFILE or EAGAIN from deep inside a start.

What N proxies cost the daemon and the host:

- open files of the daemon: per proxy, its copy of each listening socket (one, or two for a
  port on 0.0.0.0 and ::) and a pidfd, and while it starts, its status pipe (2 fds) and the
  fds of its request queued to the fork server;
  the soft RLIMIT_NOFILE bounds them (pyengined raises it to the hard limit at start,
  engine/rlimits.py; only CAP_SYS_RESOURCE raises the hard limit, setrlimit(2));
- one process each: every task on the host takes a pid below ``kernel.pid_max`` and counts
  towards ``kernel.threads-max`` (proc(5)); the fork server's children are in the daemon's
  cgroup, whose ``pids.max`` counts them too (Documentation/admin-guide/cgroup-v2.rst, "PID");
  RLIMIT_NPROC counts the processes of the daemon's user, except for root (fork(2): uid 0 and
  CAP_SYS_RESOURCE/CAP_SYS_ADMIN are exempt).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from proxy.launch import ProxyError

# Open files a start needs while in flight (status pipe, request fds), and what the daemon
# keeps free for everything else (API connections, the embedded DNS, netd, runc's pipes).
FDS_IN_FLIGHT_PER_START = 5
FD_RESERVE = 256
# Tasks left for everything else on the host (a runc start alone is a few).
TASK_RESERVE = 512

_PROC = Path("/proc")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


class HostLimitError(ProxyError):
    """The host cannot hold that many more proxies; the message says which limit, in one line."""


@dataclass(frozen=True)
class TaskCounts:
    tasks: int  # every thread of every process on the host
    pid_max: int
    threads_max: int


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_counts(proc: Path = _PROC) -> TaskCounts:
    """/proc/loadavg's fourth field counts the host's tasks (threads included), proc(5)."""
    total = int((proc / "loadavg").read_text().split()[3].partition("/")[2])
    pid_max = int((proc / "sys/kernel/pid_max").read_text())
    threads_max = int((proc / "sys/kernel/threads-max").read_text())
    return TaskCounts(total, pid_max, threads_max)


def pids_cgroup(proc: Path = _PROC, root: Path = _CGROUP_ROOT) -> Path | None:
    """The directory of this process's cgroup that holds ``pids.max``: the v1 ``pids``
    hierarchy's, or the unified hierarchy's; None when neither has one."""
    try:
        lines = (proc / "self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidate = root / "pids" / path.lstrip("/")
        elif controllers == "":
            candidate = root / path.lstrip("/")
        else:
            continue
        if (candidate / "pids.max").is_file():
            return candidate
    return None


def _cgroup_room(cgroup: Path) -> tuple[int, int] | None:
    """(pids.max, pids.current) of ``cgroup``; None when it has no limit."""
    limit = (cgroup / "pids.max").read_text().strip()
    if limit == "max":
        return None
    return int(limit), int((cgroup / "pids.current").read_text())


def check_room(count: int, sockets: int, window: int) -> None:
    """Raise HostLimitError when starting ``count`` more proxies with ``sockets`` listening
    sockets among them (``window`` at once) would pass a limit of this process or of the
    host."""
    if count <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        held = open_fds()
        need = sockets + count + FDS_IN_FLIGHT_PER_START * min(count, window)
        if held + need + FD_RESERVE > soft:
            raise HostLimitError(
                f"{count} more proxies need about {need} open files and the daemon holds "
                f"{held} of its {soft} (RLIMIT_NOFILE; hard limit {hard}): raise the daemon's "
                "open files limit (LimitNOFILE=) or publish fewer ports in proxy mode"
            )
    try:
        counts = task_counts()
    except (OSError, ValueError, IndexError):
        counts = None
    if counts is not None:
        ceiling = min(counts.pid_max, counts.threads_max)
        if counts.tasks + count + TASK_RESERVE > ceiling:
            by_pids = counts.pid_max <= counts.threads_max
            name = "kernel.pid_max" if by_pids else "kernel.threads-max"
            raise HostLimitError(
                f"{count} more proxy processes do not fit: the host runs {counts.tasks} tasks "
                f"and {name} is {ceiling}: raise {name} or publish fewer ports in proxy mode"
            )
    cgroup = pids_cgroup()
    try:
        room = _cgroup_room(cgroup) if cgroup is not None else None
    except (OSError, ValueError):
        room = None
    if room is not None and room[1] + count > room[0]:
        raise HostLimitError(
            f"{count} more proxy processes do not fit in the daemon's cgroup {cgroup}: "
            f"pids.max is {room[0]}, {room[1]} in use (TasksMax= of its service)"
        )
    nproc, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if os.getuid() != 0 and nproc != resource.RLIM_INFINITY and counts is not None:
        if counts.tasks + count > nproc:
            raise HostLimitError(
                f"{count} more proxy processes may pass the daemon user's process limit "
                f"{nproc} (RLIMIT_NPROC): raise it (LimitNPROC=) or run the daemon as root"
            )
