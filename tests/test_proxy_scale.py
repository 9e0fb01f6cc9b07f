"""Proxy mode with many published ports through the real daemon: one container's proxies start
as one batch and every port answers; ``rm -f`` frees them all in one pass; a publish the
daemon's open files limit cannot hold is refused in one line with nothing left behind; a port
on both families is one proxy process."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, start_daemon, stop_daemon

BRIDGE, BIP = "pyeq0", "10.195.0.1/24"
COUNT = 400


@pytest.fixture(scope="module")
def proxy_daemon(tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp(BRIDGE), BRIDGE, BIP, True)
    try:
        d.cli("load", "-i", str(nginx_archive), check=True)
        yield d
    finally:
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
        stop_daemon(d)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` ports nothing holds on 127.0.0.1, below the ephemeral range."""
    start = random.randrange(20000, 30000 - 2 * count)
    ports = [p for p in range(start, start + 2 * count) if port_is_free(p)]
    assert len(ports) >= count, "no room for the test's ports"
    return ports[:count]


def unanswered(ports: list[int]) -> list[int]:
    silent = []
    for port in ports:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            silent.append(port)
    return silent


def http_status(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        return conn.recv(64).decode(errors="replace").split("\r\n")[0]


def publish_args(ports: list[int]) -> list[str]:
    return [arg for port in ports for arg in ("-p", f"127.0.0.1:{port}:80")]


def test_many_ports_start_as_one_batch_and_go_in_one_pass(proxy_daemon: Daemon) -> None:
    d = proxy_daemon
    ports = free_ports(COUNT)
    cid = d.cli("run", "-d", *publish_args(ports), "nginx", check=True).stdout.strip()
    try:
        assert unanswered(ports) == []
        for port in (ports[0], ports[COUNT // 2], ports[-1]):
            assert " 200 " in http_status(port) + " "
        records = list((d.data_root / "proxies").glob("*.json"))
        assert len(records) == 1  # one file per container
        assert len(json.loads(records[0].read_text())["proxies"]) == COUNT
        inspect = json.loads(d.cli("inspect", cid, check=True).stdout)[0]
        assert len(inspect["NetworkSettings"]["Ports"]["80/tcp"]) == COUNT
    finally:
        d.cli("rm", "-f", cid, check=True)
    assert [p for p in ports if not port_is_free(p)] == []
    assert not (d.data_root / "proxies").exists()


def test_a_publish_past_the_open_files_limit_is_refused_in_one_line(
    proxy_daemon: Daemon,
) -> None:
    d = proxy_daemon
    pid = d.process.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    # Room for the port reservations, not for the proxies' fds on top.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (held + COUNT + 600, hard))
    ports = free_ports(COUNT)
    try:
        result = d.cli("run", "-d", "--name", "pyeq-too-many", *publish_args(ports), "nginx")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert result.returncode != 0
        message = result.stderr.strip()
        assert "RLIMIT_NOFILE" in message and "\n" not in message, message
        assert "Traceback" not in d.log()
        assert [p for p in ports if not port_is_free(p)] == []
        state = json.loads(d.cli("inspect", "pyeq-too-many", check=True).stdout)[0]["State"]
        assert not state["Running"]
        assert not (d.data_root / "proxies").exists()
    finally:
        with contextlib.suppress(Exception):
            d.cli("rm", "-f", "pyeq-too-many")


def listening_pids(port: int) -> dict[str, set[int]]:
    """The pids holding each listening TCP socket on ``port``, by local address (ss(8))."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, set[int]] = {}
    for line in out.splitlines():
        fields = line.split()
        address = fields[3].rsplit(":", 1)[0]
        found.setdefault(address, set()).update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return found


def answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return False
    return True


def test_a_port_on_both_families_is_one_proxy_that_survives_a_crash(
    proxy_daemon: Daemon,
) -> None:
    """``-p P:80`` listens on 0.0.0.0 and ::, one proxy process holding both (fds 4 and 5):
    N ports cost N processes, and a killed proxy comes back on both sockets."""
    d = proxy_daemon
    ports = free_ports(3)
    args = [a for port in ports for a in ("-p", f"{port}:80")]
    cid = d.cli("run", "-d", *args, "nginx", check=True).stdout.strip()
    try:
        pids = []
        for port in ports:
            holders = listening_pids(port)
            # The daemon holds its reservation too: the proxy is the pid that is not the daemon's.
            proxy4 = holders["0.0.0.0"] - {d.process.pid}
            proxy6 = holders["[::]"] - {d.process.pid}
            assert len(proxy4) == 1 and proxy4 == proxy6, holders
            pids.append(proxy4.pop())
            assert answers("127.0.0.1", port) and answers("::1", port)
        assert len(set(pids)) == len(ports)
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (listening_pids(ports[0])["0.0.0.0"] - {d.process.pid}) in (set(), {pids[0]}):
            assert time.monotonic() < deadline, "the killed proxy was not restarted"
            time.sleep(0.05)
        holders = listening_pids(ports[0])
        assert holders["0.0.0.0"] == holders["[::]"]
        assert " 200 " in http_status(ports[0]) + " "
        assert answers("::1", ports[0])
    finally:
        d.cli("rm", "-f", cid, check=True)
    assert [p for p in ports if not port_is_free(p)] == []
