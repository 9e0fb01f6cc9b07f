"""Transparent mode: connect to the container from the client's own address and port.

The backend socket gets ``IP_TRANSPARENT`` (``IPV6_TRANSPARENT``), which lets it bind an address
that is not the host's (ip(7), ipv6(7); needs CAP_NET_ADMIN), and is bound to the client's
address before connect(2). The container then answers the client's address; those replies come
back to this host over the bridge (the container's default route) and the host would forward
them to the client, who never sent that SYN. netd installs the return path: packets from a
bridge that belong to a transparent socket are marked (``socket transparent 1`` / ``-m socket
--transparent``), and an ``ip rule`` sends marked packets to a table whose only route is
``local default dev lo``, so they are delivered here, to this socket (the kernel's
Documentation/networking/tproxy.rst, "Making non-local sockets work").

Clients the container cannot answer that way keep the gateway behaviour (the backend socket is
an ordinary one, so the container sees the bridge gateway's address):

* loopback and link-local clients (a container cannot route to the host's 127.0.0.1, ::1 or
  a link-local address of another link);
* a client of the other family than the container address (an IPv6 listener in front of an
  IPv4 container; an IPv4-mapped IPv6 client is taken as its IPv4 address);
* a client inside one of the container's own subnets (``skip``: another container on the
  same bridge): the container would answer it over the bridge, not through this host.

The client's port is kept when it can be (``SO_REUSEADDR``: two published ports may see one
client address and port); when the bind or the connect finds it in use, the kernel picks one.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass

# <linux/in6.h>: Python's socket module does not define it.
IPV6_TRANSPARENT = 75
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
# Errors of a bind or connect whose address and port are taken (a second connection from the
# same client address and port to the same container port, or one still in TIME_WAIT).
RETRY_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})

Address = tuple[str, int] | tuple[str, int, int, int]


@dataclass(frozen=True)
class Prefix:
    """A network as packed bytes and a length: matched without the ``ipaddress`` module
    (see proxy/options.py, ``_parse_ip``)."""

    family: socket.AddressFamily
    packed: bytes
    length: int

    @classmethod
    def parse(cls, text: str) -> Prefix:
        address, _, length_text = text.partition("/")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        packed = socket.inet_pton(family, address)  # OSError when not an address
        bits = len(packed) * 8
        length = int(length_text, 10) if length_text else bits
        if not 0 <= length <= bits:
            raise ValueError(f"invalid prefix length in {text!r}")
        return cls(family, _masked(packed, length), length)

    def contains(self, family: socket.AddressFamily, packed: bytes) -> bool:
        return family == self.family and _masked(packed, self.length) == self.packed

    def __str__(self) -> str:
        return f"{socket.inet_ntop(self.family, self.packed)}/{self.length}"


def _masked(packed: bytes, length: int) -> bytes:
    whole, rest = divmod(length, 8)
    out = bytearray(packed[:whole])
    if rest:
        out.append(packed[whole] & (0xFF << (8 - rest)) & 0xFF)
    return bytes(out) + bytes(len(packed) - len(out))


@dataclass(frozen=True)
class TransparentSource:
    """Which source address a backend connection gets, for one listener's backend family."""

    backend_family: socket.AddressFamily
    skip: tuple[Prefix, ...] = ()

    def source_for(self, client: Address) -> tuple[str, int] | None:
        """The (address, port) to bind the backend socket to, or None for the gateway
        behaviour (see the module's docstring)."""
        host, port = client[0], client[1]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if family == socket.AF_INET6 and host.startswith("::ffff:") and "." in host:
            host, family = host[7:], socket.AF_INET
        if family != self.backend_family:
            return None
        address = host.partition("%")[0]
        try:
            packed = socket.inet_pton(family, address)
        except OSError:
            return None
        if _unanswerable(family, packed):
            return None
        if any(prefix.contains(family, packed) for prefix in self.skip):
            return None
        return (address, port)


def _unanswerable(family: socket.AddressFamily, packed: bytes) -> bool:
    if family == socket.AF_INET:
        # 127.0.0.0/8, 0.0.0.0/8, 169.254.0.0/16
        return packed[0] in (0, 127) or packed[:2] == b"\xa9\xfe"
    # ::, ::1, fe80::/10
    return packed[:15] == bytes(15) or (packed[0] == 0xFE and packed[1] & 0xC0 == 0x80)


def parse_skip(texts: Sequence[str]) -> tuple[Prefix, ...]:
    return tuple(Prefix.parse(text) for text in texts if text)


def bind_source(sock: socket.socket, source: tuple[str, int], *, keep_port: bool = True) -> None:
    """Make ``sock`` transparent and bind it to ``source`` (its port only if ``keep_port``).
    OSError when the kernel refuses (no CAP_NET_ADMIN, the address taken)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((source[0], source[1] if keep_port else 0))
