"""Packet info ancillary data: which local address a datagram was sent to, so that the reply on
a wildcard-bound UDP socket leaves from that same address.

ip(7) IP_PKTINFO: ``struct in_pktinfo { int ipi_ifindex; struct in_addr ipi_spec_dst;
struct in_addr ipi_addr; }``. On receive, ipi_spec_dst is the local address the kernel would
answer from (for unicast: the header's destination); on sendmsg(2), a non-zero ipi_spec_dst is
used as the source address.

ipv6(7) / RFC 3542 IPV6_PKTINFO: ``struct in6_pktinfo { struct in6_addr ipi6_addr;
int ipi6_ifindex; }``, the destination on receive and the source on send. A dual-stack IPv6
socket reports IPv4 datagrams with an IPv4-mapped ipi6_addr, and accepts one back on send.
"""

from __future__ import annotations

import socket
import struct

# Python's socket module does not export IP_PKTINFO; the value is from <linux/in.h>.
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)

_IN_PKTINFO = struct.Struct("=i4s4s")
_IN6_PKTINFO = struct.Struct("=16si")

# Room for one of each (an IPv6 socket may carry both when IP_PKTINFO is on too).
ANCILLARY_BUFFER_SIZE = socket.CMSG_SPACE(_IN_PKTINFO.size) + socket.CMSG_SPACE(_IN6_PKTINFO.size)

AncillaryItem = tuple[int, int, bytes]


def is_wildcard(address: str) -> bool:
    host = address.partition("%")[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return not any(socket.inet_pton(family, host))


def enable_packet_info(sock: socket.socket) -> None:
    """Ask the kernel to report each datagram's destination address with recvmsg(2)."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)


def reply_source(ancillary: list[AncillaryItem]) -> list[AncillaryItem]:
    """Ancillary data for sendmsg(2) that makes a reply leave from the address the datagram
    described by ``ancillary`` (from recvmsg(2)) was sent to; empty when it carries no info."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, spec_dst, _ = _IN_PKTINFO.unpack_from(data)
            return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, spec_dst, bytes(4)))]
        if (
            level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
            and len(data) >= _IN6_PKTINFO.size
        ):
            destination, ifindex = _IN6_PKTINFO.unpack_from(data)
            if destination[0] == 0xFF:  # ff00::/8, multicast (RFC 4291 2.7)
                return []  # not a valid source; let the kernel choose one
            # The interface only matters for link-local addresses (fe80::/10, RFC 4291 2.5.6),
            # which are ambiguous without it; 0 otherwise lets routing pick the way back.
            if not (destination[0] == 0xFE and destination[1] & 0xC0 == 0x80):
                ifindex = 0
            source = _IN6_PKTINFO.pack(destination, ifindex)
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, source)]
    return []
