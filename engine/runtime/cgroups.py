"""A container's cgroup, as runc made it from the spec's ``cgroupsPath`` (``/pyengine/<id>``):
where its files are under cgroup v1 (one hierarchy per controller, including the v1 side of a
hybrid host) or v2 (the unified hierarchy), and bounded reads of them.

Every read is small and blocking: callers run these off the event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "pyengine"
MAX_READ = 256 * 1024  # a cgroup file (memory.stat, cpuacct.usage_percpu) is far smaller


def unified() -> bool:
    """True on a pure cgroup v2 host (cgroup.controllers at the mount's root)."""
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def cgroups_path(container_id: str) -> str:
    """The spec's ``linux.cgroupsPath`` for a container."""
    return f"/{PARENT}/{container_id}"


@dataclass(frozen=True)
class ContainerCgroup:
    container_id: str
    v2: bool

    @classmethod
    def of(cls, container_id: str) -> ContainerCgroup:
        return cls(container_id, unified())

    def dir(self, controller: str) -> Path:
        """The directory of ``controller`` (v1: cpu, cpuacct, memory, pids, blkio, ...)."""
        if self.v2:
            return CGROUP_ROOT / PARENT / self.container_id
        return CGROUP_ROOT / controller / PARENT / self.container_id

    def read(self, controller: str, name: str) -> str | None:
        """The file's text (at most MAX_READ bytes), None when it does not exist."""
        try:
            fd = os.open(self.dir(controller) / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            return os.read(fd, MAX_READ).decode("ascii", errors="replace")
        except OSError:
            return None
        finally:
            os.close(fd)

    def read_int(self, controller: str, name: str) -> int | None:
        text = self.read(controller, name)
        if text is None:
            return None
        text = text.strip()
        if text == "max":
            return None
        try:
            return int(text)
        except ValueError:
            return None

    def read_keyed(self, controller: str, name: str) -> dict[str, int]:
        """A ``key value`` per line file (memory.stat, cpu.stat, memory.events)."""
        out: dict[str, int] = {}
        for line in (self.read(controller, name) or "").splitlines():
            key, _, value = line.partition(" ")
            try:
                out[key] = int(value.strip())
            except ValueError:
                continue
        return out

    def pids(self) -> list[int]:
        """The processes in the container's cgroup (cgroup.procs: thread-group ids)."""
        out = []
        for line in (self.read("pids", "cgroup.procs") or "").split():
            if line.isdigit():
                out.append(int(line))
        return out

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer took in the cgroup: v1
        memory.oom_control ``oom_kill`` (Linux ≥ 4.13), v2 memory.events ``oom_kill``."""
        if self.v2:
            return self.read_keyed("memory", "memory.events").get("oom_kill", 0)
        return self.read_keyed("memory", "memory.oom_control").get("oom_kill", 0)
