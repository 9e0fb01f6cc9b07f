"""The fork server's warm-up with traffic: a throwaway TCP and UDP proxy each relay a few
connections and datagrams on 127.0.0.1 before the server forks anything.

Python 3.11 specialises an instruction after it has run a few times (PEP 659), writing to the
code object, and fills caches on first use. A forked proxy whose first connection runs code
the server never ran makes those writes itself, each one copying a page it shared with the
server: measured on a launcher's proxy (private memory after its first connection), 2.60 MB
without this warm-up, 2.43 MB with it. Everything here stays on loopback, is bounded in time,
and leaves no fd, task or thread behind (nothing may use libuv's thread pool: a fork server
has one thread); a failure only means a colder start.
"""

from __future__ import annotations

import asyncio
import os
import socket

import uvloop

from proxy.options import DEFAULT_UDP_IDLE_TIMEOUT, parse_command_line
from proxy.tcp import TcpProxy
from proxy.udp import UdpProxy

ROUNDS = 16  # more than the executions after which an instruction is specialised
TIMEOUT_SECONDS = 5.0
_ARGV = ["-host-ip", "127.0.0.1", "-host-port", "1", "-container-ip", "127.0.0.1"]


def rehearse_traffic(rounds: int = ROUNDS) -> bool:
    """Relay ``rounds`` TCP connections and UDP datagrams through throwaway proxies, and parse
    a proxy's command line as many times; False if the loopback traffic could not run."""
    for _ in range(rounds):
        for proto in ("tcp", "udp"):
            parse_command_line(["-proto", proto, *_ARGV, "-container-port", "2", "-use-listen-fd"])
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(_both(rounds), TIMEOUT_SECONDS))
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        loop.close()


async def _both(rounds: int) -> None:
    await _tcp(rounds)
    await _udp(rounds)


def _bound(kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _tcp(rounds: int) -> None:
    loop = asyncio.get_running_loop()
    backend, listener = _bound(socket.SOCK_STREAM), _bound(socket.SOCK_STREAM)
    backend.listen(rounds)
    listener.listen(rounds)
    proxy = TcpProxy(loop, listener, "127.0.0.1", backend.getsockname()[1])
    try:
        proxy.start()
        for _ in range(rounds):
            client = socket.socket()
            client.setblocking(False)
            try:
                await _connect(loop, client, listener.getsockname())
                await loop.sock_sendall(client, b"warm")
                served, _ = await loop.sock_accept(backend)
                with served:
                    data = await loop.sock_recv(served, 16)
                    await loop.sock_sendall(served, data)
                await loop.sock_recv(client, 16)
            finally:
                client.close()
    finally:
        proxy.close()  # closes the listener
        backend.close()


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]
) -> None:
    """connect(2) without the loop's sock_connect, which resolves the address on libuv's
    thread pool: the fork server must stay one thread (proxy/forkserver.py)."""
    if sock.connect_ex(address) == 0:
        return
    connected: asyncio.Future[None] = loop.create_future()

    def on_writable() -> None:
        if not connected.done():
            connected.set_result(None)

    loop.add_writer(sock.fileno(), on_writable)
    try:
        await connected
    finally:
        loop.remove_writer(sock.fileno())
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def _udp(rounds: int) -> None:
    loop = asyncio.get_running_loop()
    backend, listener = _bound(socket.SOCK_DGRAM), _bound(socket.SOCK_DGRAM)
    proxy = UdpProxy(
        loop, listener, "127.0.0.1", backend.getsockname()[1], DEFAULT_UDP_IDLE_TIMEOUT
    )
    try:
        proxy.start()
        for _ in range(rounds):
            client = _bound(socket.SOCK_DGRAM)
            try:
                client.sendto(b"warm", listener.getsockname())
                data, peer = await _receive(loop, backend)
                backend.sendto(data, peer)
                await _receive(loop, client)
            finally:
                client.close()
    finally:
        proxy.close()  # closes the listener and the flows
        backend.close()


async def _receive(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> tuple[bytes, tuple[str, int]]:
    received: asyncio.Future[tuple[bytes, tuple[str, int]]] = loop.create_future()

    def on_readable() -> None:
        if not received.done():
            received.set_result(sock.recvfrom(64))

    loop.add_reader(sock.fileno(), on_readable)
    try:
        return await received
    finally:
        loop.remove_reader(sock.fileno())
