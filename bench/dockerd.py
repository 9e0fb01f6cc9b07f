"""Debian's dockerd (docker.io 20.10), started by the bench under its own names, and the exact
removal of everything it leaves on the host.

Each dockerd gets its own ``--data-root``, ``--exec-root``, ``--pidfile``, unix socket and
config file (which moves the trust key it writes into its data root instead of /etc/docker),
``--bridge`` to a bridge the bench creates (``pyebd<run><role>``), ``--cgroup-parent
/pyebd<run><role>``, ``--iptables=true`` (its NAT rules are what is compared) and
``--ip-forward=false``: with forwarding off dockerd would switch it on *and* set the FORWARD
policy to DROP; the bench's pyengined have turned it on already, and this way dockerd writes
neither.

One bench dockerd at a time on the machine (``LOCK_PATH``): Docker's chains have fixed names
and dockerd's bridge driver deletes and re-creates them when it starts, so two would fight. It
is not started at all when the host's iptables already hold DOCKER* chains: another dockerd
owns them.

A dockerd leaves behind, even after a clean stop: its chains, jumps and rules in the filter
and nat tables (``bench.iptablesdiff`` removes exactly those), its cgroup parent directories,
/run/docker/plugins and /run/containerd/s (if they were not there before), and its roots;
killed, also container processes, containerd and its shims, and mounts. ``DockerDaemon.stop``
removes all of it. What to undo is recorded in ``RECORDS/<name>.json`` before dockerd
starts; if the bench itself is killed, the next start (or ``python -m bench.dockerd sweep``)
undoes the records whose owner is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from bench import procfs
from bench.daemons import (
    BenchDaemon,
    BenchDaemonError,
    delete_runc_containers,
    wait_until_answering,
)
from bench.dockerarchive import write_docker_archive
from bench.iptablesdiff import (
    PROGRAMS,
    DockerAdditions,
    IptablesError,
    current,
    docker_additions,
    is_docker_chain,
    parse_save,
    remove_docker_additions,
    rule_facts,
    save_text,
)
from bench.tools import which
from common.jsonstate import read_json, write_json_atomic
from engine.runtime.rootfs import mounts_under

LOCK_PATH = Path("/run/lock/pyebench-dockerd.lock")
RECORDS = Path("/run/pyebench-dockerd")
LOCK_WAIT_SECONDS = 120
START_TIMEOUT_SECONDS = 60
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


def dockerd_binary() -> str | None:
    return which("dockerd")


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the pid, it names one process for its whole life."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _read(path: str) -> str:
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
        return _start_time(self.owner_pid) == self.owner_start

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
    for path in _cgroup_dirs(name):
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


def _cgroup_dirs(name: str) -> list[Path]:
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
    for path in _cgroup_dirs(name):
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
        if value and _read(path) not in ("", value):
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


# -- the daemon -----------------------------------------------------------------------------


@dataclass
class DockerDaemon(BenchDaemon):
    """A dockerd under the bench's names; the same Docker API as pyengined, so the publishing
    study drives both through one code path (``BenchDaemon.create``/``remove``)."""

    record: DockerdRecord | None = None
    lock: HostLock | None = None

    @property
    def program(self) -> str:
        return "dockerd"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def data_root(self) -> Path:
        return self.workdir / "data"

    @property
    def exec_root(self) -> Path:
        return self.workdir / "exec"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def subnet(self) -> str:
        return str(IPv4Network(self.bip, strict=False))

    def load(self, archive: Path) -> None:
        """Load an OCI layout archive (converted to the layout Docker 20.10 reads)."""
        converted = self.workdir / f"{archive.stem}-docker.tar"
        write_docker_archive(archive, converted)
        try:
            with open(converted, "rb") as f:
                self.client.load(f)
        finally:
            converted.unlink(missing_ok=True)

    def container_cpu_seconds(self, container_id: str) -> float | None:
        # Full container ids under --cgroup-parent /NAME (cgroupfs driver).
        return procfs.container_cpu_seconds(container_id, parent=self.name)

    def added_rules(self) -> DockerAdditions:
        """The IPv4 rules this dockerd holds in the host's tables now."""
        assert self.record is not None
        before = parse_save(self.record.before(4), 4)
        return docker_additions(before, current(4), self.name, (self.subnet,))

    def helper_pids(self) -> list[int]:
        """containerd and the docker-proxy processes (dockerd's children) and containerd's
        shims (re-parented away from it), outside containers."""
        assert self.record is not None
        address = str(self.exec_root / "containerd" / "containerd.sock")
        pids = set(procfs.descendants(self.process.pid))
        for pid in procfs.all_pids():
            if address in procfs.cmdline(pid) and pid != self.process.pid:
                pids.add(pid)
        return sorted(p for p in pids if not procfs.in_container(p))

    def sweep(self) -> None:
        if self.record is None:
            return
        try:
            undo(self.record)
            self.record = None
        finally:
            if self.record is None and self.lock is not None:
                self.lock.release()
                self.lock = None


def dockerd_argv(binary: str, workdir: Path, bridge: str, userland_proxy: bool) -> list[str]:
    return [
        binary,
        "--config-file",
        str(workdir / "daemon.json"),
        "-H",
        f"unix://{workdir / 'docker.sock'}",
        "--data-root",
        str(workdir / "data"),
        "--exec-root",
        str(workdir / "exec"),
        "--pidfile",
        str(workdir / "dockerd.pid"),
        "--bridge",
        bridge,
        "--cgroup-parent",
        f"/{bridge}",
        "--iptables=true",
        "--ip-forward=false",
        f"--userland-proxy={'true' if userland_proxy else 'false'}",
        "--storage-driver",
        "overlay2",
    ]


def _create_bridge(name: str, bip: str) -> None:
    for argv in (
        ["ip", "link", "add", name, "type", "bridge"],
        ["ip", "addr", "add", bip, "dev", name],
        ["ip", "link", "set", name, "up"],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise BenchDaemonError(f"{' '.join(argv)}: {result.stderr.strip()}")


def start_dockerd(
    workdir: Path, name: str, subnet: IPv4Network, userland_proxy: bool
) -> DockerDaemon:
    """Start dockerd on a new bridge ``name`` (first address of ``subnet``) and wait until it
    answers. Raises DockerdUnavailable when it cannot run here; on any failure after the
    snapshot everything is undone."""
    binary = dockerd_binary()
    if binary is None:
        raise DockerdUnavailable("dockerd is not installed (apt-get install docker.io)")
    if len(name) > 15:
        raise ValueError(f"bridge name {name!r} is longer than IFNAMSIZ - 1")
    lock = HostLock.acquire()
    try:
        swept = sweep_stale()
        if swept:
            print(f"removed what killed runs' dockerd left: {', '.join(swept)}", file=sys.stderr)
        before = {str(f): save_text(f) if which(PROGRAMS[f][0]) else "" for f in FAMILIES}
        taken = [c for f in FAMILIES for c in parse_save(before[str(f)], f).docker_chains()]
        if taken:
            raise DockerdUnavailable(
                f"the host's iptables already hold Docker's chains ({', '.join(taken)}): "
                "another dockerd owns them"
            )
    except BaseException:
        lock.release()
        raise
    bip = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    record = DockerdRecord(
        name=name,
        subnet=str(subnet),
        workdir=str(workdir),
        owner_pid=os.getpid(),
        owner_start=_start_time(os.getpid()),
        iptables_before=before,
        sysctls_before={path: _read(path) for path in SYSCTLS},
        created_dirs=[d for d in HOST_DIRS if not os.path.exists(d)],
    )
    try:
        record.save()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "daemon.json").write_text(
            json.dumps({"deprecated-key-path": str(workdir / "data" / "key.json")}) + "\n"
        )
        _create_bridge(name, bip)
        with open(workdir / "dockerd.log", "wb") as log:
            process = subprocess.Popen(
                dockerd_argv(binary, workdir, name, userland_proxy),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # ^C in the terminal reaches the harness only
            )
    except BaseException:
        undo(record)
        lock.release()
        raise
    record.dockerd_pid = process.pid
    daemon = DockerDaemon(name, bip, userland_proxy, "dockerd", workdir, process, record, lock)
    try:
        record.save()
        wait_until_answering(daemon, f"dockerd {name}")
        return daemon
    except BaseException:
        daemon.stop()
        raise


def leftovers(name: str, subnet: str) -> list[str]:
    """What is still on the host of the bench dockerd ``name`` on ``subnet`` (expected:
    nothing)."""
    found = []
    if (RECORDS / f"{name}.json").exists():
        found.append(f"record {RECORDS / f'{name}.json'}")
    if subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0:
        found.append(f"link {name}")
    found += [f"cgroup {p}" for p in _cgroup_dirs(name)]
    nothing = parse_save("", 4)
    left = docker_additions(nothing, current(4), name, (subnet,))
    for table, t in left.tables.items():
        found += [f"iptables {table} rule {line!r}" for line in t.rules if not _is_chain_jump(line)]
        if t.chains and _no_bench_dockerd_running():
            found += [f"iptables {table} chain {chain}" for chain in t.chains]
    return found


def _is_chain_jump(line: str) -> bool:
    # Without a snapshot every DOCKER* jump looks like this dockerd's: the chains are reported
    # instead, and only while no other bench dockerd (which would own them) runs.
    return is_docker_chain(rule_facts(line).target)


def _no_bench_dockerd_running() -> bool:
    try:
        HostLock.acquire(wait_seconds=0).release()
    except DockerdUnavailable:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dockerd",
        description="Remove what pyengine-bench's dockerd runs left when they were killed.",
    )
    parser.add_argument("action", choices=["sweep", "list"])
    args = parser.parse_args(argv)
    if args.action == "list":
        for record in read_records():
            state = "running" if record.owner_alive() else "stale"
            print(f"{record.name} {state} owner {record.owner_pid} {record.workdir}")
        return 0
    try:
        lock = HostLock.acquire(wait_seconds=0)
    except DockerdUnavailable as exc:
        print(f"bench.dockerd: {exc}", file=sys.stderr)
        return 1
    try:
        swept = sweep_stale()
    except (DockerdUnavailable, DockerdCleanupError) as exc:
        print(f"bench.dockerd: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    print(f"removed: {', '.join(swept)}" if swept else "nothing to remove")
    return 0


if __name__ == "__main__":
    sys.exit(main())
