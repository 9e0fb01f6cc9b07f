"""End to end: `pyengine run -d -p PORT:80 nginx` through the daemon, netd, the proxy and runc.

Every test runs once per proxy mode (the ``daemon`` fixture is parametrized). Traffic goes only to
loopback, to the test's own "external" namespace, and to the daemon's own bridge.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon, free_port, require_root, require_tool

EXT_NS = "pyetest-e2ext"
EXT_HOST_IF = "pyee2h"
EXT_NS_IF = "pyee2n"
HOST_ADDR = "198.19.0.1"
EXT_ADDR = "198.19.0.2"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class ExternalHost:
    """A namespace joined to the host by a veth: the 'LAN client' and 'internet server'."""

    netns: str
    addr: str
    host_addr: str

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.netns, *cmd, check=False, timeout=timeout)

    def popen(self, *cmd: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *cmd],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


@pytest.fixture(scope="module")
def external() -> Iterator[ExternalHost]:
    require_root()
    require_tool("ip")
    sh("ip", "netns", "del", EXT_NS, check=False)
    sh("ip", "link", "del", EXT_HOST_IF, check=False)
    try:
        sh("ip", "netns", "add", EXT_NS)
        sh("ip", "link", "add", EXT_HOST_IF, "type", "veth", "peer", "name", EXT_NS_IF)
        sh("ip", "link", "set", EXT_NS_IF, "netns", EXT_NS)
        sh("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", EXT_HOST_IF)
        sh("ip", "link", "set", EXT_HOST_IF, "up")
        sh("ip", "-n", EXT_NS, "addr", "add", f"{EXT_ADDR}/30", "dev", EXT_NS_IF)
        sh("ip", "-n", EXT_NS, "link", "set", EXT_NS_IF, "up")
        sh("ip", "-n", EXT_NS, "link", "set", "lo", "up")
        yield ExternalHost(EXT_NS, EXT_ADDR, HOST_ADDR)
    finally:
        sh("ip", "link", "del", EXT_HOST_IF, check=False)
        sh("ip", "netns", "del", EXT_NS, check=False)


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def wait_http(url: str, deadline_s: float = 20) -> tuple[int, str]:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return http_get(url, timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def nginx(daemon: Daemon) -> Iterator[tuple[str, int]]:
    port = free_port()
    result = daemon.cli("run", "-d", "-p", f"{port}:80", "nginx", check=True)
    cid = result.stdout.strip()
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        yield cid, port
    finally:
        daemon.cli("rm", "-f", cid)


def inspect(daemon: Daemon, ref: str) -> dict:
    return json.loads(daemon.cli("inspect", ref, check=True).stdout)[0]


def test_nginx_answers_on_loopback(daemon: Daemon, nginx: tuple[str, int]) -> None:
    cid, port = nginx
    status, body = http_get(f"http://127.0.0.1:{port}/")
    assert status == 200
    assert "Welcome to nginx" in body
    # Docker 28: with the proxy, [::] too (the host has IPv6; tests/test_netd_ipv6.py).
    expected = [f"80/tcp -> 0.0.0.0:{port}"]
    if daemon.userland_proxy:
        expected.append(f"80/tcp -> [::]:{port}")
    assert daemon.cli("port", cid, check=True).stdout.splitlines() == expected
    ps = daemon.cli("ps", check=True).stdout
    assert cid[:12] in ps and f"0.0.0.0:{port}->80/tcp" in ps


def test_nginx_answers_external_client(
    daemon: Daemon, nginx: tuple[str, int], external: ExternalHost
) -> None:
    _, port = nginx
    out = external.run("curl", "-sS", "--max-time", "5", f"http://{external.host_addr}:{port}/")
    assert out.returncode == 0, out.stderr
    assert "Welcome to nginx" in out.stdout


def test_nginx_answers_other_container_hairpin(daemon: Daemon, nginx: tuple[str, int]) -> None:
    _, port = nginx
    # busybox's static wget crashes in glibc's NSS; nc speaks the HTTP request as well.
    request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {daemon.gateway} {port}"
    out = daemon.cli("run", "--rm", "busybox", "sh", "-c", request)
    assert out.returncode == 0, out.stderr
    assert "Welcome to nginx" in out.stdout


def test_container_reaches_outside_through_masquerade(
    daemon: Daemon, external: ExternalHost
) -> None:
    port = free_port()
    # A server in the external namespace that answers with the address it sees the client as.
    server = external.popen(
        "socat",
        f"TCP-LISTEN:{port},bind={external.addr},reuseaddr,fork",
        "SYSTEM:echo peer=$SOCAT_PEERADDR",
    )
    try:
        time.sleep(0.3)
        out = daemon.cli(
            "run", "--rm", "busybox", "sh", "-c", f"nc {external.addr} {port} </dev/null"
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"peer={external.host_addr}"
    finally:
        server.terminate()
        server.wait(timeout=5)


def test_foreground_run_streams_output_and_exit_code(daemon: Daemon) -> None:
    out = daemon.cli(
        "run",
        "--rm",
        "--name",
        "pyetest-fg",
        "busybox",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    )
    assert out.returncode == 3
    assert out.stdout == "out\n"
    assert out.stderr == "err\n"
    assert "pyetest-fg" not in daemon.cli("ps", "-a", check=True).stdout


def test_logs_and_stop_with_image_stop_signal(daemon: Daemon, nginx: tuple[str, int]) -> None:
    cid, port = nginx
    with pytest.raises(urllib.error.HTTPError, match="404"):
        http_get(f"http://127.0.0.1:{port}/pyetest-marker")
    deadline = time.monotonic() + 5
    while "pyetest-marker" not in daemon.cli("logs", cid).stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "GET /pyetest-marker" in daemon.cli("logs", cid, check=True).stdout
    started = time.monotonic()
    daemon.cli("stop", cid, check=True)
    # nginx's StopSignal is SIGQUIT: a graceful exit with code 0, well before the 10 s timeout.
    assert time.monotonic() - started < 8
    state = inspect(daemon, cid)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0


def _kernel_state(daemon: Daemon) -> dict[str, str]:
    return {
        # only the links on this daemon's bridge: other tests may add their own links meanwhile
        "links": sh("ip", "-br", "link", "show", "master", daemon.bridge).stdout,
        "netns": sh("ip", "netns", "list").stdout,
        "nft": sh("nft", "list", "table", "inet", daemon.table, check=False).stdout,
        "procs": sh("ps", "-eww", "-o", "args").stdout,
        "mounts": Path("/proc/mounts").read_text(),
    }


def _listeners(port: int) -> str:
    """Processes with a TCP socket listening on ``port`` (the proxy, in userland-proxy mode)."""
    return sh("ss", "-Htlnp", f"sport = :{port}").stdout.strip()


def _link_names(state: dict[str, str]) -> set[str]:
    return {line.split()[0].split("@")[0] for line in state["links"].splitlines()}


def test_rm_force_removes_everything(daemon: Daemon) -> None:
    port = free_port()
    cid = daemon.cli("run", "-d", "-p", f"{port}:80", "nginx", check=True).stdout.strip()
    wait_http(f"http://127.0.0.1:{port}/")
    info = inspect(daemon, cid)
    netns = Path(info["NetworkSettings"]["SandboxKey"]).name
    during = _kernel_state(daemon)
    assert netns in during["netns"]
    assert str(port) in during["nft"]
    assert cid in during["mounts"]
    if daemon.userland_proxy:
        assert _listeners(port), "no proxy listens on the published port"
    daemon.cli("rm", "-f", cid, check=True)
    after = _kernel_state(daemon)
    assert netns not in after["netns"]
    assert str(port) not in after["nft"]
    assert cid not in after["mounts"]
    assert not _listeners(port)
    assert not (daemon.data_root / "containers" / cid).exists()
    gone = _link_names(during) - _link_names(after)
    assert any(name.startswith("pye") for name in gone), "the container's veth was not removed"
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{port}/", timeout=2)


def test_bad_publish_spec_is_one_line_error(daemon: Daemon) -> None:
    before = daemon.cli("ps", "-a", "-q", check=True).stdout
    out = daemon.cli("run", "-d", "-p", "8080:abc", "nginx")
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "abc" in out.stderr
    assert daemon.cli("ps", "-a", "-q", check=True).stdout == before


def test_unknown_image_is_one_line_error(daemon: Daemon) -> None:
    out = daemon.cli("run", "-d", "pyetest-no-such-image")
    assert out.returncode != 0
    assert "No such image" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("Error response from daemon:")


def test_unknown_container_is_one_line_error(daemon: Daemon) -> None:
    for verb in (("rm", "-f"), ("stop",), ("logs",), ("port",)):
        out = daemon.cli(*verb, "pyetest-no-such-container")
        assert out.returncode == 1
        assert out.stderr.strip() == (
            "Error response from daemon: No such container: pyetest-no-such-container"
        )


def test_port_in_use_by_another_program_leaves_nothing(daemon: Daemon) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("0.0.0.0", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        before = _kernel_state(daemon)
        out = daemon.cli("run", "-d", "--name", "pyetest-busy", "-p", f"{port}:80", "nginx")
        assert out.returncode != 0
        assert len(out.stderr.strip().splitlines()) == 1
        assert str(port) in out.stderr and "in use" in out.stderr
        after = _kernel_state(daemon)
        cid = inspect(daemon, "pyetest-busy")["Id"]
        assert f"pyengine-{cid[:12]}" not in after["netns"]
        assert after["nft"] == before["nft"]
        assert _link_names(after) == _link_names(before)
        # As Docker: the container exists, created but never started.
        assert inspect(daemon, "pyetest-busy")["State"]["Status"] == "created"
    finally:
        blocker.close()
        daemon.cli("rm", "-f", "pyetest-busy")
