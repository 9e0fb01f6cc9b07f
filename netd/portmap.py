"""Host port reservation: a bound socket holds each published host port (Docker 28's scheme).

TCP: ``SO_REUSEADDR``, bound, not listening, so a connection that no rule redirects is refused
(RST) instead of hanging. UDP: a classic BPF program ``ret 0`` is attached *before* ``bind(2)``,
so the socket drops every datagram until the filter is detached (socket(7) SO_ATTACH_FILTER,
Documentation/networking/filter.rst).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from netd.errors import NetdError

ANY_IPV4 = "0.0.0.0"

# <asm-generic/socket.h>; Python's socket module does not export these.
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: "return k bytes of the packet"; k = 0 drops it


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_DROP_ALL = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, 0))


def attach_drop_filter(sock: socket.socket) -> None:
    """Make ``sock`` discard every incoming packet (the kernel copies the program)."""
    prog = _SockFprog(len(_DROP_ALL), _DROP_ALL)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))


def detach_drop_filter(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


@dataclass
class PortReservation:
    """A host port held by ``sock`` (``host_ip`` is "0.0.0.0" for all addresses)."""

    proto: str
    host_ip: str
    host_port: int
    sock: socket.socket


def _bind_socket(proto: str, host_ip: str, port: int) -> socket.socket:
    sock_type = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, sock_type | socket.SOCK_CLOEXEC)
    try:
        if proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            attach_drop_filter(sock)
        sock.bind((host_ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _describe(proto: str, host_ip: str, port: int | str) -> str:
    return f"port {port}/{proto} on {host_ip}"


def _bind_error(proto: str, host_ip: str, port: int | str, exc: OSError) -> NetdError:
    if exc.errno == errno.EADDRINUSE:
        return NetdError(f"{_describe(proto, host_ip, port)} is already in use")
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return NetdError(f"cannot bind {_describe(proto, host_ip, port)}: {reason}")


# Docker retries an ephemeral pick this many times when it lands on a port it already holds.
_EPHEMERAL_ATTEMPTS = 10


def reserve_host_port(
    proto: str,
    host_ip: str,
    host_port: int,
    host_port_end: int,
    is_taken: Callable[[str, str, int], bool],
) -> PortReservation:
    """Bind a socket for ``host_port`` (0: ephemeral; with ``host_port_end``: first free one).

    ``is_taken(proto, host_ip, port)`` reports ports this engine already holds: TCP reservations
    share ``SO_REUSEADDR``, so the kernel alone would let two of them bind the same port.
    Ephemeral ports come from ``bind(port 0)``: the kernel picks from ``ip_local_port_range`` and
    skips ``ip_local_reserved_ports`` (ip-sysctl.rst).
    """
    if host_port == 0:
        for _ in range(_EPHEMERAL_ATTEMPTS):
            try:
                sock = _bind_socket(proto, host_ip, 0)
            except OSError as exc:
                raise _bind_error(proto, host_ip, "(ephemeral)", exc) from None
            port = sock.getsockname()[1]
            if not is_taken(proto, host_ip, port):
                return PortReservation(proto, host_ip, port, sock)
            sock.close()
        raise NetdError(f"no free ephemeral port for {proto} on {host_ip}")
    last = host_port_end or host_port
    for port in range(host_port, last + 1):
        if is_taken(proto, host_ip, port):
            continue
        try:
            return PortReservation(proto, host_ip, port, _bind_socket(proto, host_ip, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise _bind_error(proto, host_ip, port, exc) from None
    if host_port_end:
        raise NetdError(f"no free port in {host_port}-{host_port_end}/{proto} on {host_ip}")
    raise NetdError(f"{_describe(proto, host_ip, host_port)} is already in use")
