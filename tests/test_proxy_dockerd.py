"""pyengine-proxy as a drop-in docker-proxy, proved with the real dockerd (Debian's docker.io).

The test runs its own dockerd, isolated from the host and from other tests: its own data and exec
roots, API socket, config file, trust key, cgroup parent and a ``pye`` bridge on a free subnet.
With ``--iptables=false`` dockerd installs no DNAT rule, so a published port is served only by
the userland proxy it execs, here ``pyengine-proxy``. Everything dockerd started is stopped and
everything it left is removed in the fixture's finalizer, even when a test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import BIN, free_port, require, require_root, require_tool

T = TypeVar("T")
START_TIMEOUT = 60.0
IO_TIMEOUT = 5.0
# Subnets tried for the test bridge, skipping any that a route of the host already covers.
SUBNET_CANDIDATES = [ipaddress.ip_network(f"10.104.{n}.0/24") for n in range(256)]
HOST_TRUST_KEY = Path("/etc/docker/key.json")
UDP_ECHO_SCRIPT = (
    'my $s = IO::Socket::INET->new(LocalPort => 9, Proto => "udp") or die "bind: $!";'
    ' while (1) { my $peer = $s->recv(my $m, 2048); $s->send("echo:" . $m, 0, $peer); }'
)


@dataclass
class DockerDaemon:
    root: Path
    host: str
    bridge: str
    subnet: ipaddress.IPv4Network
    cgroup_parent: str
    process: subprocess.Popen[bytes]
    client: str
    proxy_name: str

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.client, "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "DOCKER_CONFIG": str(self.root / "client")},
        )

    def check(self, *args: str, timeout: float = 120) -> str:
        result = self.docker(*args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")[-4000:]


def _docker_client() -> str:
    # Debian's docker.io client matches the daemon's API; another docker on PATH may be newer.
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return require_tool("docker")


def _free_subnet() -> ipaddress.IPv4Network:
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    taken = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unicast"):
            word = line.split()[1]
        try:
            taken.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for candidate in SUBNET_CANDIDATES:
        if not any(candidate.overlaps(net) for net in taken if net.prefixlen > 0):
            return candidate
    raise AssertionError("no free 10.104.x.0/24 subnet for the dockerd test bridge")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def _proxy_pids_for_port(port: int, name: str = "pyengine-proxy") -> list[int]:
    """Processes named ``name`` (the executable dockerd runs) whose command line publishes host
    port ``port``."""
    found = []
    for pid in _processes_mentioning(name):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"-host-port" in args and args[args.index(b"-host-port") + 1] == str(port).encode():
            found.append(pid)
    return found


def _cgroup_dirs(name: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{name}") if p.is_dir()]


def _remove_cgroup_tree(top: Path) -> None:
    for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            path.rmdir()
    top.rmdir()


def _wait_process_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _stop_dockerd(daemon: DockerDaemon) -> None:
    for cid in daemon.docker("ps", "-a", "-q").stdout.split():
        daemon.docker("rm", "-f", cid)
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        if not _wait_process_exit(daemon.process, 60):
            daemon.process.kill()
            daemon.process.wait()
    # containerd, shims, proxies or containers that outlived dockerd: all name the test's root.
    for pid in _processes_mentioning(str(daemon.root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _unmount_under(root: Path) -> None:
    mounts = [
        line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if line.strip()
    ]
    for target in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


@pytest.fixture(scope="module", params=["pyengine-proxy", "pyengine-docker-proxy"])
def dockerd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path
) -> Iterator[DockerDaemon]:
    require_root()
    dockerd_path = require_tool("dockerd")
    require_tool("containerd")
    require_tool("runc")
    skopeo = require_tool("skopeo")
    client = _docker_client()
    proxy_path = BIN / request.param
    require(os.access(proxy_path, os.X_OK), f"needs {proxy_path} (pip install -e .)")

    root = tmp_path_factory.mktemp("pyedockerd")
    tag = secrets.token_hex(3)
    bridge = f"pyedk{tag}"
    cgroup_parent = f"pyetest-dockerd-{tag}"
    subnet = _free_subnet()
    gateway = next(subnet.hosts())
    # dockerd creates these host directories (empty) on start; removed after if they are ours.
    host_dirs = [
        Path("/run/docker/plugins"),
        Path("/run/docker"),
        Path("/run/containerd/s"),
        Path("/run/containerd"),
    ]
    preexisting = {d for d in host_dirs if d.exists()}
    key_existed = HOST_TRUST_KEY.exists()
    config = {
        # Without this, dockerd 20.10 writes its trust key to /etc/docker/key.json.
        "deprecated-key-path": str(root / "key.json"),
    }
    (root / "daemon.json").write_text(json.dumps(config))
    (root / "client").mkdir()
    # The launcher's host server: its socket under the test's root, so it is the test's own.
    (root / "proxy-rt").mkdir(mode=0o700)

    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    process: subprocess.Popen[bytes] | None = None
    daemon: DockerDaemon | None = None
    try:
        subprocess.run(
            ["ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge], check=True
        )
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        command = [
            dockerd_path,
            "--config-file", str(root / "daemon.json"),
            "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"),
            "-H", f"unix://{root}/docker.sock",
            "--pidfile", str(root / "dockerd.pid"),
            "--bridge", bridge,
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--cgroup-parent", f"/{cgroup_parent}",
            "--userland-proxy=true",
            "--userland-proxy-path", str(proxy_path),
        ]  # fmt: skip
        with open(root / "dockerd.log", "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=root,
                env={**os.environ, "PYENGINE_PROXY_RUNTIME_DIR": str(root / "proxy-rt")},
            )
        daemon = DockerDaemon(
            root,
            f"unix://{root}/docker.sock",
            bridge,
            subnet,
            cgroup_parent,
            process,
            client,
            request.param,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while daemon.docker("version", timeout=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{daemon.log()}")
            time.sleep(0.2)
        archive = root / "nginx-docker.tar"
        subprocess.run(
            [skopeo, "copy", "-q", f"oci-archive:{nginx_archive}",
             f"docker-archive:{archive}:pyetest/nginx:latest"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        daemon.check("load", "-i", str(archive))
        yield daemon
    finally:
        if daemon is not None:
            _stop_dockerd(daemon)
        elif process is not None and process.poll() is None:
            process.kill()
            process.wait()
        _unmount_under(root)
        for top in _cgroup_dirs(cgroup_parent):
            _remove_cgroup_tree(top)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        for directory in host_dirs:
            if directory not in preexisting:
                try:
                    directory.rmdir()
                except OSError:
                    pass
        shutil.rmtree(root / "data", ignore_errors=True)
    assert not _processes_mentioning(str(root)), "a process of the test dockerd is still running"
    assert str(root) not in Path("/proc/mounts").read_text(), "a mount of the test dockerd is left"
    assert not _cgroup_dirs(cgroup_parent), "the test dockerd's cgroups are left"
    assert key_existed or not HOST_TRUST_KEY.exists(), "dockerd wrote /etc/docker/key.json"


def _http_get(port: int) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=IO_TIMEOUT) as response:
        return response.status, response.read()


def _poll(action: Callable[[], T], timeout: float = 30.0) -> T:
    """Call ``action`` until it stops raising OSError (the container may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _udp_ask(host: str, port: int, payload: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(1.0)
        client.sendto(payload, (host, port))
        data, _ = client.recvfrom(65535)
        return data


def _port_is_free(port: int, kind: socket.SocketKind, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        # SO_REUSEADDR: connections the proxy closed first may linger in TIME_WAIT on the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@pytest.mark.privileged
def test_dockerd_publishes_tcp_through_pyengine_proxy(dockerd: DockerDaemon) -> None:
    port = free_port()
    name = f"pyetest-web-{port}"
    dockerd.check("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:80", "pyetest/nginx")
    try:
        proxies = _proxy_pids_for_port(port, dockerd.proxy_name)
        assert len(proxies) == 1, f"expected one {dockerd.proxy_name} for {port}, found {proxies}"
        assert _parent_pid(proxies[0]) == dockerd.process.pid, "the proxy was not run by dockerd"
        status, body = _poll(lambda: _http_get(port))
        assert status == 200
        assert b"nginx" in body
        # Several requests in a row, each on its own connection through the proxy.
        for _ in range(20):
            assert _http_get(port)[0] == 200
    finally:
        dockerd.check("rm", "-f", name)
    # docker rm stops the proxy (SIGTERM, which must exit 0) and the port is free again.
    deadline = time.monotonic() + 10
    while _proxy_pids_for_port(port, dockerd.proxy_name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _proxy_pids_for_port(port, dockerd.proxy_name), "the proxy outlived its container"
    assert _port_is_free(port, socket.SOCK_STREAM)


@pytest.mark.privileged
def test_dockerd_publishes_udp_through_pyengine_proxy(dockerd: DockerDaemon) -> None:
    port = free_port(socket.SOCK_DGRAM)
    name = f"pyetest-udp-{port}"
    dockerd.check(
        "run", "-d", "--name", name, "-p", f"{port}:9/udp",
        "pyetest/nginx", "perl", "-MIO::Socket::INET", "-e", UDP_ECHO_SCRIPT,
    )  # fmt: skip
    try:
        proxies = _proxy_pids_for_port(port, dockerd.proxy_name)
        assert proxies, f"no {dockerd.proxy_name} for udp port {port}"
        assert all(_parent_pid(pid) == dockerd.process.pid for pid in proxies)
        reply = _poll(lambda: _udp_ask("127.0.0.1", port, b"hello"))
        assert reply == b"echo:hello"
        for n in range(20):
            assert _poll(lambda n=n: _udp_ask("127.0.0.1", port, b"%d" % n)) == b"echo:%d" % n
        if len(proxies) == 2:
            # dockerd 20.10 also publishes on "::": an IPv6 listener in front of an IPv4 container.
            assert _poll(lambda: _udp_ask("::1", port, b"six")) == b"echo:six"
    finally:
        dockerd.check("rm", "-f", name)
    deadline = time.monotonic() + 10
    while _proxy_pids_for_port(port, dockerd.proxy_name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _proxy_pids_for_port(port, dockerd.proxy_name), "the proxy outlived its container"
    assert _port_is_free(port, socket.SOCK_DGRAM, "0.0.0.0")


def _host_servers(dockerd: DockerDaemon) -> list[int]:
    """The launcher's host server(s) of this dockerd (its proxies share the command line but
    are named pyengine-proxy)."""
    found = []
    for pid in _processes_mentioning(str(dockerd.root / "proxy-rt")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm != "pyengine-proxy":
            found.append(pid)
    return found


def _http_get_from(host: str, port: int) -> int:
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as response:
        return int(response.status)


@pytest.mark.privileged
def test_dockerd_loopback_both_families_and_a_killed_proxy_server(dockerd: DockerDaemon) -> None:
    """127.0.0.1 and [::1] published by dockerd; with the launcher, killing the host server
    while the ports are published loses neither listener, and docker stop leaves no launcher
    or proxy behind."""
    port4, port6 = free_port(), free_port()
    name = f"pyetest-lo-{port4}"
    dockerd.check(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port4}:80", "-p", f"[::1]:{port6}:80",
        "pyetest/nginx",
    )  # fmt: skip
    try:
        assert _poll(lambda: _http_get_from("127.0.0.1", port4)) == 200
        assert _poll(lambda: _http_get_from("::1", port6)) == 200
        launchers = _proxy_pids_for_port(port4, dockerd.proxy_name)
        launchers += _proxy_pids_for_port(port6, dockerd.proxy_name)
        assert len(launchers) == 2
        assert all(_parent_pid(pid) == dockerd.process.pid for pid in launchers)
        servers = _host_servers(dockerd)
        if dockerd.proxy_name == "pyengine-docker-proxy":
            assert len(servers) == 1, "the launchers share one host server"
            os.kill(servers[0], signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _host_servers(dockerd) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _host_servers(dockerd)
        else:
            assert not servers, "the Python proxy needs no host server"
        # The next connection on each port is served, with or without a server.
        assert _http_get_from("127.0.0.1", port4) == 200
        assert _http_get_from("::1", port6) == 200
        dockerd.check("stop", "-t", "1", name)
        deadline = time.monotonic() + 10
        left = launchers
        while left and time.monotonic() < deadline:
            left = [pid for pid in launchers if Path(f"/proc/{pid}").exists()]
            time.sleep(0.05)
        assert not left, "a proxy process outlived docker stop"
        # The launcher's proxies (forked by the server, now orphans, so named by their
        # comm and the server's command line they share) went with their launchers.
        forked = [pid for pid in _processes_mentioning(str(dockerd.root / "proxy-rt"))]
        assert not [pid for pid in forked if pid not in _host_servers(dockerd)]
        assert _port_is_free(port4, socket.SOCK_STREAM)
    finally:
        dockerd.check("rm", "-f", name)
