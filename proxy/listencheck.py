"""The supervisor's copies of a proxy's listening socket: taking one without disturbing the
proxy, and checking that a socket taken out of a running proxy is the listener it should be."""

from __future__ import annotations

import os
import socket

from proxy.handshake import LISTEN_FD
from proxy.spec import ProxySpec

_SOCKET_TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


def dup_socket(sock: socket.socket) -> socket.socket:
    """Another fd for ``sock``, leaving its flags alone. socket.dup() would not: it sets the
    copy's timeout, which clears O_NONBLOCK; that flag belongs to the open file description
    (fcntl(2)), which every dup shares, the proxy's fd 4 included, and a proxy whose listener
    turned blocking blocks in accept(2)."""
    return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))


def listener_problem(sock: socket.socket, spec: ProxySpec, fd: int = LISTEN_FD) -> str | None:
    """Why ``sock``, taken from a proxy's fd ``fd``, cannot be a listener of ``spec``; None if
    it can."""
    try:
        if sock.type != _SOCKET_TYPES.get(spec.proto):
            return f"its fd {fd} is not a {spec.proto} socket"
        port = sock.getsockname()[1]
        if port != spec.host_port:
            return f"its fd {fd} is bound to port {port}, not {spec.host_port}"
        if spec.proto == "tcp" and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return f"its fd {fd} is not listening"
    except OSError as err:
        return f"its fd {fd} is not a usable socket ({err.strerror or err})"
    return None


def same_socket(a: socket.socket, b: socket.socket) -> bool:
    """Whether two fds refer to one socket (sockfs gives each socket an inode of its own)."""
    try:
        first, second = os.fstat(a.fileno()), os.fstat(b.fileno())
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
