"""The proxy's listening sockets: bound here, or handed over by the parent as fd 4 (and fd 5
for the other family of the same port)."""

from __future__ import annotations

import socket

from proxy.handshake import LISTEN_FDS
from proxy.options import ProxyOptions

_SOCKET_TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


class ListenerError(Exception):
    """The listening socket could not be set up; the message says why in one line."""


def address_family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def open_listeners(options: ProxyOptions) -> list[socket.socket]:
    """Non-blocking sockets ready to accept (TCP) or receive (UDP) for ``options``, one per
    listener (:meth:`ProxyOptions.listeners`)."""
    if not options.use_listen_fd:
        return [_bind_listener(options)]
    listeners: list[socket.socket] = []
    try:
        for fd in LISTEN_FDS[: len(options.listeners())]:
            listeners.append(_adopt_listen_fd(options.proto, fd))
    except ListenerError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _adopt_listen_fd(proto: str, fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise ListenerError(f"fd {fd} is not a usable socket: {err.strerror}") from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ListenerError(f"fd {fd} is not an IPv4 or IPv6 socket")
        if sock.type != _SOCKET_TYPES[proto]:
            raise ListenerError(f"fd {fd} is not a {proto} socket")
        sock.set_inheritable(False)
        sock.setblocking(False)
        if proto == "tcp":
            # listen(2) on an already listening socket only updates the backlog, so a proxy
            # restarted on the same socket can call it again.
            sock.listen(socket.SOMAXCONN)
    except ListenerError:
        sock.close()
        raise
    except OSError as err:
        sock.close()
        raise ListenerError(f"cannot listen on fd {fd}: {err.strerror}") from None
    return sock


def _bind_listener(options: ProxyOptions) -> socket.socket:
    family = address_family(options.host_ip)
    sock = socket.socket(family, _SOCKET_TYPES[options.proto])
    try:
        if options.proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # IPv6 only, so that "::" and "0.0.0.0" on the same port can be two proxies
            # (ipv6(7) IPV6_V6ONLY; the kernel default comes from net.ipv6.bindv6only).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((options.host_ip, options.host_port))
        if options.proto == "tcp":
            sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        where = f"{options.host_ip}:{options.host_port}/{options.proto}"
        raise ListenerError(f"cannot listen on {where}: {err.strerror or err}") from None
    return sock
