"""A container's resource limits: HostConfig's fields, checked as Docker checks them, and the
runtime-spec ``linux.resources`` they become (moby daemon/daemon_unix.go
verifyPlatformContainerResources, daemon/oci_linux.go WithResources).

Parsed once at the API's boundary into ``Resources``; the engine keeps the HostConfig fields in
the container's record and turns them into the spec at each start, or into a ``runc update``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from engine.runtime.cgroups import unified

MIN_MEMORY = 6 * 1024 * 1024  # moby linuxMinMemory
INT64_MAX = (1 << 63) - 1
CFS_PERIOD = 100_000  # the kernel's default cfs period (µs): what --cpus scales
MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262144  # the cgroup v1 bounds runc clamps to

# HostConfig key → Resources attribute.
HOST_CONFIG_KEYS = {
    "Memory": "memory",
    "MemorySwap": "memory_swap",
    "MemoryReservation": "memory_reservation",
    "NanoCpus": "nano_cpus",
    "CpuShares": "cpu_shares",
    "CpuQuota": "cpu_quota",
    "CpuPeriod": "cpu_period",
    "CpusetCpus": "cpuset_cpus",
    "PidsLimit": "pids_limit",
    "OomKillDisable": "oom_kill_disable",
}


class ResourceError(ValueError):
    """A limit Docker refuses: the API answers 400 with Docker's message."""


@dataclass
class Resources:
    memory: int = 0  # bytes; 0 = unlimited
    memory_swap: int = 0  # memory + swap, bytes; -1 = unlimited swap; 0 = twice memory
    memory_reservation: int = 0
    nano_cpus: int = 0  # 1e9 = one CPU
    cpu_shares: int = 0
    cpu_quota: int = 0  # µs per period; 0 = none
    cpu_period: int = 0  # µs
    cpuset_cpus: str = ""
    pids_limit: int = 0  # <= 0 = unlimited
    oom_kill_disable: bool = False

    @classmethod
    def from_host_config(cls, host_config: dict[str, Any]) -> Resources:
        """The fields the schema already typed (engine.api.bodies); null is the zero value."""
        values: dict[str, Any] = {}
        for key, attr in HOST_CONFIG_KEYS.items():
            value = host_config.get(key)
            if value is not None:
                values[attr] = value
        return cls(**values)

    def host_config(self) -> dict[str, Any]:
        """The HostConfig fields, as inspect shows them."""
        return {key: getattr(self, attr) for key, attr in HOST_CONFIG_KEYS.items()}

    def given(self) -> dict[str, Any]:
        """The HostConfig fields set to something other than their zero value (an update's)."""
        default = Resources()
        return {
            key: getattr(self, attr)
            for key, attr in HOST_CONFIG_KEYS.items()
            if getattr(self, attr) != getattr(default, attr)
        }


def online_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


def parse_cpuset(text: str) -> set[int]:
    """``0-2,4`` → {0, 1, 2, 4} (cpuset(7) list format); ResourceError when malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ResourceError(f"invalid value {text!r} for cpuset cpus") from None
        if first < 0 or last < first or last > 8191:
            raise ResourceError(f"invalid value {text!r} for cpuset cpus")
        cpus.update(range(first, last + 1))
    return cpus


def check(r: Resources, *, update: bool = False) -> None:
    """Docker's checks, with its messages (verifyPlatformContainerResources)."""
    if r.memory and r.memory < MIN_MEMORY:
        raise ResourceError("Minimum memory limit allowed is 6MB")
    if r.memory < 0 and r.memory != -1:
        raise ResourceError("invalid memory limit: must be positive or -1 (unlimited)")
    if r.memory > 0 and r.memory_swap > 0 and r.memory_swap < r.memory:
        raise ResourceError(
            "Minimum memoryswap limit should be larger than memory limit, see usage"
        )
    if r.memory <= 0 and r.memory_swap > 0 and not update:
        raise ResourceError(
            "You should always set the Memory limit when using Memoryswap limit, see usage"
        )
    if r.memory_swap < -1:
        raise ResourceError("invalid memory swap limit: must be positive or -1 (unlimited)")
    if r.memory > 0 and r.memory_reservation > 0 and r.memory < r.memory_reservation:
        raise ResourceError(
            "Minimum memory limit can not be less than memory reservation limit, see usage"
        )
    if r.memory_reservation and not MIN_MEMORY <= r.memory_reservation:
        raise ResourceError("Minimum memory reservation allowed is 6MB")
    ncpu = len(online_cpus())
    if r.nano_cpus and r.cpu_period:
        raise ResourceError("Conflicting options: Nano CPUs and CPU Period cannot both be set")
    if r.nano_cpus and r.cpu_quota:
        raise ResourceError("Conflicting options: Nano CPUs and CPU Quota cannot both be set")
    if r.nano_cpus < 0 or r.nano_cpus > ncpu * 10**9:
        raise ResourceError(
            f"Range of CPUs is from 0.01 to {ncpu}.00, as there are only {ncpu} CPUs available"
        )
    if r.cpu_shares < 0:
        raise ResourceError("invalid CPU shares: must be 0 or more")
    if r.cpu_period and not 1000 <= r.cpu_period <= 1_000_000:
        raise ResourceError(
            "CPU cfs period can not be less than 1ms (i.e. 1000) or larger than 1s (i.e. 1000000)"
        )
    if r.cpu_quota > 0 and r.cpu_quota < 1000:
        raise ResourceError("CPU cfs quota can not be less than 1ms (i.e. 1000)")
    if r.cpuset_cpus:
        available = online_cpus()
        if not parse_cpuset(r.cpuset_cpus) <= available:
            listed = ",".join(str(c) for c in sorted(available))
            raise ResourceError(
                f"Requested CPUs are not available - requested {r.cpuset_cpus}, available: {listed}"
            )


def swap_accounting() -> bool:
    """cgroup v1 memsw (swapaccount=1) or v2 memory.swap.max: Docker's SwapLimit."""
    return os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes") or os.path.exists(
        "/sys/fs/cgroup/cgroup.controllers"
    )


def normalize(r: Resources) -> Resources:
    """Docker's defaults at create (adaptContainerSettings): a memory limit without a swap
    limit allows as much swap again; a PidsLimit of 0 or less means unlimited."""
    out = Resources(**{f.name: getattr(r, f.name) for f in fields(r)})
    if out.memory > 0 and out.memory_swap == 0 and swap_accounting():
        out.memory_swap = out.memory * 2 if out.memory <= INT64_MAX // 2 else -1
    if out.pids_limit < 0:
        out.pids_limit = 0
    return out


def linux_resources(r: Resources) -> dict[str, Any]:
    """The runtime-spec ``linux.resources`` entries (memory, cpu, pids) for ``r``; only
    what is set, so runc leaves the rest at the cgroup's defaults."""
    out: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    if r.memory > 0:
        memory["limit"] = r.memory
    if r.memory_swap > 0 or (r.memory_swap == -1 and r.memory > 0):
        memory["swap"] = r.memory_swap
    if r.memory_reservation > 0:
        memory["reservation"] = r.memory_reservation
    if r.oom_kill_disable and not unified():
        # cgroup v2 has no switch for it: Docker discards the setting there too.
        memory["disableOOMKiller"] = True
    if memory:
        out["memory"] = memory
    cpu: dict[str, Any] = {}
    if r.cpu_shares:
        cpu["shares"] = min(max(r.cpu_shares, MIN_CPU_SHARES), MAX_CPU_SHARES)
    if r.nano_cpus:
        cpu["period"] = CFS_PERIOD
        cpu["quota"] = r.nano_cpus * CFS_PERIOD // 10**9
    else:
        if r.cpu_quota:
            cpu["quota"] = r.cpu_quota
        if r.cpu_period:
            cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if cpu:
        out["cpu"] = cpu
    if r.pids_limit:
        # -1: "max" (an update that lifts the limit; 0 would leave it as it is).
        out["pids"] = {"limit": r.pids_limit if r.pids_limit > 0 else -1}
    return out


def merge_update(current: Resources, update: Resources) -> Resources:
    """The container's limits after an update: each field the update sets replaces the
    current one (moby container.UpdateContainer); a new memory limit above the current swap
    limit needs a new swap limit too."""
    merged = Resources(**{f.name: getattr(current, f.name) for f in fields(current)})
    for attr in HOST_CONFIG_KEYS.values():
        value = getattr(update, attr)
        if value != getattr(Resources(), attr):
            setattr(merged, attr, value)
    if update.memory > 0 and update.memory_swap == 0 and current.memory_swap > 0:
        if update.memory > current.memory_swap:
            raise ResourceError(
                "Memory limit should be smaller than already set memoryswap limit, update the "
                "memoryswap at the same time"
            )
    if update.nano_cpus:
        merged.cpu_quota = merged.cpu_period = 0
    elif update.cpu_quota or update.cpu_period:
        merged.nano_cpus = 0
    check(merged, update=True)
    return merged
