"""Live restore (Docker's ``--live-restore``, pyengined's default): containers outlive a daemon
stop (SIGTERM) or crash (SIGKILL), and the next daemon adopts them again.

Per proxy mode: nginx published on a host port keeps running while no daemon runs; in kernel
DNAT mode the port answers throughout (the rules stay), in proxy mode the proxies die with the
daemon and the next daemon starts new ones at once (the gap is measured and printed). A
container that exits while the daemon is down gets the exit code its monitor recorded.
Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    start_daemon,
    stop_daemon,
)

MODES = {
    True: ("pyelr0", "10.70.0.1/24"),
    False: ("pyelr1", "10.71.0.1/24"),
}
DOWN_EXIT_CODE = 7


def http_ok(port: int, timeout: float = 2.0) -> bool:
    """One fresh connection to 127.0.0.1:port that gets nginx's 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def wait_http(port: int, timeout: float = 30) -> float:
    """Seconds until the port answers; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if http_ok(port):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"127.0.0.1:{port} did not answer within {timeout} s")


@dataclass
class PortProbe:
    """Probes a port every 20 ms in a thread (bounded by ``limit`` seconds) and keeps the
    outcome of every probe with its time."""

    port: int
    limit: float = 180.0
    results: list[tuple[float, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PortProbe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.results.append((time.monotonic(), http_ok(self.port, timeout=1.0)))
            self._stop.wait(0.02)

    @property
    def failures(self) -> int:
        return sum(1 for _, ok in self.results if not ok)

    def back_after(self, since: float) -> float:
        """Seconds from ``since`` to the first successful probe after it."""
        back = next((t for t, ok in self.results if ok and t > since), None)
        assert back is not None, "the port never answered again"
        return back - since

    def gap(self) -> float:
        """Seconds from the first failed probe to the first success after it (0 if none)."""
        first_fail = next((t for t, ok in self.results if not ok), None)
        if first_fail is None:
            return 0.0
        back = next((t for t, ok in self.results if ok and t > first_fail), None)
        assert back is not None, "the port never answered again"
        return back - first_fail


def recovery_line(d: Daemon) -> str:
    """The daemon's own account of its start: how long setup() + recover() took."""
    lines = [line for line in d.log().splitlines() if "state recovered in" in line]
    return lines[-1].split(": ", 1)[-1] if lines else "no recovery line"


def inspect(d: Daemon, ref: str) -> dict:
    return json.loads(d.cli("inspect", ref, check=True).stdout)[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid), f"pid {pid} still alive after {timeout} s"


def kill_daemon(d: Daemon, sig: signal.Signals) -> None:
    d.process.send_signal(sig)
    d.process.wait(timeout=60)


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def table_exists(name: str) -> bool:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return f"inet {name}" in out


@dataclass
class Lab:
    tmp: Path
    name: str
    bip: str
    userland_proxy: bool
    daemon: Daemon

    def restart(self) -> Daemon:
        self.daemon = start_daemon(self.tmp, self.name, self.bip, self.userland_proxy)
        return self.daemon


@pytest.fixture(params=[True, False], ids=["userland-proxy", "kernel-dnat"])
def lab(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    nginx_archive: Path,
    busybox_archive: Path,
) -> Iterator[Lab]:
    userland_proxy: bool = request.param
    name, bip = MODES[userland_proxy]
    tmp = tmp_path_factory.mktemp(name)
    lab = Lab(tmp, name, bip, userland_proxy, start_daemon(tmp, name, bip, userland_proxy))
    try:
        lab.daemon.cli("load", "-i", str(nginx_archive), check=True)
        lab.daemon.cli("load", "-i", str(busybox_archive), check=True)
        yield lab
    finally:
        # Whatever state the test left: a daemon adopts what still runs, and removes it all.
        if lab.daemon.process.poll() is not None:
            lab.restart()
        for cid in lab.daemon.cli("ps", "-a", "-q").stdout.split():
            lab.daemon.cli("rm", "-f", cid)
        stop_daemon(lab.daemon)
    assert_nothing_left(lab.daemon)


def test_containers_survive_daemon_restarts(lab: Lab) -> None:
    d = lab.daemon
    port = free_port()
    web = d.cli("run", "-d", "--name", "lr-web", "-p", f"{port}:80", "nginx", check=True)
    web_id = web.stdout.strip()
    wait_http(port)
    short = d.cli(
        "run",
        "-d",
        "--name",
        "lr-short",
        "busybox",
        "sh",
        "-c",
        f"sleep 6; exit {DOWN_EXIT_CODE}",
        check=True,
    ).stdout.strip()
    before = inspect(d, web_id)
    short_pid = inspect(d, short)["State"]["Pid"]

    # ---- SIGTERM: the daemon goes, the containers and (DNAT) the rules stay.
    with PortProbe(port) as down_probe:
        time.sleep(0.3)
        kill_daemon(d, signal.SIGTERM)
        assert "live restore: leaving 2 container(s) running" in d.log()
        assert pid_alive(before["State"]["Pid"])
        assert link_exists(lab.name) and table_exists(lab.name)
        wait_gone(short_pid)  # it exits while no daemon runs
        time.sleep(0.5)
        restarted_at = time.monotonic()
        d = lab.restart()
        wait_http(port)
        time.sleep(0.5)
    if lab.userland_proxy:
        # The proxies died with the daemon: no answer until the next daemon started new ones.
        print(
            f"\nproxy mode, SIGTERM: port {port} did not answer for {down_probe.gap():.2f} s; "
            f"{down_probe.back_after(restarted_at):.2f} s of it after the new daemon was "
            f"launched ({recovery_line(d)})"
        )
    else:
        assert down_probe.failures == 0, "the published port stopped answering in DNAT mode"
        assert len(down_probe.results) > 20
    assert "live restore: adopting container" in d.log()

    # ---- the new daemon knows both: the adopted one runs, the other one's exit is recorded.
    running = d.cli("ps", "-q", check=True).stdout.split()
    assert len(running) == 1 and web_id.startswith(running[0]), running
    info = inspect(d, web_id)
    assert info["State"]["Running"] is True
    assert info["State"]["Pid"] == before["State"]["Pid"]
    assert info["NetworkSettings"]["Ports"] == before["NetworkSettings"]["Ports"]
    assert info["NetworkSettings"]["IPAddress"] == before["NetworkSettings"]["IPAddress"]
    gone = inspect(d, short)["State"]
    assert gone["Running"] is False
    assert gone["ExitCode"] == DOWN_EXIT_CODE
    assert f"Exited ({DOWN_EXIT_CODE})" in d.cli("ps", "-a", check=True).stdout
    assert http_ok(port)

    # ---- SIGKILL: nothing is cleaned up at all; the next daemon adopts it the same way.
    with PortProbe(port) as crash_probe:
        time.sleep(0.3)
        kill_daemon(d, signal.SIGKILL)
        time.sleep(1.0)
        assert pid_alive(before["State"]["Pid"])
        relaunched_at = time.monotonic()
        d = lab.restart()
        wait_http(port)
        time.sleep(0.5)
    if not lab.userland_proxy:
        assert crash_probe.failures == 0
    else:
        print(
            f"proxy mode, SIGKILL: no answer for {crash_probe.gap():.2f} s; "
            f"{crash_probe.back_after(relaunched_at):.2f} s of it after the new daemon was "
            f"launched ({recovery_line(d)})"
        )
    info = inspect(d, web_id)
    assert info["State"]["Running"] is True
    assert info["State"]["Pid"] == before["State"]["Pid"]

    # ---- the adopted container is fully managed: stop records its exit and frees the port.
    assert d.cli("stop", "-t", "2", web_id).returncode == 0
    state = inspect(d, web_id)["State"]
    assert state["Running"] is False
    assert state["ExitCode"] == 0
    assert not pid_alive(before["State"]["Pid"])
    assert not http_ok(port)
    assert d.cli("start", web_id).returncode == 0
    wait_http(port)


def test_live_restore_false_stops_everything(
    tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path
) -> None:
    name, bip = MODES[False]
    tmp = tmp_path_factory.mktemp(f"{name}-off")
    d = start_daemon(tmp, name, bip, False, "--live-restore=false")
    try:
        d.cli("load", "-i", str(nginx_archive), check=True)
        port = free_port()
        cid = d.cli("run", "-d", "-p", f"{port}:80", "nginx", check=True).stdout.strip()
        wait_http(port)
        pid = inspect(d, cid)["State"]["Pid"]
        kill_daemon(d, signal.SIGTERM)
        assert not pid_alive(pid)
        assert not http_ok(port)
        assert_nothing_left(d)
        # A daemon without live restore does not adopt what a crashed one left running either.
        d = start_daemon(tmp, name, bip, False, "--live-restore=false")
        assert d.cli("start", cid).returncode == 0
        wait_http(port)
        pid = inspect(d, cid)["State"]["Pid"]
        kill_daemon(d, signal.SIGKILL)
        assert pid_alive(pid)
        d = start_daemon(tmp, name, bip, False, "--live-restore=false")
        assert not pid_alive(pid)
        state = inspect(d, cid)["State"]
        assert state["Running"] is False
        assert state["ExitCode"] == 137
    finally:
        if d.process.poll() is not None:  # a failure left it down: this one kills what runs
            d = start_daemon(tmp, name, bip, False, "--live-restore=false")
        for c in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", c)
        stop_daemon(d)
    assert_nothing_left(d)
