"""PROXY protocol headers, sent to the backend before the client's bytes, so that it learns the
real client address instead of the proxy's (HAProxy's "The PROXY protocol", versions 1 and 2:
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).

Version 1 is one text line: ``PROXY TCP4 <src> <dst> <srcport> <dstport>\\r\\n``. Version 2 is
binary: a 12-byte signature, version/command, family/protocol, a length, then the addresses.
Both describe the client's connection as the proxy accepted it: source = the client, destination
= the address and port the client connected to.
"""

from __future__ import annotations

import socket
import struct

VERSIONS = ("v1", "v2")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_VERSION_PROXY = 0x21  # version 2, command PROXY
_V2_TCP4 = 0x11  # AF_INET, STREAM
_V2_TCP6 = 0x21  # AF_INET6, STREAM
_V2_HEADER = struct.Struct("!12sBBH")
_V2_IPV4 = struct.Struct("!4s4sHH")
_V2_IPV6 = struct.Struct("!16s16sHH")

Address = tuple[str, int] | tuple[str, int, int, int]


def header(version: str, source: Address, destination: Address) -> bytes:
    """The header for a connection from ``source`` to ``destination`` (as getpeername() and
    getsockname() of the accepted socket report them)."""
    family, source_ip, destination_ip = _common_family(source[0], destination[0])
    if version == "v1":
        kind = "TCP4" if family == socket.AF_INET else "TCP6"
        line = f"PROXY {kind} {source_ip} {destination_ip} {source[1]} {destination[1]}\r\n"
        return line.encode("ascii")
    if version == "v2":
        if family == socket.AF_INET:
            command, addresses = _V2_TCP4, _V2_IPV4
        else:
            command, addresses = _V2_TCP6, _V2_IPV6
        body = addresses.pack(
            socket.inet_pton(family, source_ip),
            socket.inet_pton(family, destination_ip),
            source[1],
            destination[1],
        )
        return _V2_HEADER.pack(V2_SIGNATURE, _V2_VERSION_PROXY, command, len(body)) + body
    raise ValueError(f"unknown PROXY protocol version {version!r} (want v1 or v2)")


def _common_family(source: str, destination: str) -> tuple[socket.AddressFamily, str, str]:
    """Both addresses in one family: a dual-stack listener reports IPv4 clients as IPv4-mapped
    IPv6 (::ffff:a.b.c.d), which the header carries as plain IPv4 when both ends are."""
    source, destination = source.partition("%")[0], destination.partition("%")[0]
    source_v4, destination_v4 = _unmapped(source), _unmapped(destination)
    if source_v4 is not None and destination_v4 is not None:
        return socket.AF_INET, source_v4, destination_v4
    return socket.AF_INET6, _as_ipv6(source), _as_ipv6(destination)


def _unmapped(address: str) -> str | None:
    if ":" not in address:
        return address
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return None


def _as_ipv6(address: str) -> str:
    return address if ":" in address else f"::ffff:{address}"
