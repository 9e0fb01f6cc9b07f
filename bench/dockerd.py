"""Debian's dockerd (docker.io 20.10), started by the bench under its own names, and the exact
removal of everything it leaves on the host.

Each dockerd gets its own ``--data-root``, ``--exec-root``, ``--pidfile``, unix socket and
config file (which moves the trust key it writes into its data root instead of /etc/docker),
``--bridge`` to a bridge the bench creates (``pyebd<run><role>``), ``--cgroup-parent
/pyebd<run><role>``, ``--iptables=true`` (its NAT rules are what is compared) and
``--ip-forward=false``: with forwarding off dockerd would switch it on *and* set the FORWARD
policy to DROP; the bench's pyengined have turned it on already, and this way dockerd writes
neither.

What a dockerd leaves on the host, the record of it written before it starts, the machine-wide
lock and the removal (``undo``, ``sweep_stale``) are in ``bench.dockerdhost``;
``DockerDaemon.stop`` removes all of it, and ``python -m bench.dockerd sweep`` what a killed
run's dockerd left.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from bench import dockerproxies, procfs
from bench.daemons import BenchDaemon, BenchDaemonError, wait_until_answering
from bench.dockerarchive import write_docker_archive
from bench.dockerdhost import (
    FAMILIES,
    HOST_DIRS,
    RECORDS,
    SYSCTLS,
    DockerdCleanupError,
    DockerdRecord,
    DockerdUnavailable,
    HostLock,
    cgroup_dirs,
    process_start_time,
    read_records,
    read_value,
    sweep_stale,
    undo,
)
from bench.iptablesdiff import (
    PROGRAMS,
    DockerAdditions,
    current,
    docker_additions,
    is_docker_chain,
    parse_save,
    rule_facts,
    save_text,
)
from bench.tools import which

START_TIMEOUT_SECONDS = 60
# The launcher's host server reads its runtime directory from here (proxy/hostserver.py).
PROXY_RUNTIME_ENV = "PYENGINE_PROXY_RUNTIME_DIR"
PROXY_RUNTIME_DIR = "prt"  # under the dockerd's work directory: short (sun_path), and swept
LAUNCHER = "pyengine-docker-proxy"


def dockerd_binary() -> str | None:
    return which("dockerd")


# -- the daemon -----------------------------------------------------------------------------


@dataclass
class DockerDaemon(BenchDaemon):
    """A dockerd under the bench's names; the same Docker API as pyengined, so the publishing
    study drives both through one code path (``BenchDaemon.create``/``remove``)."""

    record: DockerdRecord | None = None
    lock: HostLock | None = None
    # --userland-proxy-path (pyengine's launcher); None: dockerd's own docker-proxy.
    proxy_path: Path | None = None

    @property
    def program(self) -> str:
        return "dockerd"

    @property
    def label(self) -> str:
        """``dnat/dockerd``, ``proxy/dockerd`` (docker-proxy: the name older results use) or
        ``proxy/dockerd+pyengine-proxy``."""
        if self.proxy_path is not None:
            return f"{self.mode}/dockerd+pyengine-proxy"
        return super().label

    @property
    def proxy_binary(self) -> str:
        """The file name of the proxies dockerd execs."""
        return self.proxy_path.name if self.proxy_path is not None else "docker-proxy"

    @property
    def proxy_runtime_dir(self) -> Path | None:
        """The launcher's host server directory ($PYENGINE_PROXY_RUNTIME_DIR)."""
        return self.workdir / PROXY_RUNTIME_DIR if self.proxy_path is not None else None

    def proxy_processes(self) -> dockerproxies.ProxyProcesses:
        return dockerproxies.find(self.process.pid, self.proxy_binary, self.proxy_runtime_dir)

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
        """containerd and the docker-proxy processes or launchers (dockerd's children),
        containerd's shims (re-parented away from it) and the launcher's host server with the
        proxies it forked, outside containers."""
        assert self.record is not None
        address = str(self.exec_root / "containerd" / "containerd.sock")
        pids = set(procfs.descendants(self.process.pid))
        for pid in procfs.all_pids():
            if address in procfs.cmdline(pid) and pid != self.process.pid:
                pids.add(pid)
        if self.proxy_path is not None:
            pids.update(self.proxy_processes().all)
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


def dockerd_argv(
    binary: str, workdir: Path, bridge: str, userland_proxy: bool, proxy_path: Path | None = None
) -> list[str]:
    path = ["--userland-proxy-path", str(proxy_path)] if proxy_path is not None else []
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
        *path,
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
    workdir: Path,
    name: str,
    subnet: IPv4Network,
    userland_proxy: bool,
    proxy_path: Path | None = None,
) -> DockerDaemon:
    """Start dockerd on a new bridge ``name`` (first address of ``subnet``) and wait until it
    answers; ``proxy_path``: its ``--userland-proxy-path`` (pyengine's launcher, whose host
    server gets a runtime directory under ``workdir``). Raises DockerdUnavailable when it
    cannot run here; on any failure after the snapshot everything is undone."""
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
        owner_start=process_start_time(os.getpid()),
        iptables_before=before,
        sysctls_before={path: read_value(path) for path in SYSCTLS},
        created_dirs=[d for d in HOST_DIRS if not os.path.exists(d)],
    )
    try:
        record.save()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "daemon.json").write_text(
            json.dumps({"deprecated-key-path": str(workdir / "data" / "key.json")}) + "\n"
        )
        env = dict(os.environ)
        if proxy_path is not None:
            # The launcher's host server wants its directory 0700 (proxy/hostserver.py).
            (workdir / PROXY_RUNTIME_DIR).mkdir(mode=0o700)
            env[PROXY_RUNTIME_ENV] = str(workdir / PROXY_RUNTIME_DIR)
        _create_bridge(name, bip)
        with open(workdir / "dockerd.log", "wb") as log:
            process = subprocess.Popen(
                dockerd_argv(binary, workdir, name, userland_proxy, proxy_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # ^C in the terminal reaches the harness only
                env=env,
            )
    except BaseException:
        undo(record)
        lock.release()
        raise
    record.dockerd_pid = process.pid
    daemon = DockerDaemon(
        name, bip, userland_proxy, "dockerd", workdir, process, record, lock, proxy_path
    )
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
    found += [f"cgroup {p}" for p in cgroup_dirs(name)]
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
