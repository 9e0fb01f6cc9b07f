"""pyengine-docker-proxy (proxy/launcher.c) and the host server it hands its proxies to
(proxy/hostserver.py), started exactly as dockerd starts docker-proxy: fd 3 the write end of a
status pipe, fd 4 the listener with -use-listen-fd, SIGINT or SIGTERM to stop it. Real
launchers, servers and proxies; traffic only on 127.0.0.1 and ::1. Each test has a runtime
directory of its own (PYENGINE_PROXY_RUNTIME_DIR), so its server is its own, killed at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import BIN, free_port, require, require_root

LAUNCHER = BIN / "pyengine-docker-proxy"
IO_TIMEOUT = 5.0


@dataclass
class Launched:
    pid: int
    status: bytes
    runtime: Path

    def wait(self, timeout: float = IO_TIMEOUT) -> int | None:
        """The launcher's exit code, or None if it is still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        return None


@dataclass
class Runtime:
    directory: Path
    launched: list[Launched] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PYENGINE_PROXY_RUNTIME_DIR": str(self.directory), **extra}

    def launch(
        self, *args: str, listener: socket.socket | None = None, env: dict[str, str] | None = None
    ) -> Launched:
        """Start the launcher as dockerd does and read its status (``0\\n`` or up to EOF)."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        actions = [(os.POSIX_SPAWN_DUP2, write_end, 3)]
        if listener is not None:
            actions.append((os.POSIX_SPAWN_DUP2, listener.fileno(), 4))
        pid = os.posix_spawn(
            str(LAUNCHER),
            [str(LAUNCHER), *args],
            env or self.env(),
            file_actions=actions,
            setsigdef=(signal.SIGINT, signal.SIGTERM),
        )
        os.close(write_end)
        status = b""
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline and not status.startswith(b"0\n"):
                os.set_blocking(read_end, False)
                try:
                    chunk = os.read(read_end, 4096)
                except BlockingIOError:
                    time.sleep(0.005)
                    continue
                if not chunk:
                    break
                status += chunk
        finally:
            os.close(read_end)
        launched = Launched(pid, status, self.directory)
        self.launched.append(launched)
        return launched

    def servers(self) -> list[int]:
        """The host servers of this directory (their proxies share their command line, fork(2)
        copying it, but are named pyengine-proxy)."""
        return [
            pid
            for pid in _pids_with(str(self.directory), b"proxy.hostserver")
            if _comm(pid) not in ("pyengine-proxy", "")
        ]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pids_with(*needles: str | bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if all((n.encode() if isinstance(n, str) else n) in cmdline for n in needles):
            found.append(int(entry))
    return found


def _children_of(pids: list[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) in pids:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = IO_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    require_root()
    require(LAUNCHER.exists(), f"needs {LAUNCHER} (pip install -e .)")
    directory = tmp_path / "rt"
    directory.mkdir(mode=0o700)
    state = Runtime(directory)
    try:
        yield state
    finally:
        for launched in state.launched:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(launched.pid, signal.SIGKILL)
                os.waitpid(launched.pid, 0)
        servers = state.servers()
        proxies = _children_of(servers)
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The proxies stop by themselves when their launchers die (end of file on the lifeline).
        assert not _wait_gone(servers + proxies), "a host server or a proxy outlived its test"


class TcpEcho:
    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"echo:" + conn.recv(1024))


class UdpEcho:
    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            self.sock.sendto(b"echo:" + data, peer)


def _tcp_ask(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as conn:
        conn.sendall(payload)
        return conn.recv(1024)


def _udp_ask(host: str, port: int, payload: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(IO_TIMEOUT)
        client.sendto(payload, (host, port))
        return client.recvfrom(2048)[0]


def _args(proto: str, host: str, port: int, backend: str, backend_port: int) -> list[str]:
    return [
        "-proto", proto, "-host-ip", host, "-host-port", str(port),
        "-container-ip", backend, "-container-port", str(backend_port),
    ]  # fmt: skip


@pytest.mark.privileged
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_through_the_launcher_and_stop_on_sigint(runtime: Runtime, host: str) -> None:
    backend = TcpEcho(host)
    port = free_port()
    launched = runtime.launch(*_args("tcp", host, port, host, backend.port))
    assert launched.status == b"0\n"
    servers = runtime.servers()
    assert len(servers) == 1, "the first launcher starts one host server"
    # One thread: fork(2) copies only the caller, and the C loop waits for SIGCHLD on a signalfd
    # that another thread's unblocked mask would starve.
    assert os.listdir(f"/proc/{servers[0]}/task") == [str(servers[0])]
    proxies = _children_of(servers)
    assert len(proxies) == 1
    assert Path(f"/proc/{proxies[0]}/comm").read_text().strip() == "pyengine-proxy"
    for n in range(5):
        assert _tcp_ask(host, port, b"%d" % n) == b"echo:%d" % n
    os.kill(launched.pid, signal.SIGINT)  # dockerd 20.10 stops its proxy with SIGINT
    assert launched.wait() == 0
    assert not _wait_gone(proxies), "the proxy outlived its launcher's stop"
    with pytest.raises(OSError):
        _tcp_ask(host, port, b"gone")


@pytest.mark.privileged
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_udp_with_a_listener_on_fd_4(runtime: Runtime, host: str) -> None:
    backend = UdpEcho(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as listener:
        listener.bind((host, 0))
        port = listener.getsockname()[1]
        launched = runtime.launch(
            *_args("udp", host, port, host, backend.port), "-use-listen-fd", listener=listener
        )
    assert launched.status == b"0\n"
    for n in range(5):
        assert _udp_ask(host, port, b"%d" % n) == b"echo:%d" % n
    os.kill(launched.pid, signal.SIGTERM)
    assert launched.wait() == 0


@pytest.mark.privileged
def test_killing_the_server_loses_no_listener(runtime: Runtime) -> None:
    backend = TcpEcho("127.0.0.1")
    first_port, second_port = free_port(), free_port()
    first = runtime.launch(*_args("tcp", "127.0.0.1", first_port, "127.0.0.1", backend.port))
    assert first.status == b"0\n"
    assert _tcp_ask("127.0.0.1", first_port, b"a") == b"echo:a"  # one woken proxy ...
    (server,) = runtime.servers()
    proxy = _children_of([server])[0]
    os.kill(server, signal.SIGKILL)
    assert not _wait_gone([server])
    # ... and both kinds keep serving: the woken one, and one still idle in the C loop.
    assert _tcp_ask("127.0.0.1", first_port, b"b") == b"echo:b"
    assert _alive(proxy)
    second = runtime.launch(*_args("tcp", "127.0.0.1", second_port, "127.0.0.1", backend.port))
    assert second.status == b"0\n", "a new server replaces the killed one"
    (replacement,) = runtime.servers()
    assert replacement != server
    assert _tcp_ask("127.0.0.1", second_port, b"c") == b"echo:c"
    assert _tcp_ask("127.0.0.1", first_port, b"d") == b"echo:d"
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait() == 0, "a proxy whose server died still reports its exit"
    assert not _wait_gone([proxy])
    os.kill(second.pid, signal.SIGTERM)
    assert second.wait() == 0


@pytest.mark.privileged
def test_a_killed_launcher_takes_its_proxy_with_it(runtime: Runtime) -> None:
    backend = TcpEcho("127.0.0.1")
    idle_port, woken_port = free_port(), free_port()
    idle = runtime.launch(*_args("tcp", "127.0.0.1", idle_port, "127.0.0.1", backend.port))
    woken = runtime.launch(*_args("tcp", "127.0.0.1", woken_port, "127.0.0.1", backend.port))
    assert idle.status == woken.status == b"0\n"
    assert _tcp_ask("127.0.0.1", woken_port, b"x") == b"echo:x"
    proxies = _children_of(runtime.servers())
    assert len(proxies) == 2
    for launched in (idle, woken):
        os.kill(launched.pid, signal.SIGKILL)
        assert launched.wait() == -signal.SIGKILL
    assert not _wait_gone(proxies), "a proxy outlived its SIGKILLed launcher"
    for port in (idle_port, woken_port):
        with pytest.raises(OSError):
            _tcp_ask("127.0.0.1", port, b"gone")


@pytest.mark.privileged
def test_a_taken_port_is_one_line_on_fd_3(runtime: Runtime) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launched = runtime.launch(*_args("tcp", "127.0.0.1", port, "127.0.0.1", 9))
        assert launched.wait() == 1
    expected = f"1\ncannot listen on 127.0.0.1:{port}/tcp: Address already in use"
    assert launched.status == expected.encode()
    assert not runtime.servers(), "nothing was started for a port that cannot be bound"


@pytest.mark.privileged
def test_use_listen_fd_without_fd_4_is_one_line_on_fd_3(runtime: Runtime) -> None:
    launched = runtime.launch(*_args("tcp", "127.0.0.1", 80, "127.0.0.1", 9), "-use-listen-fd")
    assert launched.wait() == 1
    assert launched.status == b"1\n-use-listen-fd: fd 4 is not open"
    assert not runtime.servers()


@pytest.mark.privileged
def test_a_runtime_directory_others_can_write_is_refused(runtime: Runtime) -> None:
    runtime.directory.chmod(0o777)
    launched = runtime.launch(*_args("tcp", "127.0.0.1", free_port(), "127.0.0.1", 9))
    assert launched.wait() == 1
    assert launched.status == (
        f"1\n{runtime.directory} is not a private directory of uid 0 (mode 0700)".encode()
    )
    assert not runtime.servers()


@pytest.mark.privileged
def test_a_server_of_another_user_is_not_used(runtime: Runtime) -> None:
    """Another uid's process listening at the server's path (planted while the directory was
    that user's) is refused, and never handed a listener."""
    nobody = pwd.getpwnam("nobody")
    # A directory that user can reach (the test's tmp_path is root's alone).
    other = Runtime(Path(tempfile.mkdtemp(prefix="pyelaunch-", dir="/tmp")))
    os.chown(other.directory, nobody.pw_uid, nobody.pw_gid)
    path = server_socket(other.directory)
    script = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.bind(sys.argv[1]); s.listen(); print('ok', flush=True); time.sleep(60)"
    )
    planted = subprocess.Popen(
        ["/usr/bin/python3", "-c", script, str(path)], user=nobody.pw_uid, stdout=subprocess.PIPE
    )
    try:
        assert planted.stdout is not None and planted.stdout.readline() == b"ok\n"
        os.chown(other.directory, 0, 0)
        port = free_port()
        launched = other.launch(*_args("tcp", "127.0.0.1", port, "127.0.0.1", 9))
        assert launched.wait() == 1
        expected = f"1\nthe proxy server at {path} does not run as uid 0"
        assert launched.status == expected.encode()
        assert not other.servers()
    finally:
        planted.kill()
        planted.wait()
        shutil.rmtree(other.directory)


@pytest.mark.privileged
def test_a_stale_socket_is_replaced_and_concurrent_launchers_share_one_server(
    runtime: Runtime,
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(server_socket(runtime.directory)))
    stale.close()  # the file stays, nobody listens: a dead server's socket
    backend = TcpEcho("127.0.0.1")
    ports = [free_port() for _ in range(8)]
    results: list[Launched] = []
    threads = [
        threading.Thread(
            target=lambda p=p: results.append(
                runtime.launch(*_args("tcp", "127.0.0.1", p, "127.0.0.1", backend.port))
            )
        )
        for p in ports
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r.status for r in results] == [b"0\n"] * len(ports)
    assert len(runtime.servers()) == 1, "the launchers started more than one server"
    for port in ports:
        assert _tcp_ask("127.0.0.1", port, b"p") == b"echo:p"


@pytest.mark.privileged
def test_a_server_that_does_not_answer_is_replaced(runtime: Runtime) -> None:
    """A server that takes requests and never answers: the launcher gives up on it after 5 s,
    removes its socket and starts a new one, within dockerd's 16 s."""
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hung.bind(str(server_socket(runtime.directory)))
    hung.listen()
    backend = TcpEcho("127.0.0.1")
    port = free_port()
    started = time.monotonic()
    launched = runtime.launch(*_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port))
    assert launched.status == b"0\n"
    assert time.monotonic() - started < 15
    assert _tcp_ask("127.0.0.1", port, b"h") == b"echo:h"
    hung.close()


@pytest.mark.privileged
def test_an_idle_server_exits_and_removes_its_socket(runtime: Runtime) -> None:
    backend = TcpEcho("127.0.0.1")
    port = free_port()
    env = runtime.env(PYENGINE_PROXY_SERVER_IDLE_EXIT="1")
    launched = runtime.launch(*_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port), env=env)
    assert launched.status == b"0\n"
    (server,) = runtime.servers()
    time.sleep(1.5)
    assert _alive(server), "a server with a running proxy is not idle"
    os.kill(launched.pid, signal.SIGTERM)
    assert launched.wait() == 0
    assert not _wait_gone([server], 5), "the idle server did not exit"
    assert not server_socket(runtime.directory).exists()


@pytest.mark.privileged
def test_other_command_lines_run_the_python_proxy(runtime: Runtime) -> None:
    """Flags docker-proxy does not have (here PROXY protocol) are the Python proxy's to take."""
    backend = TcpEcho("127.0.0.1")
    port = free_port()
    args = _args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port)
    launched = runtime.launch(*args, "-proxy-protocol", "v1")
    assert launched.status == b"0\n"
    assert b"proxy.main" in Path(f"/proc/{launched.pid}/cmdline").read_bytes()
    assert not runtime.servers()
    assert _tcp_ask("127.0.0.1", port, b"q").startswith(b"echo:PROXY TCP4 127.0.0.1 ")
    os.kill(launched.pid, signal.SIGTERM)
    assert launched.wait() == 0
    bad = runtime.launch("-proto", "sctp", "-host-ip", "127.0.0.1")
    assert bad.wait() == 2
    assert bad.status.startswith(b"1\n")


def server_socket(directory: Path) -> Path:
    """Where the launcher puts the host server of this venv's interpreter: named by the 64-bit
    FNV-1a hash of the interpreter's path, taken from the pyengine-proxy script's #! line."""
    python = (BIN / "pyengine-proxy").read_text().splitlines()[0][2:].split()[0]
    digest = 0xCBF29CE484222325
    for byte in python.encode():
        digest = ((digest ^ byte) * 0x100000001B3) % (1 << 64)
    return directory / f"server-{digest:016x}.sock"


def _private_dirty_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError(f"no Private_Dirty for {pid}")


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.privileged
def test_a_woken_proxy_rests_and_the_launcher_follows(runtime: Runtime) -> None:
    """After its traffic stops, a woken proxy (Python, megabytes of private memory) hands its
    listener to a fresh idle one (C, a few pages); the launcher stops and waits on the new
    one. While a connection is open it does not rest."""
    backend = TcpEcho("127.0.0.1")
    port = free_port()
    env = runtime.env(PYENGINE_PROXY_REST_AFTER="1")
    launched = runtime.launch(*_args("tcp", "127.0.0.1", port, "127.0.0.1", backend.port), env=env)
    assert launched.status == b"0\n"
    (idle,) = _children_of(runtime.servers())
    idle_kb = _private_dirty_kb(idle)
    # An open connection keeps it awake past several checks.
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as held:
        time.sleep(2.5)
        assert _children_of(runtime.servers()) == [idle], "it rested with a connection open"
        woken_kb = _private_dirty_kb(idle)
        held.sendall(b"held")
        assert held.recv(64) == b"echo:held"
    assert woken_kb > idle_kb + 1024, (idle_kb, woken_kb)
    assert _wait_for(lambda: _children_of(runtime.servers()) not in ([idle], []), 5), "no rest"
    (rested,) = _children_of(runtime.servers())
    assert not _wait_gone([idle]), "the woken proxy stayed beside the new one"
    assert _private_dirty_kb(rested) < woken_kb - 1024
    assert _tcp_ask("127.0.0.1", port, b"again") == b"echo:again"
    os.kill(launched.pid, signal.SIGTERM)
    assert launched.wait() == 0, "the launcher followed the new proxy and got its exit"
    assert not _wait_gone([rested])
