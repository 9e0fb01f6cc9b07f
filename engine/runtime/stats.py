"""One sample of a container's resource use, in the shape of Docker's stats JSON (moby
api/types/container/stats.go; what docker CLI's stats_helpers.go reads): CPU and memory from
its cgroup (v1 or v2), the network counters of its namespace from ``/proc/<pid>/net/dev`` of
its init, the host's CPU time from ``/proc/stat``.

Blocking reads of small files: run off the event loop.
"""

from __future__ import annotations

import os
from typing import Any

from engine.runtime.cgroups import MAX_READ, ContainerCgroup

_NS = 10**9
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_NET_FIELDS = (
    "rx_bytes",
    "rx_packets",
    "rx_errors",
    "rx_dropped",
    "tx_bytes",
    "tx_packets",
    "tx_errors",
    "tx_dropped",
)
# /proc/net/dev columns: 8 receive counters then 8 transmit ones.
_NET_COLUMNS = (0, 1, 2, 3, 8, 9, 10, 11)


def _read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, MAX_READ).decode("ascii", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def system_cpu_usage() -> int:
    """The host's CPU time in ns (the ``cpu`` line of /proc/stat), as Docker's
    getSystemCPUUsage."""
    for line in _read("/proc/stat").splitlines():
        if line.startswith("cpu "):
            ticks = sum(int(x) for x in line.split()[1:8] if x.isdigit())
            return ticks * _NS // _CLK_TCK
    return 0


def host_memory() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def networks(pid: int) -> dict[str, dict[str, int]] | None:
    """Per interface counters of the network namespace ``pid`` is in, ``lo`` left out."""
    text = _read(f"/proc/{pid}/net/dev")
    if not text:
        return None
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        name = name.strip()
        values = counters.split()
        if name == "lo" or len(values) < 16:
            continue
        out[name] = {f: int(values[i]) for f, i in zip(_NET_FIELDS, _NET_COLUMNS, strict=True)}
    return out


def _blkio_v1(cg: ContainerCgroup) -> list[dict[str, Any]]:
    entries = []
    text = cg.read("blkio", "blkio.throttle.io_service_bytes_recursive") or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or ":" not in parts[0] or not parts[2].isdigit():
            continue
        major, _, minor = parts[0].partition(":")
        if major.isdigit() and minor.isdigit():
            entries.append(
                {"major": int(major), "minor": int(minor), "op": parts[1], "value": int(parts[2])}
            )
    return entries


def _blkio_v2(cg: ContainerCgroup) -> list[dict[str, Any]]:
    entries = []
    for line in (cg.read("io", "io.stat") or "").splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key in ("rbytes", "wbytes") and value.isdigit():
                op = "read" if key == "rbytes" else "write"
                entries.append(
                    {"major": int(major), "minor": int(minor), "op": op, "value": int(value)}
                )
    return entries


def _cpu_v1(cg: ContainerCgroup) -> dict[str, Any]:
    stat = cg.read_keyed("cpuacct", "cpuacct.stat")
    percpu = [int(x) for x in (cg.read("cpuacct", "cpuacct.usage_percpu") or "").split()]
    throttling = cg.read_keyed("cpu", "cpu.stat")
    return {
        "cpu_usage": {
            "total_usage": cg.read_int("cpuacct", "cpuacct.usage") or 0,
            "percpu_usage": percpu or None,
            "usage_in_kernelmode": stat.get("system", 0) * _NS // _CLK_TCK,
            "usage_in_usermode": stat.get("user", 0) * _NS // _CLK_TCK,
        },
        "throttling_data": {
            "periods": throttling.get("nr_periods", 0),
            "throttled_periods": throttling.get("nr_throttled", 0),
            "throttled_time": throttling.get("throttled_time", 0),
        },
    }


def _cpu_v2(cg: ContainerCgroup) -> dict[str, Any]:
    stat = cg.read_keyed("cpu", "cpu.stat")
    return {
        "cpu_usage": {
            "total_usage": stat.get("usage_usec", 0) * 1000,
            "usage_in_kernelmode": stat.get("system_usec", 0) * 1000,
            "usage_in_usermode": stat.get("user_usec", 0) * 1000,
        },
        "throttling_data": {
            "periods": stat.get("nr_periods", 0),
            "throttled_periods": stat.get("nr_throttled", 0),
            "throttled_time": stat.get("throttled_usec", 0) * 1000,
        },
    }


def _memory(cg: ContainerCgroup) -> dict[str, Any]:
    machine = host_memory()
    if cg.v2:
        usage = cg.read_int("memory", "memory.current") or 0
        limit = cg.read_int("memory", "memory.max") or machine
        out: dict[str, Any] = {"usage": usage}
    else:
        usage = cg.read_int("memory", "memory.usage_in_bytes") or 0
        limit = cg.read_int("memory", "memory.limit_in_bytes") or machine
        out = {
            "usage": usage,
            "max_usage": cg.read_int("memory", "memory.max_usage_in_bytes") or 0,
            "failcnt": cg.read_int("memory", "memory.failcnt") or 0,
        }
    out["stats"] = cg.read_keyed("memory", "memory.stat")
    # An unlimited v1 cgroup reports PAGE_COUNTER_MAX; Docker shows the host's memory.
    out["limit"] = min(limit, machine) if machine else limit
    return out


def sample(cg: ContainerCgroup, pid: int) -> dict[str, Any]:
    """Everything of Docker's stats JSON but its times, names and ``precpu_stats``."""
    cpu = _cpu_v2(cg) if cg.v2 else _cpu_v1(cg)
    cpu["system_cpu_usage"] = system_cpu_usage()
    cpu["online_cpus"] = len(os.sched_getaffinity(0))
    blkio = _blkio_v2(cg) if cg.v2 else _blkio_v1(cg)
    limit = cg.read_int("pids", "pids.max")
    pids: dict[str, int] = {"current": cg.read_int("pids", "pids.current") or 0}
    if limit is not None:
        pids["limit"] = limit
    out: dict[str, Any] = {
        "pids_stats": pids,
        "blkio_stats": {
            "io_service_bytes_recursive": blkio or None,
            "io_serviced_recursive": None,
            "io_queue_recursive": None,
            "io_service_time_recursive": None,
            "io_wait_time_recursive": None,
            "io_merged_recursive": None,
            "io_time_recursive": None,
            "sectors_recursive": None,
        },
        "num_procs": 0,
        "storage_stats": {},
        "cpu_stats": cpu,
        "memory_stats": _memory(cg),
    }
    nets = networks(pid)
    if nets is not None:
        out["networks"] = nets
    return out


def empty() -> dict[str, Any]:
    """A stopped container's sample: Docker's zero values."""
    return {
        "pids_stats": {},
        "blkio_stats": {
            "io_service_bytes_recursive": None,
            "io_serviced_recursive": None,
            "io_queue_recursive": None,
            "io_service_time_recursive": None,
            "io_wait_time_recursive": None,
            "io_merged_recursive": None,
            "io_time_recursive": None,
            "sectors_recursive": None,
        },
        "num_procs": 0,
        "storage_stats": {},
        "cpu_stats": {
            "cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0, "usage_in_usermode": 0},
            "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0},
        },
        "memory_stats": {},
    }
