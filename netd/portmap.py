"""Host port reservation: a bound socket holds each published host port (Docker 28's scheme).

TCP: ``SO_REUSEADDR``, bound, not listening, so a connection that no rule redirects is refused
(RST) instead of hanging. UDP: a classic BPF program ``ret 0`` is attached *before* ``bind(2)``,
so the socket drops every datagram until the filter is detached (socket(7) SO_ATTACH_FILTER,
Documentation/networking/filter.rst).

IPv6 sockets are bound with ``IPV6_V6ONLY`` (ipv6(7)), whatever ``net.ipv6.bindv6only`` says:
"::" then holds the port for IPv6 only, so "0.0.0.0" and "::" are two independent reservations,
and a port published on both families is two sockets on the same port number.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from netd.errors import NetdError

log = logging.getLogger(__name__)

ANY_IPV4 = "0.0.0.0"
ANY_IPV6 = "::"

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


def is_ipv6(host_ip: str) -> bool:
    return ":" in host_ip


def host_addresses_overlap(a: str, b: str) -> bool:
    """Whether reservations of one port on host addresses ``a`` and ``b`` clash: same family,
    and the same address or the family's unspecified one on either side. IPv4 and IPv6 never
    clash, as the IPv6 sockets are IPV6_V6ONLY."""
    if is_ipv6(a) != is_ipv6(b):
        return False
    unspecified = ANY_IPV6 if is_ipv6(a) else ANY_IPV4
    return a == b or unspecified in (a, b)


_DISABLE_IPV6 = Path("/proc/sys/net/ipv6/conf/all/disable_ipv6")


def host_has_ipv6() -> bool:
    """Whether this network namespace does IPv6: the ``ipv6`` sysctls exist (no
    ``ipv6.disable=1``), ``disable_ipv6`` is 0 (ip-sysctl.rst) and AF_INET6 sockets exist."""
    try:
        if _DISABLE_IPV6.read_text().strip() != "0":
            return False
    except FileNotFoundError:
        return False
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC).close()
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            return False
        raise NetdError(f"cannot create an IPv6 socket: {os.strerror(exc.errno or 0)}") from None
    return True


def _bind_socket(proto: str, host_ip: str, port: int) -> socket.socket:
    sock_type = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if is_ipv6(host_ip) else socket.AF_INET
    sock = socket.socket(family, sock_type | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
    if exc.errno == errno.EMFILE:
        # Each reserved port is a socket the daemon holds (and in proxy mode, more fds).
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return NetdError(
            f"cannot bind {_describe(proto, host_ip, port)}: the daemon has used up its "
            f"{soft} open files (RLIMIT_NOFILE): publish fewer ports or raise the limit"
        )
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


def _bind_free(
    proto: str, host_ip: str, port: int, is_taken: Callable[[str, str, int], bool]
) -> socket.socket | None:
    """A socket holding ``host_ip:port``; None when this engine or another socket holds it."""
    if is_taken(proto, host_ip, port):
        return None
    try:
        return _bind_socket(proto, host_ip, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return None
        raise


def _reserve_both_families(
    proto: str, port: int, is_taken: Callable[[str, str, int], bool]
) -> list[PortReservation] | str:
    """``port`` on 0.0.0.0 and on ::, or the address that is held already. Only 0.0.0.0 when
    :: cannot be bound at all (EADDRNOTAVAIL: IPv6 is off on this host)."""
    try:
        v4 = _bind_free(proto, ANY_IPV4, port, is_taken)
    except OSError as exc:
        raise _bind_error(proto, ANY_IPV4, port, exc) from None
    if v4 is None:
        return ANY_IPV4
    reserved = [PortReservation(proto, ANY_IPV4, port, v4)]
    try:
        v6 = _bind_free(proto, ANY_IPV6, port, is_taken)
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            log.info("cannot bind [::]: no IPv6; port %d/%s is published on IPv4 only", port, proto)
            return reserved
        v4.close()
        raise _bind_error(proto, ANY_IPV6, port, exc) from None
    except BaseException:
        v4.close()
        raise
    if v6 is None:
        v4.close()
        return ANY_IPV6
    return [*reserved, PortReservation(proto, ANY_IPV6, port, v6)]


def reserve_dual_stack_port(
    proto: str,
    host_port: int,
    host_port_end: int,
    is_taken: Callable[[str, str, int], bool],
    ipv6: bool | None = None,
) -> list[PortReservation]:
    """Reserve one port number on 0.0.0.0 *and* on :: (Docker 28 publishes a port without a
    host address on both families): a fixed port must be free on both, and an ephemeral pick or
    a range takes the first port free on both. Without IPv6 on this host (``host_has_ipv6``,
    or ``ipv6`` False when the caller asked already, or :: refusing to bind) only the 0.0.0.0
    reservation is made, as Docker does.
    """
    if not (host_has_ipv6() if ipv6 is None else ipv6):
        log.info("no IPv6 on this host: %s ports are published on IPv4 only", proto)
        return [reserve_host_port(proto, ANY_IPV4, host_port, host_port_end, is_taken)]
    both = f"{ANY_IPV4} and {ANY_IPV6}"
    if host_port == 0:
        for _ in range(_EPHEMERAL_ATTEMPTS):
            # The kernel's pick for IPv4, then both families on that number; a port someone
            # holds on :: only sends us round again.
            pick = reserve_host_port(proto, ANY_IPV4, 0, 0, is_taken)
            pick.sock.close()
            reserved = _reserve_both_families(proto, pick.host_port, is_taken)
            if not isinstance(reserved, str):
                return reserved
        raise NetdError(f"no free ephemeral port for {proto} on {both}")
    busy = ANY_IPV4
    for port in range(host_port, (host_port_end or host_port) + 1):
        reserved = _reserve_both_families(proto, port, is_taken)
        if not isinstance(reserved, str):
            return reserved
        busy = reserved
    if host_port_end:
        raise NetdError(f"no free port in {host_port}-{host_port_end}/{proto} on {both}")
    raise NetdError(f"{_describe(proto, busy, host_port)} is already in use")
