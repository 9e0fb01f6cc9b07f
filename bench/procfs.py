"""What the benchmark reads from /proc and the cgroup tree: CPU time and memory of processes,
CPU time of containers and of the whole machine, and the sockets that are listening.

Field positions are those of proc(5): /proc/PID/stat, /proc/stat, /proc/PID/smaps_rollup,
/proc/net/tcp and /proc/net/udp.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# cgroup v1 (this machine's hybrid layout) and the unified v2 tree; runc puts a container at
# <controller mount>/<cgroupsPath>, and pyengine's cgroupsPath is /pyengine/<container id>.
_CPUACCT_V1 = (Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup/cpu,cpuacct"))
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V2_UNIFIED = Path("/sys/fs/cgroup/unified")
_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10
_UDP_UNCONNECTED = "07"  # an unconnected UDP socket shows as TCP_CLOSE = 7


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the ``(comm)`` field (comm may hold spaces and parentheses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, with_reaped_children: bool = True) -> float:
    """utime + stime of ``pid`` (and cutime + cstime: children it has waited for); 0 if gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After comm: [0] state, [1] ppid ... [11] utime, [12] stime, [13] cutime, [14] cstime.
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies."""
    members = []
    for p in all_pids():
        fields = _stat_fields(p)
        # After comm: [0] state, [1] ppid, [2] pgrp.
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(p)
    return members


def all_pids() -> list[int]:
    """Every process now running (the numeric entries of /proc)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def process_tree() -> dict[int, list[int]]:
    """Children of every process: ``{ppid: [pid, ...]}``, read once from /proc."""
    children: dict[int, list[int]] = {}
    for p in all_pids():
        ppid = parent_pid(p)
        if ppid is not None:
            children.setdefault(ppid, []).append(p)
    return children


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren...)."""
    children = process_tree() if tree is None else tree
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def tree_cpu_seconds(pid: int, tree: dict[int, list[int]] | None = None) -> float:
    """CPU of ``pid``, of the children it reaped, and of its live descendants (a forking proxy
    such as socat runs one child per connection)."""
    below = descendants(pid, tree)
    return process_cpu_seconds(pid) + sum(process_cpu_seconds(p) for p in below)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def children_cpu_seconds() -> float:
    """CPU of every child this process has waited for (getrusage(2) RUSAGE_CHILDREN)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class MachineCpu:
    """Cumulative CPU seconds of all CPUs from /proc/stat's ``cpu`` line."""

    task: float  # user + nice + system: time charged to processes
    interrupts: float  # irq + softirq (packet processing lands here)
    steal: float
    idle: float  # idle + iowait

    def __sub__(self, other: MachineCpu) -> MachineCpu:
        return MachineCpu(
            self.task - other.task,
            self.interrupts - other.interrupts,
            self.steal - other.steal,
            self.idle - other.idle,
        )

    @property
    def busy(self) -> float:
        return self.task + self.interrupts


def machine_cpu() -> MachineCpu:
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(x) / CLOCK_TICKS for x in parts[1:9]
    )
    return MachineCpu(user + nice + system, irq + softirq, steal, idle + iowait)


def in_container(pid: int) -> bool:
    """Whether ``pid`` runs in a pyengine container (runc's cgroup path /pyengine/<id>)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return "/pyengine/" in f.read()
    except OSError:
        return False


def container_cpu_seconds(container_id: str, parent: str = "pyengine") -> float | None:
    """CPU of everything in the container's cgroup (``/parent/id``: pyengine's, or a bench
    dockerd's cgroup parent); None when the cgroup cannot be found."""
    for root in _CPUACCT_V1:
        usage = root / parent / container_id / "cpuacct.usage"
        if usage.exists():
            try:
                return int(usage.read_text()) / 1e9
            except (OSError, ValueError):
                return None
    for root in (_CGROUP_V2_UNIFIED, _CGROUP_V2):
        stat = root / parent / container_id / "cpu.stat"
        if stat.exists():
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
    return None


@dataclass(frozen=True)
class ProcessMemory:
    rss_kb: int
    pss_kb: int
    pss_anon_kb: int
    threads: int


def process_memory(pid: int) -> ProcessMemory | None:
    """Rss and Pss from /proc/PID/smaps_rollup (Linux 4.14+), threads from /proc/PID/status."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb: dict[str, int] = {}
    for line in rollup.splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            kb[key] = int(rest.split()[0])
    threads = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:")), 0
    )
    return ProcessMemory(kb.get("Rss", 0), kb.get("Pss", 0), kb.get("Pss_Anon", 0), threads)


def _socket_rows(proto: str, in_netns_of: int | None) -> list[list[str]]:
    base = f"/proc/{in_netns_of}/net" if in_netns_of else "/proc/net"
    rows: list[list[str]] = []
    for table in (f"{base}/{proto}", f"{base}/{proto}6"):
        try:
            with open(table) as f:
                rows += [line.split() for line in f.readlines()[1:]]
        except FileNotFoundError:
            continue
    return rows


def bound_socket_inode(
    proto: str, ip: str, port: int, in_netns_of: int | None = None
) -> int | None:
    """The inode of the socket bound to ``ip:port`` (TCP: listening), in this network namespace
    or in the one of process ``in_netns_of`` (its /proc/PID/net view); None if there is none.

    /proc/net/{tcp,udp} print the address as ``%08X`` of the network-order word read in host
    order, so 127.0.0.1 shows as 0100007F on a little-endian machine. A server bound to the
    IPv6 wildcard (iperf3 -s does) accepts IPv4 too and shows in tcp6.
    """
    want_port = f"{port:04X}"
    want_ips = {_proc_net_ip(ip), _proc_net_ip("0.0.0.0"), "0" * 32}
    state = _TCP_LISTEN if proto == "tcp" else _UDP_UNCONNECTED
    for row in _socket_rows(proto, in_netns_of):
        addr, _, hexport = row[1].partition(":")
        if hexport == want_port and addr in want_ips and row[3] == state:
            return int(row[9])
    return None


def is_listening(proto: str, ip: str, port: int, in_netns_of: int | None = None) -> bool:
    return bound_socket_inode(proto, ip, port, in_netns_of) is not None


def holds_socket(pid: int, inode: int) -> bool:
    """Whether one of ``pid``'s file descriptors is the socket ``inode``."""
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _proc_net_ip(ip: str) -> str:
    packed = bytes(int(x) for x in ip.split("."))
    return f"{int.from_bytes(packed, sys.byteorder):08X}"
