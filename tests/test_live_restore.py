"""Live restore (Docker's ``--live-restore``, pyengined's default): containers outlive a daemon
stop (SIGTERM) or crash (SIGKILL), and the next daemon adopts them again.

Per proxy mode: nginx published on a host port keeps running while no daemon runs, and the port
answers throughout, probed every 20 ms: in kernel DNAT mode the rules stay; in proxy mode the
proxies stay (no parent-death signal with live restore) and the next daemon adopts the very same
processes and their listening sockets (proxy/supervisor.py). An adopted proxy that dies is
restarted on the same socket; one whose container is stopped, or not restored (live restore
off), is stopped. A container that exits while the daemon is down gets the exit code its
monitor recorded. The supervisor's hand-over is also tested on its own, without a daemon.
Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.jsonstate import read_json, write_json_atomic
from proxy.pidfd import ProcessIdentity
from proxy.supervisor import ProxySpec, ProxySupervisor
from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    require_root,
    start_daemon,
    stop_daemon,
)
from tests.netns_helpers import loopback_echo_server

MODES = {
    True: ("pyelr0", "10.70.0.1/24"),
    False: ("pyelr1", "10.71.0.1/24"),
}
# The daemon that switches live restore off under running proxies.
LIVE_RESTORE_OFF = ("pyelr2", "10.72.0.1/24")
DOWN_EXIT_CODE = 7
# How long a process may take to go once it has been told to (generous: a loaded machine).
GONE_TIMEOUT = 30.0


def http_failure(port: int, timeout: float = 2.0) -> str | None:
    """One fresh connection to 127.0.0.1:port: None if it gets nginx's 200, else what went
    wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError as err:
        return type(err).__name__
    return None if data.startswith(b"HTTP/1.1 200") else f"answer {data[:20]!r}"


def http_ok(port: int, timeout: float = 2.0) -> bool:
    """One fresh connection to 127.0.0.1:port that gets nginx's 200."""
    return http_failure(port, timeout) is None


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
    results: list[tuple[float, bool]] = field(default_factory=list)  # (start, answered)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (start, what failed)
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
            started = time.monotonic()
            failure = http_failure(self.port, timeout=1.0)
            self.results.append((started, failure is None))
            if failure is not None:
                self.errors.append((started, failure))
            self._stop.wait(0.02)

    @property
    def failures(self) -> int:
        return sum(1 for _, ok in self.results if not ok)

    def describe_failures(self, events: dict[str, float]) -> str:
        """The failed probes, timed from the first probe, with the test's events."""
        if not self.results:
            return "no probes"
        origin = self.results[0][0]
        timeline = [(t, f"probe failed: {what}") for t, what in self.errors]
        timeline += [(t, event) for event, t in events.items()]
        return "; ".join(f"+{t - origin:.3f} s {what}" for t, what in sorted(timeline))

    def back_after(self, since: float) -> float:
        """Seconds from ``since`` to the first successful probe after it."""
        back = next((t for t, ok in self.results if ok and t > since), None)
        assert back is not None, "the port never answered again"
        return back - since


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


def process_gone(pid: int) -> bool:
    """No such process any more, or only its zombie (a proxy that outlived its daemon is
    init's child, and init reaps it in its own time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: being reaped as we read
        return True


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = GONE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def listening_proxies(port: int) -> set[int]:
    """Pids of the pyengine-proxy processes whose fd 4 is a TCP socket listening on ``port``
    (any address, IPv4 or IPv6), in this network namespace."""
    listeners: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # 0A: LISTEN
                listeners.add(f"socket:[{inode}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "pyengine-proxy":
                continue
            if os.readlink(entry / "fd" / "4") in listeners:
                pids.add(int(entry.name))
        except OSError:  # gone meanwhile, or no fd 4
            continue
    return pids


def kill_leftover_proxies(ports: list[int]) -> set[int]:
    """Kill (and return) every proxy still listening on one of ``ports``: a finalizer's
    clean-up, whatever the test left."""
    leftovers = {pid for port in ports for pid in listening_proxies(port)}
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


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
    ports: list[int] = field(default_factory=list)  # host ports the test published

    def port(self) -> int:
        self.ports.append(free_port())
        return self.ports[-1]

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
        leftovers = kill_leftover_proxies(lab.ports)
    assert not leftovers, f"proxies left running: {leftovers}"
    assert_nothing_left(lab.daemon)


def test_containers_survive_daemon_restarts(lab: Lab) -> None:
    d = lab.daemon
    port = lab.port()
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
    proxies = listening_proxies(port)
    assert bool(proxies) == lab.userland_proxy, proxies

    # ---- SIGTERM: the daemon goes, the containers and (DNAT) the rules stay.
    events: dict[str, float] = {}
    with PortProbe(port) as down_probe:
        time.sleep(0.3)
        events["SIGTERM"] = time.monotonic()
        kill_daemon(d, signal.SIGTERM)
        events["daemon gone"] = time.monotonic()
        assert "live restore: leaving 2 container(s) running" in d.log()
        assert pid_alive(before["State"]["Pid"])
        assert link_exists(lab.name) and table_exists(lab.name)
        wait_gone(short_pid)  # it exits while no daemon runs
        time.sleep(0.5)
        events["new daemon launched"] = time.monotonic()
        d = lab.restart()
        events["new daemon answers"] = time.monotonic()
        wait_http(port)
        time.sleep(0.5)
    assert down_probe.failures == 0, (
        f"the published port stopped answering: {down_probe.describe_failures(events)}"
    )
    assert len(down_probe.results) > 20
    assert "live restore: adopting container" in d.log()
    if lab.userland_proxy:
        # The very processes that served the port while no daemon ran.
        assert listening_proxies(port) == proxies
        assert "adopted proxy" in d.log()
    print(f"\nSIGTERM: {len(down_probe.results)} probes, none failed ({recovery_line(d)})")

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
    events = {}
    with PortProbe(port) as crash_probe:
        time.sleep(0.3)
        events["SIGKILL"] = time.monotonic()
        kill_daemon(d, signal.SIGKILL)
        time.sleep(1.0)
        assert pid_alive(before["State"]["Pid"])
        events["new daemon launched"] = time.monotonic()
        d = lab.restart()
        events["new daemon answers"] = time.monotonic()
        wait_http(port)
        time.sleep(0.5)
    assert crash_probe.failures == 0, (
        f"the published port stopped answering: {crash_probe.describe_failures(events)}"
    )
    assert len(crash_probe.results) > 20
    print(f"SIGKILL: {len(crash_probe.results)} probes, none failed ({recovery_line(d)})")
    if lab.userland_proxy:
        assert listening_proxies(port) == proxies
    info = inspect(d, web_id)
    assert info["State"]["Running"] is True
    assert info["State"]["Pid"] == before["State"]["Pid"]

    if lab.userland_proxy:
        # ---- an adopted proxy that dies is restarted on the same socket. The connection it
        # was serving dies with it (probes run one at a time: at most one); connections made
        # once it is gone wait in the socket's queue and are answered by the next proxy,
        # each within its probe's 1 s timeout.
        victim = min(proxies)
        with PortProbe(port) as restart_probe:
            time.sleep(0.3)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: process_gone(victim), "the killed proxy gone")
            gone_at = time.monotonic()
            wait_until(lambda: len(listening_proxies(port) - {victim}) == len(proxies), "restart")
            time.sleep(0.5)
        after = [ok for t, ok in restart_probe.results if t > gone_at]
        timeline = restart_probe.describe_failures({"kill": killed_at, "proxy gone": gone_at})
        assert len(after) > 5 and all(after), f"no answer while a proxy restarted: {timeline}"
        assert restart_probe.failures <= 1, timeline
        print(f"proxy restart: answered {restart_probe.back_after(killed_at):.3f} s after the kill")
        restarted = listening_proxies(port)
        assert victim not in restarted and proxies - {victim} <= restarted
        assert "exited unexpectedly" in d.log()
        proxies = restarted

    # ---- the adopted container is fully managed: stop records its exit and frees the port
    # (and stops its proxies, the adopted one through its pidfd).
    assert d.cli("stop", "-t", "2", web_id).returncode == 0
    state = inspect(d, web_id)["State"]
    assert state["Running"] is False
    assert state["ExitCode"] == 0
    assert not pid_alive(before["State"]["Pid"])
    assert not http_ok(port)
    assert listening_proxies(port) == set()
    assert all(process_gone(pid) for pid in proxies)
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


def test_proxies_follow_live_restore_off(
    tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path
) -> None:
    """Proxies outlive only a daemon with live restore, and only a daemon with live restore
    adopts them: one without stops those a crashed predecessor left, and its own die with it."""
    name, bip = LIVE_RESTORE_OFF
    tmp = tmp_path_factory.mktemp(name)
    port = free_port()
    d = start_daemon(tmp, name, bip, True)
    try:
        d.cli("load", "-i", str(nginx_archive), check=True)
        cid = d.cli("run", "-d", "-p", f"{port}:80", "nginx", check=True).stdout.strip()
        wait_http(port)
        proxies = listening_proxies(port)
        assert proxies
        kill_daemon(d, signal.SIGKILL)
        assert http_ok(port), "the proxies did not outlive the daemon"
        assert listening_proxies(port) == proxies

        # Not restored: the container is killed and the proxies are stopped, not adopted.
        d = start_daemon(tmp, name, bip, True, "--live-restore=false")
        assert "stopping proxy" in d.log()
        assert all(process_gone(pid) for pid in proxies)
        assert listening_proxies(port) == set()
        assert not http_ok(port)
        assert inspect(d, cid)["State"]["ExitCode"] == 137
        assert not (d.data_root / "proxies").exists()

        # Without live restore the proxies die with the daemon, as docker-proxy with dockerd:
        # stopped at SIGTERM, and killed by the kernel with the fork server at SIGKILL.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            assert d.cli("start", cid).returncode == 0
            wait_http(port)
            proxies = listening_proxies(port)
            assert proxies
            kill_daemon(d, sig)
            wait_until(
                lambda pids=proxies: all(process_gone(pid) for pid in pids),  # type: ignore[misc]
                f"proxies gone after {sig.name}",
            )
            assert not http_ok(port)
            d = start_daemon(tmp, name, bip, True, "--live-restore=false")
    finally:
        if d.process.poll() is not None:  # a failure left it down: this one kills what runs
            d = start_daemon(tmp, name, bip, True, "--live-restore=false")
        for c in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", c)
        stop_daemon(d)
        leftovers = kill_leftover_proxies([port])
    assert not leftovers, f"proxies left running: {leftovers}"
    assert_nothing_left(d)


# --- the supervisor's hand-over on its own: two supervisors in this process, one after the
# other, as two daemons would be; proxies in front of an echo server on loopback.


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    with loopback_echo_server() as address:
        yield address


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


def restarted_pid(supervisor: ProxySupervisor, key: str, old_pid: int) -> int | None:
    """The pid of the proxy that replaced ``old_pid`` once the supervisor has its handshake
    (the connection it served may have been answered a moment before)."""
    pid = supervisor.pids().get(key)
    return pid if pid not in (None, old_pid) else None


def echo_roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(5)
        conn.sendall(payload)
        return conn.recv(len(payload))


def socket_inode(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


@dataclass
class Handover:
    """A proxy started by one supervisor that then detached, as a daemon does at SIGTERM."""

    state_path: Path
    key: str
    spec: ProxySpec
    pid: int


@pytest.fixture
def spawned_pids() -> Iterator[set[int]]:
    """Pids of the proxies a test made: killed, and reaped if they are our children, at the
    end whatever happened."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # not ours (a fork server's orphan: init reaps it)


def recorded(state_dir: Path) -> list[dict]:
    """The supervisor's records: a JSON file per container under ``state_dir``, listing its
    proxies."""
    return [r for f in sorted(state_dir.glob("*.json")) for r in read_json(f, {})["proxies"]]


async def start_and_detach(
    tmp: Path, backend: tuple[str, int], fork_server: bool, pids: set[int]
) -> Handover:
    first = ProxySupervisor(
        fork_server=fork_server, state_path=tmp / "proxies", outlive_daemon=True
    )
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        spec = ProxySpec("tcp", "127.0.0.1", port, *backend)
        key = f"c1/tcp/127.0.0.1/{port}"
        pid = await first.start(key, spec, bound)
    pids.add(pid)
    await first.detach()
    return Handover(tmp / "proxies", key, spec, pid)


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "exec"])
def test_supervisor_hands_a_running_proxy_over(
    fork_server: bool,
    tmp_path: Path,
    echo_server: tuple[str, int],
    spawned_pids: set[int],
) -> None:
    require_root()  # pidfd_getfd(2) of a process that is not our descendant

    async def scenario() -> None:
        old = await start_and_detach(tmp_path, echo_server, fork_server, spawned_pids)
        port = old.spec.host_port
        record = recorded(old.state_path)
        assert [(r["key"], r["process"]["pid"]) for r in record] == [(old.key, old.pid)]
        # No supervisor now: the proxy serves on its own.
        assert await asyncio.to_thread(echo_roundtrip, port) == b"ping"

        new = ProxySupervisor(
            fork_server=fork_server, state_path=old.state_path, outlive_daemon=True
        )
        try:
            held = await new.take_over()
            assert list(held) == [("tcp", "127.0.0.1", port)]
            reservation = held[("tcp", "127.0.0.1", port)]
            # The proxy's own listening socket, and still non-blocking: the proxy relies on it.
            assert f"socket:[{os.fstat(reservation.fileno()).st_ino}]" == socket_inode(old.pid, 4)
            assert fcntl.fcntl(reservation.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
            assert await new.adopt_survivor(old.key, old.spec, reservation) == old.pid
            assert new.pids() == {old.key: old.pid}
            assert await asyncio.to_thread(echo_roundtrip, port, b"adopted") == b"adopted"

            # Killed, it is restarted on the same socket; a connection made meanwhile waits.
            os.kill(old.pid, signal.SIGKILL)
            assert await asyncio.to_thread(echo_roundtrip, port, b"again") == b"again"
            await until(lambda: restarted_pid(new, old.key, old.pid) is not None, "restart")
            restarted = new.pids()[old.key]
            spawned_pids.add(restarted)
            assert os.readlink(f"/proc/{restarted}/fd/4") == (
                f"socket:[{os.fstat(reservation.fileno()).st_ino}]"
            )
            records = recorded(old.state_path)
            assert [r["process"]["pid"] for r in records] == [restarted]

            await new.stop(old.key)
            assert process_gone(restarted)
            assert not old.state_path.exists()
            reservation.close()
        finally:
            await new.stop_all()

    asyncio.run(scenario())


def test_supervisor_stops_survivors_it_is_not_to_keep(
    tmp_path: Path, echo_server: tuple[str, int], spawned_pids: set[int]
) -> None:
    require_root()

    async def scenario() -> None:
        old = await start_and_detach(tmp_path, echo_server, True, spawned_pids)
        new = ProxySupervisor(state_path=old.state_path, outlive_daemon=False)
        assert await new.take_over(keep=False) == {}
        wait_until(lambda: process_gone(old.pid), "the survivor stopped", timeout=10)
        assert not old.state_path.exists()
        with socket.socket() as again:  # the port is free again
            again.bind(("127.0.0.1", old.spec.host_port))

        # Kept, but claimed by no container: stop_survivors() stops it.
        old = await start_and_detach(tmp_path, echo_server, True, spawned_pids)
        new = ProxySupervisor(state_path=old.state_path, outlive_daemon=True)
        held = await new.take_over()
        for sock in held.values():
            sock.close()
        await new.stop_survivors()
        assert process_gone(old.pid)
        assert not old.state_path.exists()
        await new.stop_all()

    asyncio.run(scenario())


def exec_finished(pid: int, comm: str) -> ProcessIdentity:
    """The identity of ``pid`` once its execve(2) is complete: a vfork()ed child lets its
    parent run on before the new program's name and arguments are in place."""
    found: list[ProcessIdentity] = []

    def complete() -> bool:
        identity = ProcessIdentity.of(pid)
        if identity is None or identity.comm != comm:
            return False
        found.append(identity)
        return True

    wait_until(complete, f"pid {pid} running {comm}", timeout=10)
    return found[-1]


def test_supervisor_takes_over_only_what_it_recognises(
    tmp_path: Path, spawned_pids: set[int]
) -> None:
    """A record whose process is gone, or whose pid names another process now (another start
    time), is dropped and that process left alone; a record of the very process is trusted,
    and a process without the recorded listener is stopped."""
    require_root()
    state_path = tmp_path / "proxies"
    spec = {
        "proto": "tcp",
        "host_ip": "127.0.0.1",
        "host_port": 9,
        "container_ip": "127.0.0.1",
        "container_port": 9,
        "proxy_protocol": None,
    }
    dead = subprocess.Popen(["true"])
    dead.wait()
    stranger = subprocess.Popen(["sleep", "60"])
    impostor = subprocess.Popen(["sleep", "60"])  # recorded exactly, but no socket at fd 4
    spawned_pids.update({stranger.pid, impostor.pid})
    stranger_identity = exec_finished(stranger.pid, "sleep")
    impostor_identity = exec_finished(impostor.pid, "sleep")
    records = [
        {"key": "dead", "spec": spec, "process": {**stranger_identity.to_json(), "pid": dead.pid}},
        {
            "key": "reused",
            "spec": spec,
            "process": {**stranger_identity.to_json(), "start_time": 1},
        },
        {"key": "impostor", "spec": spec, "process": impostor_identity.to_json()},
        {"key": "malformed", "spec": {}, "process": {}},
    ]
    state_path.mkdir()
    for number, record in enumerate(records):
        write_json_atomic(state_path / f"record{number}.json", {"version": 1, **record})

    async def scenario() -> None:
        supervisor = ProxySupervisor(state_path=state_path, outlive_daemon=True)
        assert await supervisor.take_over() == {}
        dropped = ProxySpec("tcp", "127.0.0.1", 9, "127.0.0.1", 9)
        assert await supervisor.adopt_survivor("reused", dropped) is None
        await supervisor.stop_all()

    asyncio.run(scenario())
    assert stranger.poll() is None, "a process that only has a recorded pid was signalled"
    assert impostor.wait(timeout=10) == -signal.SIGTERM
    assert not state_path.exists()


def test_outliving_proxies_survive_their_fork_server(
    tmp_path: Path, echo_server: tuple[str, int], spawned_pids: set[int]
) -> None:
    """With outlive_daemon the fork server's death (it dies with the daemon) leaves its
    proxies serving; the supervisor keeps watching them through their pidfds."""
    require_root()

    async def scenario() -> None:
        supervisor = ProxySupervisor(state_path=tmp_path / "proxies", outlive_daemon=True)
        try:
            with socket.socket() as bound:
                bound.bind(("127.0.0.1", 0))
                port = bound.getsockname()[1]
                spec = ProxySpec("tcp", "127.0.0.1", port, *echo_server)
                pid = await supervisor.start("k", spec, bound)
            spawned_pids.add(pid)
            server = supervisor.fork_server_pid
            assert server is not None
            os.kill(server, signal.SIGKILL)
            await until(lambda: process_gone(server), "the fork server gone")
            assert await asyncio.to_thread(echo_roundtrip, port, b"orphan") == b"orphan"
            assert supervisor.pids() == {"k": pid}
            # Its exit is still noticed (its parent is init now) and it is restarted.
            os.kill(pid, signal.SIGKILL)
            assert await asyncio.to_thread(echo_roundtrip, port, b"back") == b"back"
            await until(lambda: restarted_pid(supervisor, "k", pid) is not None, "restart")
            spawned_pids.add(supervisor.pids()["k"])
        finally:
            await supervisor.stop_all()

    asyncio.run(scenario())
