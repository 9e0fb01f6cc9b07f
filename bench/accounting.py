"""CPU accounting around one sample: the proxy's own CPU, and how busy the rest of the machine
was (on a shared machine, unrelated load must be visible in the results).

"Ours" is everything the run started: the load generators (reaped children of this process),
the daemons and every proxy (process trees), and the server containers (their cgroups). The
rest of the CPU time charged to processes over the sample is "foreign". Interrupt time
(irq + softirq, where most packet processing lands) is reported for the machine only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench import procfs


def _processes_cpu(root_pids: list[int], tree: dict[int, list[int]]) -> float:
    """CPU of the trees under ``root_pids``, leaving out container processes (counted through
    their cgroups) so nothing is counted twice."""
    seen: set[int] = set()
    total = 0.0
    for root in root_pids:
        for pid in [root, *procfs.descendants(root, tree)]:
            if pid in seen or procfs.in_container(pid):
                continue
            seen.add(pid)
            total += procfs.process_cpu_seconds(pid)
    return total


@dataclass(frozen=True)
class CpuSnapshot:
    machine: procfs.MachineCpu
    ours: float
    proxy: float

    @classmethod
    def take(
        cls, root_pids: list[int], container_ids: list[str], proxy_pids: list[int]
    ) -> CpuSnapshot:
        tree = procfs.process_tree()
        own = os.times()
        ours = own.user + own.system + procfs.children_cpu_seconds()
        ours += _processes_cpu(root_pids, tree)
        ours += sum(procfs.container_cpu_seconds(c) or 0.0 for c in container_ids)
        proxy = sum(procfs.tree_cpu_seconds(p, tree) for p in proxy_pids)
        return cls(procfs.machine_cpu(), ours, proxy)


@dataclass(frozen=True)
class CpuUsage:
    machine_busy: float
    machine_interrupts: float
    ours: float
    foreign: float
    proxy: float

    def as_load(self) -> dict[str, float]:
        return {
            "machine_busy_cpu_s": round(self.machine_busy, 3),
            "machine_interrupt_cpu_s": round(self.machine_interrupts, 3),
            "ours_cpu_s": round(self.ours, 3),
            "foreign_cpu_s": round(self.foreign, 3),
        }


def usage_between(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    machine = after.machine - before.machine
    ours = max(0.0, after.ours - before.ours)
    return CpuUsage(
        machine_busy=machine.busy,
        machine_interrupts=machine.interrupts,
        ours=ours,
        foreign=max(0.0, machine.task - ours),
        proxy=max(0.0, after.proxy - before.proxy),
    )
