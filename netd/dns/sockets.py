"""The responder's listening sockets: a UDP and a TCP socket on one address and port, created in
the caller's network namespace or in another one (a container's, where Docker's 127.0.0.11
lives).

A socket belongs to the namespace of the thread that created it, for its whole life
(socket(7), network_namespaces(7)). So the sockets for another namespace are made by a
short-lived thread that setns(2)s into it and exits: the daemon's own threads never move, and no
pooled thread is left behind in a container's namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from ipaddress import ip_address

from netd.errors import NetdError

CLONE_NEWNET = 0x40000000  # <linux/sched.h>
TCP_BACKLOG = 128
_PORT_ATTEMPTS = 20  # with port 0, tries to find a port free for both UDP and TCP

_libc = ctypes.CDLL(None, use_errno=True)


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise NetdError(f"DNS listen address {host!r} is not an IP address") from None


def _bind_pair_here(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    family = _family(host)
    last_error: OSError | None = None
    for _ in range(_PORT_ATTEMPTS if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp: socket.socket | None = None
        try:
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.bind((host, port))
            bound_port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            if family == socket.AF_INET6:
                tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, bound_port))
            tcp.listen(TCP_BACKLOG)
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        except OSError as exc:
            udp.close()
            if tcp is not None:
                tcp.close()
            last_error = exc
            # With port 0 the kernel picked a UDP port whose TCP twin is taken: try another.
            if port != 0 or exc.errno != errno.EADDRINUSE:
                break
    raise NetdError(f"cannot listen for DNS on {host}:{port}: {last_error}")


def _enter_netns(netns_path: str) -> None:
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetdError(f"cannot enter network namespace {netns_path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def bind_udp_tcp(
    host: str, port: int, netns_path: str | None = None
) -> tuple[socket.socket, socket.socket]:
    """Non-blocking UDP and listening TCP sockets on ``host``:``port`` (port 0: one free port
    for both), inside ``netns_path`` when given. Raises NetdError; leaves nothing open then."""
    if netns_path is None:
        return _bind_pair_here(host, port)
    if not os.path.exists(netns_path):
        raise NetdError(f"network namespace {netns_path} does not exist")
    result: list[tuple[socket.socket, socket.socket]] = []
    failure: list[BaseException] = []

    def in_namespace() -> None:
        try:
            _enter_netns(netns_path)
            result.append(_bind_pair_here(host, port))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=in_namespace, name="pye-dns-setns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, NetdError):
            raise exc
        raise NetdError(f"cannot listen for DNS in {netns_path}: {exc}")
    return result[0]
