"""One proxy for both families of a port: its command line, and the real proxy serving an IPv4
and an IPv6 listener (fds 4 and 5) for TCP and UDP, restarted on both after a crash, and handed
over with both sockets on live restore. Real fork server and proxies, loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.ports import PortMapping
from engine.lifecycle.proxyplan import proxy_groups
from proxy.options import UsageError, parse_command_line
from proxy.supervisor import ProxySpec, ProxySupervisor
from tests.conftest import require_root

IO_TIMEOUT = 10.0


def test_the_second_listener_is_on_the_command_line_and_in_the_record() -> None:
    first = PortMapping("tcp", "0.0.0.0", 8080, "10.1.0.2", 80)
    second = PortMapping("tcp", "::", 8080, "fd00::2", 80)
    spec = ProxySpec.of(first, "v2", second)
    assert spec.addresses == (("tcp", "0.0.0.0", 8080), ("tcp", "::", 8080))
    options = parse_command_line(spec.command_line()).options
    assert options is not None
    assert options.listeners() == [("0.0.0.0", "10.1.0.2"), ("::", "fd00::2")]
    assert options.describe() == "tcp 0.0.0.0:8080 -> 10.1.0.2:80, [::]:8080 -> [fd00::2]:80"
    assert ProxySpec.from_json(spec.to_json()) == spec
    # A record written before the second listener existed reads as a one-listener spec.
    old = {k: v for k, v in spec.to_json().items() if not k.endswith("ip2")}
    assert ProxySpec.from_json(old).addresses == (spec.address,)
    with pytest.raises(ValueError):
        ProxySpec.of(first, None, PortMapping("tcp", "::", 8081, "fd00::2", 80))


@pytest.mark.parametrize(
    "args, message",
    [
        (["-host-ip2", "::"], "go together"),
        (["-host-ip2", "::", "-container-ip2", "::1"], "needs -use-listen-fd"),
        (["-use-listen-fd", "-host-ip2", "x", "-container-ip2", "::1"], "invalid IP address"),
    ],
)
def test_a_bad_second_listener_is_refused_in_one_line(args: list[str], message: str) -> None:
    base = ["-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", "80"]
    base += ["-container-ip", "10.0.0.2", "-container-port", "80"]
    with pytest.raises(UsageError, match=message):
        parse_command_line(base + args)


def test_ports_on_both_unspecified_addresses_pair_up() -> None:
    ports = [
        PortMapping("tcp", "::", 80, "10.0.0.2", 80),
        PortMapping("tcp", "0.0.0.0", 80, "10.0.0.2", 80),
        PortMapping("udp", "0.0.0.0", 80, "10.0.0.2", 80),
        PortMapping("tcp", "127.0.0.1", 81, "10.0.0.2", 80),
        PortMapping("tcp", "::", 82, "10.0.0.2", 80),
        PortMapping("tcp", "0.0.0.0", 0, "10.0.0.2", 90),  # routed: no proxy
    ]
    groups = {key: [(p.proto, p.host_ip) for p in g] for key, g in proxy_groups("c", ports)}
    assert groups == {
        "c/tcp/0.0.0.0/80": [("tcp", "0.0.0.0"), ("tcp", "::")],
        "c/udp/0.0.0.0/80": [("udp", "0.0.0.0")],
        "c/tcp/127.0.0.1/81": [("tcp", "127.0.0.1")],
        "c/tcp/::/82": [("tcp", "::")],
    }


@contextlib.contextmanager
def echo_servers(proto: str) -> Iterator[int]:
    """Echo servers on 127.0.0.1 and ::1 on one port (a proxy's two listeners forward to one
    container port); yields the port."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    for _ in range(20):
        v4 = socket.socket(socket.AF_INET, kind)
        v4.bind(("127.0.0.1", 0))
        port = v4.getsockname()[1]
        v6 = socket.socket(socket.AF_INET6, kind)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            v6.bind(("::1", port))
            break
        except OSError:
            v4.close()
            v6.close()
    else:
        pytest.fail("no port free on both 127.0.0.1 and ::1")
    stopping = threading.Event()

    def serve(sock: socket.socket) -> None:
        sock.settimeout(0.2)
        if proto == "tcp":
            sock.listen()
        while not stopping.is_set():
            try:
                if proto == "udp":
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data + b" via " + sock.getsockname()[0].encode(), peer)
                    continue
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(IO_TIMEOUT)
                data = conn.recv(2048)
                conn.sendall(data + b" via " + sock.getsockname()[0].encode())

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in (v4, v6)]
    for t in threads:
        t.start()
    try:
        yield port
    finally:
        stopping.set()
        for t in threads:
            t.join(timeout=5)
        v4.close()
        v6.close()


def listeners(proto: str) -> tuple[socket.socket, socket.socket]:
    """The daemon's reservations of one port on 127.0.0.1 and on ::1."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    for _ in range(20):
        v4 = socket.socket(socket.AF_INET, kind)
        v4.bind(("127.0.0.1", 0))
        v6 = socket.socket(socket.AF_INET6, kind)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            v6.bind(("::1", v4.getsockname()[1]))
            return v4, v6
        except OSError:
            v4.close()
            v6.close()
    pytest.fail("no port free on both 127.0.0.1 and ::1")


def ask(proto: str, host: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.settimeout(IO_TIMEOUT)
        s.connect((host, port))
        s.send(b"hello")
        return s.recv(2048)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_one_proxy_serves_both_listeners_and_is_handed_over_with_both(
    tmp_path: Path, proto: str
) -> None:
    require_root()
    state_path = tmp_path / "proxies"
    v4, v6 = listeners(proto)
    host_port = v4.getsockname()[1]

    async def first(backend: int) -> int:
        supervisor = ProxySupervisor(state_path=state_path, outlive_daemon=True)
        spec = ProxySpec.of(
            PortMapping(proto, "127.0.0.1", host_port, "127.0.0.1", backend),
            None,
            PortMapping(proto, "::1", host_port, "::1", backend),
        )
        pid = await supervisor.start("c1/both", spec, (v4, v6))
        answers = [await asyncio.to_thread(ask, proto, h, host_port) for h in ("127.0.0.1", "::1")]
        assert answers == [b"hello via 127.0.0.1", b"hello via ::1"]
        # Killed, it comes back on both of its sockets.
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + IO_TIMEOUT
        while supervisor.pids().get("c1/both") in (None, pid):
            assert time.monotonic() < deadline, "the killed proxy was not restarted"
            await asyncio.sleep(0.02)
        answer = await asyncio.to_thread(ask, proto, "::1", host_port)
        assert answer == b"hello via ::1"
        restarted = supervisor.pids()["c1/both"]
        await supervisor.detach()
        return restarted

    async def second(pid: int) -> None:
        supervisor = ProxySupervisor(state_path=state_path, outlive_daemon=True)
        try:
            held = await supervisor.take_over()
            assert sorted(held) == [(proto, "127.0.0.1", host_port), (proto, "::1", host_port)]
            reservations = (held[(proto, "127.0.0.1", host_port)], held[(proto, "::1", host_port)])
            spec = ProxySpec.of(
                PortMapping(proto, "127.0.0.1", host_port, "127.0.0.1", backend),
                None,
                PortMapping(proto, "::1", host_port, "::1", backend),
            )
            assert await supervisor.adopt_survivor("c1/both", spec, reservations) == pid
            for sock in reservations:
                sock.close()
            answer = await asyncio.to_thread(ask, proto, "127.0.0.1", host_port)
            assert answer == b"hello via 127.0.0.1"
        finally:
            await supervisor.stop_all()

    with echo_servers(proto) as backend:
        try:
            pid = asyncio.run(first(backend))
            v4.close()
            v6.close()
            try:
                asyncio.run(second(pid))
            finally:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        finally:
            v4.close()
            v6.close()
    assert not state_path.exists()
