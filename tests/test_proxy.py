"""pyengine-proxy end to end: real processes, real sockets, loopback only."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import fcntl
import hashlib
import logging
import os
import resource
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import pytest
import uvloop

from bench.loopbench import extract_rootfs
from proxy import proxyprotocol
from proxy.childprocess import ChildProcess
from proxy.forkclient import ForkServerClient
from proxy.forkserver import ForkServerError
from proxy.handshake import read_status, read_status_blocking
from proxy.options import UsageError, parse_command_line
from proxy.pipes import DEFAULT_MAX_IDLE_PIPES
from proxy.supervisor import ProxyError, ProxySpec, ProxySupervisor
from tests.conftest import require_root

T = TypeVar("T")
PROXY_ARGV = [sys.executable, "-m", "proxy.main"]
IO_TIMEOUT = 10.0  # safety net so a broken proxy fails a test instead of hanging it


# --- helpers: spawning the proxy the way a parent does (fd 3 status pipe, fd 4 socket) ---------


@dataclass
class RunningProxy:
    pid: int
    pidfd: int
    status: bytes
    stderr_path: Path
    exit_code: int | None = None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_kinds(self) -> collections.Counter[str]:
        """The proxy's fds by kind: "socket", "pipe", or what else they point at."""
        kinds: collections.Counter[str] = collections.Counter()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except FileNotFoundError:
                continue  # closed meanwhile
            kind = target.split(":", 1)[0]
            kinds[kind if kind in ("socket", "pipe") else target] += 1
        return kinds

    def send_signal(self, signum: int) -> None:
        if self.exit_code is None:
            signal.pidfd_send_signal(self.pidfd, signum)

    def wait(self, timeout: float = IO_TIMEOUT) -> int:
        if self.exit_code is None:
            readable, _, _ = select.select([self.pidfd], [], [], timeout)
            assert readable, f"proxy pid {self.pid} did not exit"
            _, status = os.waitpid(self.pid, 0)
            self.exit_code = os.waitstatus_to_exitcode(status)
            os.close(self.pidfd)
        return self.exit_code

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def spawn_proxy(tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def spawn(args: list[str], listen_sock: socket.socket | None = None) -> RunningProxy:
        stderr_path = tmp_path / f"proxy{len(started)}.stderr"
        read_fd, write_fd = os.pipe()
        sources = {3: write_fd}
        if listen_sock is not None:
            sources[4] = listen_sock.fileno()
        lifted = {n: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for n, fd in sources.items()}
        actions: list[tuple[object, ...]] = [
            (os.POSIX_SPAWN_DUP2, fd, n) for n, fd in lifted.items()
        ]
        actions.append(
            (os.POSIX_SPAWN_OPEN, 2, str(stderr_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        )
        try:
            pid = os.posix_spawn(PROXY_ARGV[0], PROXY_ARGV + args, os.environ, file_actions=actions)
        finally:
            for fd in (*lifted.values(), write_fd):
                os.close(fd)
        proxy = RunningProxy(pid=pid, pidfd=os.pidfd_open(pid), status=b"", stderr_path=stderr_path)
        started.append(proxy)
        try:
            proxy.status = read_status_blocking(read_fd, IO_TIMEOUT)
        finally:
            os.close(read_fd)
        return proxy

    yield spawn
    for proxy in started:
        if proxy.exit_code is None:
            proxy.send_signal(signal.SIGKILL)
            proxy.wait()


def proxy_args(
    proto: str, host: str, port: int, backend: tuple[str, int], *extra: str
) -> list[str]:
    return [
        "-proto",
        proto,
        "-host-ip",
        host,
        "-host-port",
        str(port),
        "-container-ip",
        backend[0],
        "-container-port",
        str(backend[1]),
        *extra,
    ]


def free_port(family: socket.AddressFamily, kind: socket.SocketKind, host: str) -> int:
    with socket.socket(family, kind) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def wait_until(condition: Callable[[], bool], timeout: float = IO_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- helpers: backends the proxy forwards to --------------------------------------------------


class _QuietThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets from clients that abort on purpose are part of the tests


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1 << 20):
            self.request.sendall(data)


@dataclass
class _ReplyAfterEofState:
    reply_size: int
    received: list[int] = field(default_factory=list)


def _reply_after_eof_handler(state: _ReplyAfterEofState) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            total = 0
            while data := self.request.recv(1 << 16):
                total += len(data)
            state.received.append(total)
            self.request.sendall(_pattern(state.reply_size))

    return Handler


def _pattern(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


@pytest.fixture
def tcp_server() -> Iterator[Callable[..., tuple[str, int]]]:
    servers: list[socketserver.TCPServer] = []

    def start(
        host: str = "127.0.0.1", handler: type[socketserver.BaseRequestHandler] = _EchoHandler
    ) -> tuple[str, int]:
        server_class = type("Server", (_QuietThreadingServer,), {"address_family": family_of(host)})
        server = server_class((host, 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return host, server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def udp_echo_server() -> Iterator[Callable[[str], tuple[str, int]]]:
    stop = threading.Event()
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def serve(sock: socket.socket) -> None:
        while not stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                data, client = sock.recvfrom(65535)
                sock.sendto(data, client)

    def start(host: str = "127.0.0.1") -> tuple[str, int]:
        sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sockets.append(sock)
        thread = threading.Thread(target=serve, args=(sock,), daemon=True)
        thread.start()
        threads.append(thread)
        return host, sock.getsockname()[1]

    yield start
    stop.set()
    for thread in threads:
        thread.join()
    for sock in sockets:
        sock.close()


def tcp_roundtrip(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return _read_to_eof(client)


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def udp_exchange(
    client: socket.socket, destination: tuple[str, int], payload: bytes
) -> tuple[bytes, tuple[str, int]]:
    client.settimeout(IO_TIMEOUT)
    client.sendto(payload, destination)
    data, source = client.recvfrom(65535)
    return data, source[:2]


# --- command line -----------------------------------------------------------------------------


def test_command_line_accepts_go_flag_forms() -> None:
    parsed = parse_command_line(
        [
            "-proto=udp",
            "--host-ip",
            "::",
            "-host-port=8080",
            "-container-ip",
            "172.17.0.2",
            "--container-port=80",
            "-use-listen-fd",
            "-udp-idle-timeout",
            "5s",
        ]
    )
    assert parsed.options is not None
    assert (parsed.options.proto, parsed.options.host_ip, parsed.options.host_port) == (
        "udp",
        "::",
        8080,
    )
    assert (parsed.options.container_ip, parsed.options.container_port) == ("172.17.0.2", 80)
    assert parsed.options.use_listen_fd is True
    assert parsed.options.udp_idle_timeout == 5.0
    assert parse_command_line(["-v"]).show_version
    with pytest.raises(UsageError, match="not defined"):
        parse_command_line(["-bogus"])
    with pytest.raises(UsageError, match="container-ip"):
        parse_command_line(["-host-ip", "127.0.0.1", "-host-port", "1", "-container-port", "2"])


def test_version_flag_prints_version(spawn_proxy: Callable[..., RunningProxy]) -> None:
    proxy = spawn_proxy(["-v"])
    assert proxy.wait() == 0
    assert proxy.status == b""


def test_usage_error_is_reported_on_status_pipe(spawn_proxy: Callable[..., RunningProxy]) -> None:
    proxy = spawn_proxy(proxy_args("sctp", "127.0.0.1", 1, ("127.0.0.1", 2)))
    assert proxy.status.startswith(b"1\n")
    assert b"unsupported protocol" in proxy.status
    assert proxy.wait() == 2


# --- handshake, listening socket, signals -----------------------------------------------------


def test_ready_handshake_then_sigterm_exits_zero_and_frees_port(
    spawn_proxy: Callable[..., RunningProxy], tcp_server: Callable[..., tuple[str, int]]
) -> None:
    backend = tcp_server()
    port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, backend))
    assert proxy.status == b"0\n"
    assert tcp_roundtrip("127.0.0.1", port, b"hello") == b"hello"
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait() == 0
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_sigint_exits_zero(spawn_proxy: Callable[..., RunningProxy]) -> None:
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("udp", "127.0.0.1", port, ("127.0.0.1", 9)))
    assert proxy.status == b"0\n"
    proxy.send_signal(signal.SIGINT)
    assert proxy.wait() == 0


def test_port_in_use_is_reported_as_failure(spawn_proxy: Callable[..., RunningProxy]) -> None:
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, ("127.0.0.1", 9)))
        assert proxy.status.startswith(b"1\n")
        assert b"Address already in use" in proxy.status
        assert proxy.wait() == 1


def test_use_listen_fd_listens_on_the_given_socket(
    spawn_proxy: Callable[..., RunningProxy], tcp_server: Callable[..., tuple[str, int]]
) -> None:
    backend = tcp_server()
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, not listening: the proxy calls listen()
        port = bound.getsockname()[1]
        proxy = spawn_proxy(proxy_args("tcp", "0.0.0.0", 0, backend, "-use-listen-fd"), bound)
    assert proxy.status == b"0\n"
    assert tcp_roundtrip("127.0.0.1", port, b"via fd 4") == b"via fd 4"


def test_use_listen_fd_rejects_a_socket_of_the_wrong_type(
    spawn_proxy: Callable[..., RunningProxy],
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bound:
        bound.bind(("127.0.0.1", 0))
        proxy = spawn_proxy(
            proxy_args("tcp", "127.0.0.1", 0, ("127.0.0.1", 9), "-use-listen-fd"), bound
        )
    assert proxy.status.startswith(b"1\n")
    assert b"not a tcp socket" in proxy.status
    assert proxy.wait() == 1


# --- TCP data path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen_host", "backend_host"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("::1", "127.0.0.1"), ("127.0.0.1", "::1")],
)
def test_tcp_echo_across_address_families(
    spawn_proxy: Callable[..., RunningProxy],
    tcp_server: Callable[..., tuple[str, int]],
    listen_host: str,
    backend_host: str,
) -> None:
    backend = tcp_server(backend_host)
    port = free_port(family_of(listen_host), socket.SOCK_STREAM, listen_host)
    proxy = spawn_proxy(proxy_args("tcp", listen_host, port, backend))
    assert proxy.status == b"0\n"
    payload = os.urandom(300_000)
    assert tcp_roundtrip(listen_host, port, payload) == payload


def test_tcp_large_transfer_keeps_every_byte(
    spawn_proxy: Callable[..., RunningProxy], tcp_server: Callable[..., tuple[str, int]]
) -> None:
    backend = tcp_server()
    port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, backend))
    assert proxy.status == b"0\n"
    block = os.urandom(1 << 20)
    total = 50 * len(block)
    sent_digest = hashlib.sha256()
    received_digest = hashlib.sha256()
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as client:

        def send_all() -> None:
            for index in range(50):
                chunk = block[index:] + block[:index]  # every MiB differs
                sent_digest.update(chunk)
                client.sendall(chunk)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_all)
        sender.start()
        buffer = bytearray(1 << 20)
        while size := client.recv_into(buffer):
            received_digest.update(memoryview(buffer)[:size])
            received += size
        sender.join()
    assert received == total
    assert received_digest.hexdigest() == sent_digest.hexdigest()


def test_tcp_half_close_still_delivers_the_whole_reply(
    spawn_proxy: Callable[..., RunningProxy], tcp_server: Callable[..., tuple[str, int]]
) -> None:
    state = _ReplyAfterEofState(reply_size=3 * 1024 * 1024 + 7)
    backend = tcp_server(handler=_reply_after_eof_handler(state))
    port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, backend))
    assert proxy.status == b"0\n"
    reply = tcp_roundtrip("127.0.0.1", port, b"request" * 1000)
    assert state.received == [7000]  # the backend saw the request, then EOF
    assert reply == _pattern(state.reply_size)


def test_tcp_refused_backend_closes_the_client(
    spawn_proxy: Callable[..., RunningProxy],
) -> None:
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound but not listening: connect is refused
        backend = closed_port.getsockname()
        port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, backend))
        assert proxy.status == b"0\n"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as client:
                try:
                    data = client.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b""
    assert "Connection refused" in proxy.stderr()


def fds_once_serving(proxy: RunningProxy, port: int) -> collections.Counter[str]:
    """The proxy's fds with no connection open, once it has served one. An idle proxy has no
    event loop yet (proxy/idle.py): the first connection makes it (its epoll fd and its own
    sockets), so open one through an echo backend, and wait until the proxy has closed the
    connection's two sockets again."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as client:
        client.sendall(b"wake")
        received = b""
        while len(received) < 4:
            received += client.recv(4)
        open_sockets = proxy.fd_kinds()["socket"]  # the client's and the backend's included
    assert wait_until(lambda: proxy.fd_kinds()["socket"] == open_sockets - 2)
    return proxy.fd_kinds()


def assert_no_fd_leak(proxy: RunningProxy, idle: collections.Counter[str]) -> None:
    """Once the connections have closed in the proxy too (waited for here), it holds the fds
    it held when idle, plus pipes only as many as the pool keeps."""
    wait_until(lambda: proxy.fd_kinds()["socket"] == idle["socket"])
    check_fds(idle, proxy.fd_kinds())


def check_fds(idle: collections.Counter[str], after: collections.Counter[str]) -> None:
    """The same sockets and other fds as when idle; pipes only as many as the pool keeps, and
    whole ones (two fds each)."""
    assert after["socket"] == idle["socket"], f"sockets left open: {after}, idle: {idle}"
    pooled = after["pipe"] - idle["pipe"]
    assert 0 <= pooled <= 2 * DEFAULT_MAX_IDLE_PIPES and pooled % 2 == 0, (after, idle)
    others_after = {kind: n for kind, n in after.items() if kind != "pipe"}
    others_idle = {kind: n for kind, n in idle.items() if kind != "pipe"}
    assert others_after == others_idle, (after, idle)


def test_tcp_no_fd_leak_over_2000_connections(
    spawn_proxy: Callable[..., RunningProxy], tcp_server: Callable[..., tuple[str, int]]
) -> None:
    backend = tcp_server()
    port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, backend))
    assert proxy.status == b"0\n"

    def batch(size: int, first: int) -> None:
        clients = [
            socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) for _ in range(size)
        ]
        for offset, client in enumerate(clients):
            number = first + offset
            if number % 5 == 0:
                # Abort: RST instead of FIN (socket(7) SO_LINGER with a zero timeout).
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            message = b"ping %d" % number
            client.sendall(message)
            if number % 5 == 1:
                client.shutdown(socket.SHUT_WR)
                assert _read_to_eof(client) == message
            else:
                received = b""
                while len(received) < len(message):
                    received += client.recv(64)
                assert received == message
            client.close()

    idle = fds_once_serving(proxy, port)
    for first in range(0, 2000, 50):
        batch(50, first)
    assert_no_fd_leak(proxy, idle)


IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>; not exported by Python's socket module
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
_libc = ctypes.CDLL(None, use_errno=True)
CHURN_CONNECTIONS = 100_000
CHURN_WARM_UP = 5_000
CHURN_CONCURRENCY = 64
CHURN_TIME_LIMIT = 900.0  # a safety net for a broken proxy, far above what the run needs
# Growth of the proxy's anonymous memory allowed over the 100,000 connections: 2 MiB is about
# 20 bytes a connection (the allocator's arenas were seen to grow by just over 1 MiB on a busy
# machine), so a leak of even one small object per connection (a dict entry: ~100 bytes)
# fails.
CHURN_MEMORY_SLACK_KB = 2048


def _anonymous_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError(f"no RssAnon for {pid}")


class _ChurnBackend(asyncio.Protocol):
    """Echoes; a message starting with ``!`` is echoed and then the backend closes first."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._transport.write(data)
        if data.startswith(b"!"):
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too


def _loopback_address(number: int) -> str:
    """A distinct address of 127.1.0.0 - 127.255.255.255 for each number below 16 million."""
    return f"127.{(number >> 16) % 255 + 1}.{(number >> 8) & 255}.{number & 255}"


async def _churn(port: int, first: int, count: int, deadline: float) -> int:
    """Open ``count`` connections through the proxy, CHURN_CONCURRENCY at a time, ending them
    four ways in turn; return how many completed before ``deadline``."""
    loop = asyncio.get_running_loop()
    numbers = iter(range(first, first + count))
    done = 0

    async def one(number: int) -> None:
        client = socket.socket()
        client.setblocking(False)
        try:
            # A source address of its own in 127.0.0.0/8 for every connection: no 4-tuple comes
            # back while an earlier one may still be in TIME_WAIT on either side.
            client.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            client.bind((_loopback_address(number), 0))
            await loop.sock_connect(client, ("127.0.0.1", port))
            way = number % 4
            message = (b"!" if way == 3 else b"m") + b"%d" % number
            await loop.sock_sendall(client, message)
            if way == 2:
                # Abort: RST instead of FIN (socket(7) SO_LINGER with a zero timeout).
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if way == 1:
                client.shutdown(socket.SHUT_WR)  # half-close; the echo still comes back
            received = b""
            while len(received) < len(message):
                chunk = await loop.sock_recv(client, 64)
                assert chunk, f"connection {number}: EOF after {received!r}"
                received += chunk
            assert received == message
            if way in (1, 3):
                assert await loop.sock_recv(client, 64) == b""  # then the peer's FIN
        finally:
            client.close()

    async def worker() -> None:
        nonlocal done
        for number in numbers:
            if time.monotonic() > deadline:
                return
            await asyncio.wait_for(one(number), IO_TIMEOUT)
            done += 1

    await asyncio.gather(*(worker() for _ in range(CHURN_CONCURRENCY)))
    return done


@pytest.fixture
def private_netns() -> Iterator[str]:
    """A network namespace of the test's own with only its loopback up. 100,000 connections
    leave ~200,000 TIME_WAIT sockets and, where netfilter tracks connections, as many conntrack
    entries: enough to fill the host's tables and drop other traffic. A fresh namespace has its
    own tables, and no conntrack at all while it has no firewall rules."""
    require_root()
    name = f"pyetest-px-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_in_netns(name: str, action: Callable[[], T]) -> T:
    """Run ``action`` on a thread that entered network namespace ``name`` (setns(2) moves only
    the calling thread); sockets and processes it creates live in that namespace."""
    errors: list[BaseException] = []
    results: list[T] = []

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            results.append(action())
        except BaseException as err:  # re-raised on the test's thread
            errors.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def test_tcp_no_fd_or_memory_leak_over_100000_connections(
    spawn_proxy: Callable[..., RunningProxy], private_netns: str
) -> None:
    _allow_open_files(4 * CHURN_CONCURRENCY + 1024)
    deadline = time.monotonic() + CHURN_TIME_LIMIT
    outcome: dict[str, int] = {}
    idle_fds: collections.Counter[str] = collections.Counter()
    fds_after: collections.Counter[str] = collections.Counter()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_ChurnBackend, "127.0.0.1", 0, backlog=1024)
        backend = server.sockets[0].getsockname()[:2]
        port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, backend))
        assert proxy.status == b"0\n"
        idle = await loop.run_in_executor(None, fds_once_serving, proxy, port)

        async def settled() -> collections.Counter[str]:
            """The proxy's fds once the last connections have closed in it too."""
            for _ in range(1000):
                if proxy.fd_kinds()["socket"] == idle["socket"]:
                    break
                await asyncio.sleep(0.01)
            return proxy.fd_kinds()

        try:
            # Warm up: pipe pool, allocator and caches at their working size.
            assert await _churn(port, 0, CHURN_WARM_UP, deadline) == CHURN_WARM_UP
            check_fds(idle, await settled())
            memory_before = _anonymous_kb(proxy.pid)
            outcome["done"] = await _churn(port, CHURN_WARM_UP, CHURN_CONNECTIONS, deadline)
            fds_after.update(await settled())
            idle_fds.update(idle)
            outcome["memory_before"] = memory_before
            outcome["memory_after"] = _anonymous_kb(proxy.pid)
        finally:
            server.close()
            await server.wait_closed()

    # The proxy (spawned from that thread) and all the traffic stay in the test's namespace.
    run_in_netns(private_netns, lambda: run_on("uvloop", scenario()))
    assert outcome["done"] == CHURN_CONNECTIONS, (
        f"only {outcome['done']} connections within {CHURN_TIME_LIMIT:g} s"
    )
    check_fds(idle_fds, fds_after)
    growth = outcome["memory_after"] - outcome["memory_before"]
    assert growth <= CHURN_MEMORY_SLACK_KB, f"anonymous memory grew by {growth} kB: {outcome}"


# --- UDP --------------------------------------------------------------------------------------


def test_udp_two_clients_each_get_their_own_replies(
    spawn_proxy: Callable[..., RunningProxy], udp_echo_server: Callable[[str], tuple[str, int]]
) -> None:
    backend = udp_echo_server("127.0.0.1")
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("udp", "127.0.0.1", port, backend))
    assert proxy.status == b"0\n"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as alice,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bob,
    ):
        for round_number in range(5):
            alice.sendto(b"alice %d" % round_number, ("127.0.0.1", port))
            bob.sendto(b"bob %d" % round_number, ("127.0.0.1", port))
            alice.settimeout(IO_TIMEOUT)
            bob.settimeout(IO_TIMEOUT)
            assert alice.recvfrom(100) == (b"alice %d" % round_number, ("127.0.0.1", port))
            assert bob.recvfrom(100) == (b"bob %d" % round_number, ("127.0.0.1", port))
        big = os.urandom(60_000)
        assert udp_exchange(alice, ("127.0.0.1", port), big) == (big, ("127.0.0.1", port))


def test_udp_flow_recovers_once_the_backend_listens(
    spawn_proxy: Callable[..., RunningProxy],
) -> None:
    """A client whose first datagrams met a closed port (ICMP port unreachable on the flow's
    connected socket, EPOLLERR) is answered once the backend listens, on the same flow."""
    backend_port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("udp", "127.0.0.1", port, ("127.0.0.1", backend_port)))
    assert proxy.status == b"0\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.2)
        for _ in range(5):  # refused at the backend: no answer
            client.sendto(b"early", ("127.0.0.1", port))
            with pytest.raises(TimeoutError):
                client.recvfrom(100)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as backend:
            backend.bind(("127.0.0.1", backend_port))
            backend.settimeout(IO_TIMEOUT)
            answered = False
            deadline = time.monotonic() + IO_TIMEOUT
            while not answered and time.monotonic() < deadline:
                client.sendto(b"late", ("127.0.0.1", port))
                try:
                    data, peer = backend.recvfrom(100)
                except TimeoutError:
                    continue
                backend.sendto(b"echo:" + data, peer)
                try:
                    answered = client.recvfrom(100)[0] == b"echo:late"
                except TimeoutError:
                    pass
            assert answered, "the flow stayed deaf after the backend's port was refused"


def test_udp_reply_leaves_from_the_address_the_client_sent_to(
    spawn_proxy: Callable[..., RunningProxy], udp_echo_server: Callable[[str], tuple[str, int]]
) -> None:
    backend = udp_echo_server("127.0.0.1")
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0")
    proxy = spawn_proxy(proxy_args("udp", "0.0.0.0", port, backend))
    assert proxy.status == b"0\n"
    for local_address in ("127.0.0.2", "127.0.0.1", "127.0.0.3"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            reply = udp_exchange(client, (local_address, port), b"where from?")
            assert reply == (b"where from?", (local_address, port))


def test_udp_dual_stack_listen_fd_replies_from_the_ipv4_address(
    spawn_proxy: Callable[..., RunningProxy], udp_echo_server: Callable[[str], tuple[str, int]]
) -> None:
    backend = udp_echo_server("127.0.0.1")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as bound:
        bound.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        bound.bind(("::", 0))
        port = bound.getsockname()[1]
        proxy = spawn_proxy(proxy_args("udp", "::", port, backend, "-use-listen-fd"), bound)
    assert proxy.status == b"0\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        assert udp_exchange(client, ("127.0.0.2", port), b"v4") == (b"v4", ("127.0.0.2", port))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
        assert udp_exchange(client, ("::1", port), b"v6") == (b"v6", ("::1", port))


def test_udp_ipv6_listener_to_ipv4_backend(
    spawn_proxy: Callable[..., RunningProxy], udp_echo_server: Callable[[str], tuple[str, int]]
) -> None:
    backend = udp_echo_server("127.0.0.1")
    port = free_port(socket.AF_INET6, socket.SOCK_DGRAM, "::1")
    proxy = spawn_proxy(proxy_args("udp", "::1", port, backend))
    assert proxy.status == b"0\n"
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
        assert udp_exchange(client, ("::1", port), b"six to four") == (
            b"six to four",
            ("::1", port),
        )


def test_udp_idle_flows_are_closed(
    spawn_proxy: Callable[..., RunningProxy], udp_echo_server: Callable[[str], tuple[str, int]]
) -> None:
    backend = udp_echo_server("127.0.0.1")
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("udp", "127.0.0.1", port, backend, "-udp-idle-timeout", "2"))
    assert proxy.status == b"0\n"
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]
    try:
        # An idle proxy makes its event loop at the first datagram (proxy/idle.py): count its
        # fds from there, less the backend socket of that first flow.
        assert udp_exchange(clients[0], ("127.0.0.1", port), b"hi")[0] == b"hi"
        idle_fds = proxy.fd_count() - 1
        for client in clients[1:]:
            assert udp_exchange(client, ("127.0.0.1", port), b"hi")[0] == b"hi"
        assert proxy.fd_count() == idle_fds + len(clients)  # one backend socket per flow
        assert wait_until(lambda: proxy.fd_count() == idle_fds)
        # A client whose flow expired simply gets a new one.
        assert udp_exchange(clients[0], ("127.0.0.1", port), b"again")[0] == b"again"
    finally:
        for client in clients:
            client.close()


def test_udp_full_flow_table_is_logged_once(
    spawn_proxy: Callable[..., RunningProxy], udp_echo_server: Callable[[str], tuple[str, int]]
) -> None:
    backend = udp_echo_server("127.0.0.1")
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    proxy = spawn_proxy(proxy_args("udp", "127.0.0.1", port, backend))
    assert proxy.status == b"0\n"
    _allow_open_files(2048)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(1034)]
    try:
        for client in clients[:1024]:
            assert udp_exchange(client, ("127.0.0.1", port), b"fill")[0] == b"fill"
        for client in clients[1024:]:
            client.sendto(b"no room", ("127.0.0.1", port))
        # The listener's queue is FIFO: once this reply is back, the extra datagrams were seen.
        assert udp_exchange(clients[0], ("127.0.0.1", port), b"still here")[0] == b"still here"
        assert proxy.stderr().count("UDP flow table full (1024 flows)") == 1
    finally:
        for client in clients:
            client.close()


def _allow_open_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count, hard), hard))


# --- supervisor -------------------------------------------------------------------------------

LOOP_FACTORIES = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(loop_name: str, coroutine: object) -> None:
    with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop_name]) as runner:
        runner.run(coroutine)  # type: ignore[arg-type]


def _process_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


SUPERVISOR_MODES = {"fork-server": True, "exec": False}


@pytest.mark.parametrize("mode", sorted(SUPERVISOR_MODES))
@pytest.mark.parametrize("loop_name", sorted(LOOP_FACTORIES))
def test_supervisor_start_and_stop(
    loop_name: str, mode: str, tcp_server: Callable[..., tuple[str, int]]
) -> None:
    backend = tcp_server()

    async def scenario() -> None:
        supervisor = ProxySupervisor(fork_server=SUPERVISOR_MODES[mode])
        try:
            with socket.socket() as bound:
                bound.bind(("127.0.0.1", 0))
                port = bound.getsockname()[1]
                spec = ProxySpec("tcp", "127.0.0.1", port, backend[0], backend[1])
                key = f"c1/tcp/127.0.0.1/{port}"
                pid = await supervisor.start(key, spec, bound)
            assert supervisor.pids() == {key: pid}
            reply = await asyncio.to_thread(tcp_roundtrip, "127.0.0.1", port, b"supervised")
            assert reply == b"supervised"
            with pytest.raises(ProxyError, match="already running"):
                with socket.socket() as other:
                    await supervisor.start(key, spec, other)
            await supervisor.stop(key)
            assert supervisor.pids() == {}
            assert _process_gone(pid)
            with socket.socket() as again:  # the supervisor's dup is closed too
                again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                again.bind(("127.0.0.1", port))
                again.listen()
        finally:
            await supervisor.stop_all()
        assert supervisor.fork_server_pid is None

    run_on(loop_name, scenario())


@pytest.mark.parametrize("mode", sorted(SUPERVISOR_MODES))
@pytest.mark.parametrize("loop_name", sorted(LOOP_FACTORIES))
def test_supervisor_restarts_a_killed_proxy_on_the_same_socket(
    loop_name: str,
    mode: str,
    tcp_server: Callable[..., tuple[str, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = tcp_server()
    caplog.set_level(logging.WARNING, logger="proxy.supervisor")

    async def scenario() -> None:
        supervisor = ProxySupervisor(fork_server=SUPERVISOR_MODES[mode])
        with socket.socket() as bound:
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            key = f"c1/tcp/127.0.0.1/{port}"
            first_pid = await supervisor.start(
                key, ProxySpec("tcp", "127.0.0.1", port, *backend), bound
            )
        try:
            os.kill(first_pid, signal.SIGKILL)
            # Sent while no proxy runs: it waits in the kept socket's queue for the new one.
            reply = await asyncio.to_thread(tcp_roundtrip, "127.0.0.1", port, b"after kill")
            assert reply == b"after kill"
            second_pid = supervisor.pids()[key]
            assert second_pid != first_pid
            assert _process_gone(first_pid)
        finally:
            await supervisor.stop_all()
        assert supervisor.pids() == {}
        assert _process_gone(second_pid)

    run_on(loop_name, scenario())
    restarts = [r for r in caplog.records if "exited unexpectedly" in r.getMessage()]
    assert len(restarts) == 1
    assert "SIGKILL" in restarts[0].getMessage()


def _process_gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(child) for child in f.read().split()}


def set_child_subreaper(enabled: bool) -> None:
    """prctl(2) PR_SET_CHILD_SUBREAPER: orphaned descendants are reparented to this process."""
    assert _libc.prctl(36, int(enabled), 0, 0, 0) == 0, os.strerror(ctypes.get_errno())


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise AssertionError(f"no PPid line for {pid}")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def test_fork_server_proxy_is_named_and_holds_none_of_the_servers_fds(
    tcp_server: Callable[..., tuple[str, int]],
) -> None:
    backend = tcp_server()

    async def scenario() -> None:
        supervisor = ProxySupervisor(fork_server=True)
        try:
            with socket.socket() as bound:
                bound.bind(("127.0.0.1", 0))
                port = bound.getsockname()[1]
                spec = ProxySpec("tcp", "127.0.0.1", port, *backend)
                pid = await supervisor.start("named", spec, bound)
            server_pid = supervisor.fork_server_pid
            assert server_pid is not None
            assert _parent_pid(pid) == server_pid
            with open(f"/proc/{pid}/comm") as comm:
                assert comm.read().strip() == "pyengine-proxy"
            assert os.readlink(f"/proc/{pid}/fd/4").startswith("socket:")  # the listener
            # Neither the server's control socket nor its signalfd leaked into the proxy.
            assert not _socket_inodes(pid) & _socket_inodes(server_pid)
            reply = await asyncio.to_thread(tcp_roundtrip, "127.0.0.1", port, b"forked")
            assert reply == b"forked"
        finally:
            await supervisor.stop_all()
        assert _process_gone(server_pid)
        assert _process_gone(pid)

    run_on("uvloop", scenario())


def test_fork_server_death_restarts_its_proxies_on_the_same_sockets(
    tcp_server: Callable[..., tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    backend = tcp_server()
    caplog.set_level(logging.WARNING, logger="proxy.supervisor")

    orphans: set[int] = set()

    async def scenario() -> None:
        supervisor = ProxySupervisor(fork_server=True)
        ports: list[int] = []
        try:
            for n in range(3):
                with socket.socket() as bound:
                    bound.bind(("127.0.0.1", 0))
                    ports.append(bound.getsockname()[1])
                    spec = ProxySpec("tcp", "127.0.0.1", ports[-1], *backend)
                    await supervisor.start(f"p{n}", spec, bound)
            old_pids = set(supervisor.pids().values())
            old_server = supervisor.fork_server_pid
            assert old_server is not None
            orphans.update(_children_of(old_server))  # its proxies
            assert old_pids <= orphans
            os.kill(old_server, signal.SIGKILL)
            # Its proxies get SIGTERM from the kernel (PR_SET_PDEATHSIG) and drop what they had
            # accepted; the supervisor starts them again from a new fork server.
            deadline = time.monotonic() + IO_TIMEOUT
            while time.monotonic() < deadline:
                current = set(supervisor.pids().values())
                if len(current) == 3 and not current & old_pids:
                    break
                await asyncio.sleep(0.02)
            for port in ports:
                reply = await asyncio.to_thread(tcp_roundtrip, "127.0.0.1", port, b"again")
                assert reply == b"again"
            new_pids = set(supervisor.pids().values())
            assert len(new_pids) == 3
            assert not new_pids & old_pids
            assert supervisor.fork_server_pid not in (None, old_server)
            assert all(_process_gone_or_zombie(pid) for pid in orphans)
        finally:
            await supervisor.stop_all()

    # The orphans are reparented to the nearest subreaper (this process, for the test) and
    # reaped here; the init of some machines never reaps them.
    set_child_subreaper(True)
    try:
        run_on("uvloop", scenario())
    finally:
        set_child_subreaper(False)
        for pid in orphans:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    restarts = [r for r in caplog.records if "exited unexpectedly" in r.getMessage()]
    assert len(restarts) == 3


def test_supervisor_udp_proxy(udp_echo_server: Callable[[str], tuple[str, int]]) -> None:
    backend = udp_echo_server("127.0.0.1")

    async def scenario() -> None:
        supervisor = ProxySupervisor()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bound:
            bound.bind(("0.0.0.0", 0))
            port = bound.getsockname()[1]
            spec = ProxySpec("udp", "0.0.0.0", port, *backend)
            await supervisor.start(f"c1/udp/0.0.0.0/{port}", spec, bound)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                reply = await asyncio.to_thread(udp_exchange, client, ("127.0.0.2", port), b"u")
            assert reply == (b"u", ("127.0.0.2", port))
        finally:
            await supervisor.stop_all()

    run_on("uvloop", scenario())


def test_supervisor_reports_start_up_errors() -> None:
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp_socket:
            tcp_socket.bind(("127.0.0.1", 0))
            port = tcp_socket.getsockname()[1]
            for fork_server in (True, False):
                supervisor = ProxySupervisor(fork_server=fork_server)
                wrong_type = ProxySpec("udp", "127.0.0.1", port, "127.0.0.1", 9)
                try:
                    with pytest.raises(ProxyError, match="fd 4 is not a udp socket"):
                        await supervisor.start("wrong", wrong_type, tcp_socket)
                    assert supervisor.pids() == {}
                finally:
                    await supervisor.stop_all()
            spec = ProxySpec("tcp", "127.0.0.1", port, "127.0.0.1", 9)
            dies_at_once = ProxySupervisor(argv=["/bin/false"])
            with pytest.raises(ProxyError, match=r"exited during start-up \(exit code 1\)"):
                await dies_at_once.start("false", spec, tcp_socket)
            missing = ProxySupervisor(argv=["/nonexistent/pyengine-proxy"])
            with pytest.raises(ProxyError, match="cannot run"):
                await missing.start("missing", spec, tcp_socket)

    run_on("asyncio", scenario())


def _private_dirty_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    raise AssertionError(f"no Private_Dirty in /proc/{pid}/smaps_rollup")


def _status_pipe() -> tuple[int, int]:
    return os.pipe2(os.O_CLOEXEC)


def test_fork_server_proxy_idles_outside_python_and_stops_with_exit_code_zero(
    tcp_server: Callable[..., tuple[str, int]],
) -> None:
    """A forked proxy waits for its first traffic in the fork server's C loop: it shares the
    server's pages (a Python wait would hold private copies of ~1.5 MB of them), and SIGTERM,
    idle or serving, closes it with exit code 0, as docker-proxy."""
    backend = tcp_server()

    async def start(client: ForkServerClient) -> tuple[int, ChildProcess]:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            status_read, status_write = _status_pipe()
            args = ["-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", str(port)]
            args += ["-container-ip", backend[0], "-container-port", str(backend[1])]
            try:
                child = await client.spawn(
                    [*args, "-use-listen-fd"], {3: status_write, 4: listener.fileno()}
                )
            finally:
                os.close(status_write)
            try:
                status = await asyncio.wait_for(read_status(status_read), IO_TIMEOUT)
            finally:
                os.close(status_read)
        assert status == b"0\n"
        return port, child

    async def scenario() -> None:
        client = ForkServerClient()
        try:
            idle_port, idle = await start(client)
            busy_port, busy = await start(client)
            await asyncio.sleep(0.2)
            assert _private_dirty_kb(idle.pid) < 400
            reply = await asyncio.to_thread(tcp_roundtrip, "127.0.0.1", busy_port, b"wakes")
            assert reply == b"wakes"
            for child in (idle, busy):
                child.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(child.exited, IO_TIMEOUT)
                assert code == 0
            for port in (idle_port, busy_port):
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT).close()
        finally:
            await client.close()

    run_on("uvloop", scenario())


def test_fork_server_that_cannot_start_is_reported() -> None:
    async def scenario() -> None:
        for argv in (["/bin/false"], ["/nonexistent/python"]):
            client = ForkServerClient(argv)
            with pytest.raises(ForkServerError, match="fork server"):
                await client.spawn(["-v"], {})
            await client.close()

    run_on("uvloop", scenario())


def test_supervisor_gives_up_on_a_silent_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy.supervisor.HANDSHAKE_TIMEOUT_SECONDS", 0.5)

    async def scenario() -> None:
        silent = ProxySupervisor(argv=[sys.executable, "-c", "import time; time.sleep(60)"])
        with socket.socket() as bound:
            bound.bind(("127.0.0.1", 0))
            spec = ProxySpec("tcp", "127.0.0.1", bound.getsockname()[1], "127.0.0.1", 9)
            with pytest.raises(ProxyError, match="did not report start-up"):
                await silent.start("silent", spec, bound)
        assert silent.pids() == {}

    run_on("asyncio", scenario())


# --- PROXY protocol toward the container --------------------------------------------------------


def test_proxy_protocol_headers_are_byte_exact() -> None:
    v1 = proxyprotocol.header("v1", ("192.0.2.7", 51000), ("198.18.0.1", 8080))
    assert v1 == b"PROXY TCP4 192.0.2.7 198.18.0.1 51000 8080\r\n"
    v1_six = proxyprotocol.header("v1", ("2001:db8::7", 51000, 0, 0), ("::1", 80, 0, 0))
    assert v1_six == b"PROXY TCP6 2001:db8::7 ::1 51000 80\r\n"
    v2 = proxyprotocol.header("v2", ("192.0.2.7", 51000), ("198.18.0.1", 8080))
    assert v2 == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        + b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 bytes follow
        + bytes([192, 0, 2, 7, 198, 18, 0, 1])
        + struct.pack("!HH", 51000, 8080)
    )
    v2_six = proxyprotocol.header("v2", ("::1", 1, 0, 0), ("::2", 2, 0, 0))
    assert v2_six[12:16] == b"\x21\x21\x00\x24" and len(v2_six) == 16 + 36
    # A dual-stack listener sees IPv4 clients as IPv4-mapped: the header says TCP4.
    mapped = proxyprotocol.header("v1", ("::ffff:192.0.2.7", 5, 0, 0), ("::ffff:198.18.0.1", 6))
    assert mapped == b"PROXY TCP4 192.0.2.7 198.18.0.1 5 6\r\n"
    with pytest.raises(ValueError, match="v3"):
        proxyprotocol.header("v3", ("192.0.2.7", 1), ("198.18.0.1", 2))


def test_proxy_protocol_flag() -> None:
    args = proxy_args("tcp", "127.0.0.1", 1, ("127.0.0.1", 2))
    assert parse_command_line(args).options.proxy_protocol is None  # type: ignore[union-attr]
    parsed = parse_command_line([*args, "-proxy-protocol", "V2"])
    assert parsed.options is not None and parsed.options.proxy_protocol == "v2"
    off = parse_command_line([*args, "-proxy-protocol=off"])
    assert off.options is not None and off.options.proxy_protocol is None
    with pytest.raises(UsageError, match="want v1 or v2"):
        parse_command_line([*args, "-proxy-protocol", "v3"])
    with pytest.raises(UsageError, match="only for -proto tcp"):
        parse_command_line(
            [*proxy_args("udp", "127.0.0.1", 1, ("127.0.0.1", 2)), "-proxy-protocol", "v1"]
        )
    spec = ProxySpec("tcp", "0.0.0.0", 8080, "172.17.0.2", 80, proxy_protocol="v1")
    assert spec.command_line()[-2:] == ["-proxy-protocol", "v1"]


NGINX_PROXY_PROTOCOL_PORT = 8081
NGINX_PROXY_PROTOCOL_LOG = "/var/log/pyetest-proxy-protocol.log"


@pytest.fixture(scope="module")
def nginx_root(tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path) -> Path:
    """The offline nginx image unpacked, with a server that speaks PROXY protocol: it logs and
    answers with the client address the header carried ($proxy_protocol_addr)."""
    require_root()
    root = tmp_path_factory.mktemp("pyetest-nginx-root")
    extract_rootfs(nginx_archive, root)
    port = NGINX_PROXY_PROTOCOL_PORT
    (root / "pyetest-nginx.conf").write_text(
        f"""worker_processes 1;
daemon off;
pid /run/pyetest-nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    log_format proxied '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    access_log {NGINX_PROXY_PROTOCOL_LOG} proxied;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        listen [::1]:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "$proxy_protocol_addr $proxy_protocol_port\\n";
        }}
    }}
}}
"""
    )
    return root


@pytest.fixture
def proxy_protocol_nginx(nginx_root: Path, private_netns: str) -> Iterator[Path]:
    """nginx running in the test's namespace; yields its access log."""
    log_path = nginx_root / NGINX_PROXY_PROTOCOL_LOG.lstrip("/")
    log_path.unlink(missing_ok=True)
    nginx = subprocess.Popen(
        ["ip", "netns", "exec", private_netns, "chroot", str(nginx_root),
         "/usr/sbin/nginx", "-c", "/pyetest-nginx.conf"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + IO_TIMEOUT
        listening = ""
        while time.monotonic() < deadline and nginx.poll() is None:
            listening = subprocess.run(
                ["ip", "netns", "exec", private_netns, "ss", "-Htln"],
                capture_output=True,
                text=True,
            ).stdout
            if f":{NGINX_PROXY_PROTOCOL_PORT} " in listening:
                break
            time.sleep(0.05)
        assert f":{NGINX_PROXY_PROTOCOL_PORT} " in listening, "nginx did not start"
        yield log_path
    finally:
        nginx.terminate()
        try:
            nginx.wait(timeout=IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()


def _http_get_from(source: str, destination: tuple[str, int]) -> tuple[bytes, int]:
    """GET / from ``source`` (a loopback address); the response body and our source port."""
    family = family_of(source)
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(IO_TIMEOUT)
        client.bind((source, 0))
        client.connect(destination)
        client.sendall(b"GET / HTTP/1.0\r\nHost: pyetest\r\n\r\n")
        response = _read_to_eof(client)
        return response.partition(b"\r\n\r\n")[2], client.getsockname()[1]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    ("client", "listen_host", "backend_host"),
    [("127.0.0.5", "127.0.0.1", "127.0.0.1"), ("::1", "::1", "::1"), ("::1", "::1", "127.0.0.1")],
)
def test_proxy_protocol_tells_nginx_the_real_client(
    spawn_proxy: Callable[..., RunningProxy],
    proxy_protocol_nginx: Path,
    private_netns: str,
    version: str,
    client: str,
    listen_host: str,
    backend_host: str,
) -> None:
    def scenario() -> tuple[bytes, int]:
        port = free_port(family_of(listen_host), socket.SOCK_STREAM, listen_host)
        backend = (backend_host, NGINX_PROXY_PROTOCOL_PORT)
        args = proxy_args("tcp", listen_host, port, backend, "-proxy-protocol", version)
        proxy = spawn_proxy(args)
        assert proxy.status == b"0\n"
        return _http_get_from(client, (listen_host, port))

    body, client_port = run_in_netns(private_netns, scenario)
    # nginx saw the proxy connect from the loopback, but learned the client from the header.
    assert body == f"{client} {client_port}\n".encode()
    assert wait_until(lambda: proxy_protocol_nginx.exists() and proxy_protocol_nginx.read_text())
    logged = proxy_protocol_nginx.read_text().split()
    assert logged == [client, str(client_port), backend_host]


def test_without_proxy_protocol_nginx_rejects_the_connection(
    spawn_proxy: Callable[..., RunningProxy], proxy_protocol_nginx: Path, private_netns: str
) -> None:
    # Off by default: a backend that insists on the header gets none and closes.
    def scenario() -> bytes:
        port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        backend = ("127.0.0.1", NGINX_PROXY_PROTOCOL_PORT)
        proxy = spawn_proxy(proxy_args("tcp", "127.0.0.1", port, backend))
        assert proxy.status == b"0\n"
        return _http_get_from("127.0.0.5", ("127.0.0.1", port))[0]

    assert run_in_netns(private_netns, scenario) == b""
