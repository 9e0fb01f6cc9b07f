"""pyengined instances the run starts under its own names, and their containers.

Each daemon gets its own socket, data root, bridge, subnet and nftables table, started by
engine/launcher.py (as the lab's and tests/conftest.py's). Stopping one removes its containers
first, then lets the daemon tear its network down; whatever a daemon that died could not
remove is swept here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench import procfs
from client.http import Client, DaemonError, DaemonUnreachable
from common.jsonstate import read_json
from engine import launcher
from engine.runtime.rootfs import mounts_under

BIN = Path(sys.executable).parent
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 60


class BenchDaemonError(Exception):
    pass


@dataclass(frozen=True)
class Publish:
    """One ``-p``: ``host_ip:host_port -> container_port/proto`` ("" host_ip: every address)."""

    host_port: int
    container_port: int
    proto: str = "tcp"
    host_ip: str = ""


@dataclass(frozen=True)
class RunningContainer:
    id: str
    ip: str
    pid: int  # its init process, in the host's pid namespace


def available_backends() -> list[str]:
    """The --firewall-backend choices this pyengined offers (read from its --help)."""
    result = subprocess.run(
        [str(BIN / "pyengined"), "--help"], capture_output=True, text=True, timeout=30
    )
    match = re.search(r"--firewall-backend\s+\[([a-z0-9_|-]+)\]", result.stdout)
    return match.group(1).split("|") if match else ["nftables"]


def port_bindings(publish: list[Publish]) -> dict[str, list[dict[str, str]]]:
    """Docker's HostConfig.PortBindings for ``publish``."""
    bindings: dict[str, list[dict[str, str]]] = {}
    for p in publish:
        bindings.setdefault(f"{p.container_port}/{p.proto}", []).append(
            {"HostIp": p.host_ip, "HostPort": str(p.host_port)}
        )
    return bindings


@dataclass
class BenchDaemon:
    name: str  # its bridge and its nftables table
    bip: str
    userland_proxy: bool
    backend: str
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def mode(self) -> str:
        return "proxy" if self.userland_proxy else "dnat"

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.backend}"

    @property
    def program(self) -> str:
        return "pyengined"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "pyengine.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def data_root(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pyengined.log"

    @property
    def client(self) -> Client:
        return Client(self.host)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "pyengine"), "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    # -- images and containers --------------------------------------------------------------

    def load(self, archive: Path) -> None:
        with open(archive, "rb") as f:
            self.client.load(f)

    def create(
        self,
        image: str,
        publish: list[Publish],
        cmd: list[str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        bindings = port_bindings(publish)
        config: dict[str, Any] = {
            "Image": image,
            "Cmd": cmd,
            "Labels": labels or {},
            "ExposedPorts": {key: {} for key in bindings},
            "HostConfig": {"PortBindings": bindings},
        }
        return self.client.create(None, config)

    def start(self, container_id: str) -> RunningContainer:
        self.client.start(container_id)
        info = self.client.inspect(container_id)
        return RunningContainer(
            container_id, info["NetworkSettings"]["IPAddress"], int(info["State"]["Pid"])
        )

    def run(
        self,
        image: str,
        publish: list[Publish],
        cmd: list[str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> RunningContainer:
        container_id = self.create(image, publish, cmd, labels)
        try:
            return self.start(container_id)
        except BaseException:
            self.remove(container_id)
            raise

    def start_published(self, container_id: str, timeout: float) -> None:
        """POST /containers/ID/start, waiting up to ``timeout`` seconds (dockerd publishing
        thousands of ports takes minutes; Client.start gives up after 120 s)."""
        path = f"/containers/{quote(container_id)}/start"
        self.client.request("POST", path, timeout=timeout).read()

    def remove(self, container_id: str) -> None:
        try:
            self.client.remove(container_id, force=True)
        except DaemonError as exc:
            if exc.status != 404:
                raise

    def remove_all(self) -> None:
        for c in self.client.containers(all=True):
            self.remove(c["Id"])

    def container_cpu_seconds(self, container_id: str) -> float | None:
        return procfs.container_cpu_seconds(container_id)

    def helper_pids(self) -> list[int]:
        """The daemon's helper processes outside containers: proxies (and their fork server)
        and container monitors."""
        return [p for p in procfs.descendants(self.process.pid) if not procfs.in_container(p)]

    def proxy_pid(self, proto: str, host_port: int, host_ip: str = "127.0.0.1") -> int:
        """The pyengine-proxy process serving ``host_ip:host_port/proto``: the innermost of the
        daemon's descendants holding that socket (the daemon keeps a dup of it, and the proxy
        may be exec'd by the daemon or forked by a helper of it)."""
        inode = procfs.bound_socket_inode(proto, host_ip, host_port)
        if inode is not None:
            tree = procfs.process_tree()
            holders = [
                pid
                for pid in procfs.descendants(self.process.pid, tree)
                if procfs.holds_socket(pid, inode)
            ]
            innermost = [
                pid
                for pid in holders
                if not any(other in procfs.descendants(pid, tree) for other in holders)
            ]
            if len(innermost) == 1:
                return innermost[0]
        raise BenchDaemonError(
            f"{self.name}: no pyengine-proxy serves {host_ip}:{host_port}/{proto}"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove every container, stop the daemon, and sweep what it could not remove."""
        try:
            if self.process.poll() is None:
                self.remove_all()
        except (DaemonError, DaemonUnreachable, OSError):
            pass
        finally:
            launcher.stop_process(self.process, STOP_TIMEOUT_SECONDS)
            self.sweep()

    def sweep(self) -> None:
        """Remove what a dead daemon left: containers, mounts, namespaces, veths, its table
        and its bridge. Only objects named in this daemon's own state or flags are touched."""
        delete_runc_containers(self.data_root / "runc")
        for mount_point in mounts_under(self.data_root):
            subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30)
        state = read_json(self.data_root / "network" / "endpoints.json", {}) or {}
        for endpoint in state.get("endpoints", {}).values():
            subprocess.run(["ip", "link", "del", endpoint["host_veth"]], capture_output=True)
            subprocess.run(["ip", "netns", "del", endpoint["netns_name"]], capture_output=True)
        if self.backend == "nftables":
            tables = subprocess.run(
                ["nft", "list", "tables"], capture_output=True, text=True, timeout=30
            ).stdout
            if f"table inet {self.name}" in tables.splitlines():
                subprocess.run(["nft", "delete", "table", "inet", self.name], capture_output=True)
        links = json.loads(
            subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout or "[]"
        )
        if any(link.get("ifname") == self.name for link in links):
            subprocess.run(["ip", "link", "del", self.name], capture_output=True)


def delete_runc_containers(runc_root: Path) -> None:
    """``runc delete -f`` every container runc knows under ``runc_root`` (if it exists)."""
    if not runc_root.is_dir():
        return
    listed = subprocess.run(
        ["runc", "--root", str(runc_root), "list", "-q"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for container_id in listed.stdout.split():
        subprocess.run(
            ["runc", "--root", str(runc_root), "delete", "-f", container_id],
            capture_output=True,
            timeout=30,
        )


def wait_until_answering(daemon: BenchDaemon, what: str) -> None:
    """Until the daemon answers /_ping on its socket; BenchDaemonError when it exits first or
    takes longer than START_TIMEOUT_SECONDS."""
    try:
        launcher.wait_until_answering(
            daemon.process, daemon.socket_path, daemon.log_path, what, START_TIMEOUT_SECONDS
        )
    except launcher.LaunchError as exc:
        raise BenchDaemonError(str(exc)) from None


def start_daemon(
    workdir: Path, name: str, bip: str, userland_proxy: bool, backend: str
) -> BenchDaemon:
    """Start pyengined and wait until it answers; on failure it is stopped again."""
    options = launcher.DaemonOptions(
        socket_path=workdir / "pyengine.sock",
        data_root=workdir / "data",
        bridge=name,
        bip=bip,
        firewall_table=name,
        userland_proxy=userland_proxy,
        firewall_backend=backend,
    )
    launched = launcher.launch(options, workdir / "pyengined.log")
    daemon = BenchDaemon(name, bip, userland_proxy, backend, workdir, launched.process)
    try:
        wait_until_answering(daemon, f"pyengined {name}")
        return daemon
    except BaseException:
        daemon.stop()
        raise
