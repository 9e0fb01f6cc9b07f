"""pyengine-proxy end to end: real processes, real sockets, loopback only."""

from __future__ import annotations

import asyncio
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
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from proxy.options import UsageError, parse_command_line
from proxy.pipes import DEFAULT_MAX_IDLE_PIPES
from proxy.supervisor import ProxyError, ProxySpec, ProxySupervisor

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


def _read_status(fd: int, timeout: float = IO_TIMEOUT) -> bytes:
    """Everything the proxy writes to fd 3, up to the EOF that tells it closed its end."""
    received = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(0.0, remaining))
        if not readable:
            raise AssertionError(f"no start-up status within {timeout} s (got {received!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        received += chunk
    return received


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
            proxy.status = _read_status(read_fd)
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

    # Warm up: 40 connections alive at once use 80 pipes, so afterwards the pool is full.
    fds_without_connections = proxy.fd_count()
    warm = [socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) for _ in range(40)]
    for client in warm:
        client.sendall(b"warm")
        assert client.recv(4) == b"warm"
    for client in warm:
        client.close()
    pooled = wait_until(
        lambda: proxy.fd_count() == fds_without_connections + 2 * DEFAULT_MAX_IDLE_PIPES
    )
    assert pooled, f"{proxy.fd_count()} fds after warm-up, {fds_without_connections} before"
    before = proxy.fd_count()
    for first in range(0, 2000, 50):
        batch(50, first)
    settled = wait_until(lambda: proxy.fd_count() == before)
    assert settled, f"proxy has {proxy.fd_count()} fds, had {before} before 2000 connections"


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
    idle_fds = proxy.fd_count()
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]
    try:
        for client in clients:
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


@pytest.mark.parametrize("loop_name", sorted(LOOP_FACTORIES))
def test_supervisor_start_and_stop(
    loop_name: str, tcp_server: Callable[..., tuple[str, int]]
) -> None:
    backend = tcp_server()

    async def scenario() -> None:
        supervisor = ProxySupervisor()
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

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOP_FACTORIES))
def test_supervisor_restarts_a_killed_proxy_on_the_same_socket(
    loop_name: str,
    tcp_server: Callable[..., tuple[str, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = tcp_server()
    caplog.set_level(logging.WARNING, logger="proxy.supervisor")

    async def scenario() -> None:
        supervisor = ProxySupervisor()
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
            supervisor = ProxySupervisor()
            wrong_type = ProxySpec("udp", "127.0.0.1", port, "127.0.0.1", 9)
            with pytest.raises(ProxyError, match="failed to start: fd 4 is not a udp socket"):
                await supervisor.start("wrong", wrong_type, tcp_socket)
            assert supervisor.pids() == {}
            spec = ProxySpec("tcp", "127.0.0.1", port, "127.0.0.1", 9)
            dies_at_once = ProxySupervisor(argv=["/bin/false"])
            with pytest.raises(ProxyError, match=r"exited during start-up \(exit code 1\)"):
                await dies_at_once.start("false", spec, tcp_socket)
            missing = ProxySupervisor(argv=["/nonexistent/pyengine-proxy"])
            with pytest.raises(ProxyError, match="cannot run"):
                await missing.start("missing", spec, tcp_socket)

    run_on("asyncio", scenario())


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
