"""What a bench dockerd leaves on the host, recorded before it starts, and its exact removal.

One bench dockerd at a time on the machine (``LOCK_PATH``): Docker's chains have fixed names
and dockerd's bridge driver deletes and re-creates them when it starts, so two would fight. It
is not started at all when the host's iptables already hold DOCKER* chains: another dockerd
owns them.

A dockerd leaves behind, even after a clean stop: its chains, jumps and rules in the filter
and nat tables (``bench.iptablesdiff`` removes exactly those), its cgroup parent directories,
/run/docker/plugins and /run/containerd/s (if they were not there before), and its roots;
killed, also container processes, containerd and its shims, and mounts. ``undo`` removes all
of it. What to undo is recorded in ``RECORDS/<name>.json`` before dockerd starts; if the bench
itself is killed, the next start (or ``python -m bench.dockerd sweep``) undoes the records
whose owner is gone (``sweep_stale``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from bench import procfs
from bench.daemons import delete_runc_containers
from bench.iptablesdiff import (
    PROGRAMS,
    IptablesError,
    parse_save,
    remove_docker_additions,
)
from bench.tools import which
from common.jsonstate import read_json, write_json_atomic
from engine.runtime.rootfs import mounts_under

LOCK_PATH = Path("/run/lock/pyebench-dockerd.lock")
RECORDS = Path("/run/pyebench-dockerd")
LOCK_WAIT_SECONDS = 120
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Host directories dockerd and its containerd create outside their roots: the plugin socket
# directory (hard-coded in moby) and containerd's shim socket directory (hard-coded in
# containerd >= 1.5). Removed afterwards only if they did not exist before and are empty.
HOST_DIRS = ("/run/docker", "/run/docker/plugins", "/run/containerd", "/run/containerd/s")
# Host switches dockerd's bridge driver turns on (only when they are off).
SYSCTLS = (
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
)
FAMILIES = (4, 6)


class DockerdUnavailable(Exception):
    """dockerd cannot be measured on this host now (missing, or Docker's chains taken)."""


class DockerdCleanupError(Exception):
    pass


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the pid, it names one process for its whole life."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def read_value(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@dataclass
class DockerdRecord:
    """Everything needed to undo one bench dockerd, written before it starts."""

    name: str  # its bridge and its cgroup parent
    subnet: str
    workdir: str  # holds data/, exec/, the socket, the config and the log
    owner_pid: int  # the bench process that started it
    owner_start: str
    dockerd_pid: int = 0
    iptables_before: dict[str, str] = field(default_factory=dict)  # "4"/"6" -> iptables-save
    sysctls_before: dict[str, str] = field(default_factory=dict)
    created_dirs: list[str] = field(default_factory=list)  # HOST_DIRS absent before the start

    @property
    def path(self) -> Path:
        return RECORDS / f"{self.name}.json"

    @property
    def exec_root(self) -> Path:
        return Path(self.workdir) / "exec"

    @property
    def socket_path(self) -> Path:
        return Path(self.workdir) / "docker.sock"

    def save(self) -> None:
        write_json_atomic(self.path, asdict(self))

    def owner_alive(self) -> bool:
        return process_start_time(self.owner_pid) == self.owner_start

    def before(self, family: int) -> str:
        return self.iptables_before.get(str(family), "")


class HostLock:
    """The machine-wide lock a bench dockerd holds for its whole life (flock(2))."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def acquire(cls, wait_seconds: float = LOCK_WAIT_SECONDS) -> HostLock:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise DockerdUnavailable(
                        f"another pyengine-bench dockerd holds {LOCK_PATH} "
                        f"(waited {wait_seconds:.0f} s)"
                    ) from None
                time.sleep(0.5)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


# -- undo ------------------------------------------------------------------------------------


def _processes_of(record: DockerdRecord) -> list[int]:
    """Live processes of this dockerd: itself, its containerd and containerd's shims (their
    argv names paths under the work directory), and docker-proxy processes forwarding into
    its subnet."""
    found = []
    workdir = record.workdir + "/"
    subnet = IPv4Network(record.subnet)
    me = os.getpid()
    for pid in procfs.all_pids():
        if pid == me:
            continue
        argv = procfs.cmdline(pid)
        if any(workdir in arg for arg in argv):
            found.append(pid)
        elif argv and argv[0].endswith("docker-proxy") and "-container-ip" in argv:
            ip = argv[argv.index("-container-ip") + 1]
            with contextlib.suppress(ValueError):
                if IPv4Network(ip).subnet_of(subnet):
                    found.append(pid)
    return found


def _cgroup_members(name: str) -> list[int]:
    pids: set[int] = set()
    for path in cgroup_dirs(name):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in (path / "cgroup.procs").read_text().split())
    return sorted(pids)


def _kill_processes(record: DockerdRecord) -> list[str]:
    """Stop the containers (runc, then whatever is left in the cgroup parent) and the
    daemon's own processes."""
    failures = []
    delete_runc_containers(record.exec_root / "runtime-runc" / "moby")
    deadline = time.monotonic() + 10
    while pids := _cgroup_members(record.name) + _processes_of(record):
        if time.monotonic() > deadline:
            failures.append(f"processes still running: {pids}")
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return failures


def cgroup_dirs(name: str) -> list[Path]:
    """Every directory of cgroup ``/name`` (v1: one per hierarchy; v2: one), deepest first."""
    tops = [p / name for p in CGROUP_ROOT.iterdir() if (p / name).is_dir()]
    if (CGROUP_ROOT / name).is_dir():
        tops.append(CGROUP_ROOT / name)
    found: list[Path] = []
    for top in tops:
        for root, _dirs, _files in os.walk(top, topdown=False):
            found.append(Path(root))
    return found


def _remove_cgroups(name: str) -> list[str]:
    failures = []
    for path in cgroup_dirs(name):
        try:
            path.rmdir()  # a cgroup directory goes with rmdir(2) once it has no process
        except OSError as exc:
            failures.append(f"cgroup {path}: {exc.strerror}")
    return failures


def _remove_iptables(record: DockerdRecord) -> list[str]:
    failures = []
    for family in FAMILIES:
        before_text = record.before(family)
        if not which(PROGRAMS[family][0]):
            continue
        try:
            before = parse_save(before_text, family)
            remove_docker_additions(before, record.name, (record.subnet,))
        except (IptablesError, OSError, subprocess.TimeoutExpired) as exc:
            failures.append(str(exc))
    return failures


def _restore_sysctls(record: DockerdRecord) -> list[str]:
    failures = []
    for path, value in record.sysctls_before.items():
        if value and read_value(path) not in ("", value):
            try:
                Path(path).write_text(value + "\n")
            except OSError as exc:
                failures.append(f"{path}: {exc.strerror}")
    return failures


def _remove_bridge(name: str) -> list[str]:
    shown = subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, timeout=30)
    if shown.returncode != 0:
        return []
    deleted = subprocess.run(
        ["ip", "link", "del", "dev", name], capture_output=True, text=True, timeout=30
    )
    return [f"bridge {name}: {deleted.stderr.strip()}"] if deleted.returncode else []


def _shim_sockets(record: DockerdRecord) -> list[Path]:
    """The sockets of this dockerd's containerd shims. containerd >= 1.5 puts them in
    /run/containerd/s whatever its --state, named by the sha256 of its address, namespace
    ("moby") and container id (runtime/v2/shim/util_unix.go: SocketAddress); a shim that is
    killed leaves its socket there."""
    address = str(record.exec_root / "containerd" / "containerd.sock")
    containers = Path(record.workdir) / "data" / "containers"
    ids = [p.name for p in containers.iterdir()] if containers.is_dir() else []
    names = [hashlib.sha256(os.path.join(address, "moby", i).encode()).hexdigest() for i in ids]
    return [Path("/run/containerd/s", n) for n in names]


def _remove_host_dirs(record: DockerdRecord) -> list[str]:
    failures = []
    for socket_path in _shim_sockets(record):
        socket_path.unlink(missing_ok=True)
    for path in sorted(record.created_dirs, key=len, reverse=True):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            failures.append(f"{path}: {exc.strerror}")
    return failures


def _remove_workdir(record: DockerdRecord) -> list[str]:
    workdir = Path(record.workdir)
    if not workdir.exists():
        return []
    for mount_point in mounts_under(workdir):
        subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30)
    if mounts_under(workdir):
        return [f"{workdir} still has mounts; left in place"]
    shutil.rmtree(workdir, ignore_errors=True)
    return [f"{workdir} could not be removed"] if workdir.exists() else []


def undo(record: DockerdRecord) -> None:
    """Remove everything the dockerd of ``record`` left, assuming it is stopped or dead (any
    of its processes still alive are killed first). Deletes the record when all went well."""
    failures = _kill_processes(record)
    if not failures:
        for mount_point in mounts_under(Path(record.workdir)):
            subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30)
        failures += _remove_cgroups(record.name)
    failures += _remove_iptables(record)
    failures += _restore_sysctls(record)
    failures += _remove_bridge(record.name)
    failures += _remove_host_dirs(record)
    if not failures:
        failures += _remove_workdir(record)
    if failures:
        raise DockerdCleanupError(f"dockerd {record.name}: {'; '.join(failures)}")
    record.path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        RECORDS.rmdir()


def read_records() -> list[DockerdRecord]:
    records = []
    for path in sorted(RECORDS.glob("*.json")) if RECORDS.is_dir() else []:
        doc = read_json(path)
        if isinstance(doc, dict):
            records.append(DockerdRecord(**doc))
    return records


def sweep_stale() -> list[str]:
    """Undo the records whose bench process is gone; returns their names. Call with the host
    lock held (a live owner holds it, so every record met then is a dead owner's)."""
    swept = []
    for record in read_records():
        if record.owner_alive():
            raise DockerdUnavailable(
                f"dockerd {record.name} of pid {record.owner_pid} is still recorded as running"
            )
        undo(record)
        swept.append(record.name)
    return swept
