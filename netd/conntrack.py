"""Flushing stale UDP conntrack entries for a newly published host port.

A UDP flow seen before the DNAT mapping existed keeps its conntrack entry (and so its old,
un-NATed destination) for as long as packets keep arriving; NAT rules are consulted only for
a connection's first packet (conntrack(8)). Docker flushes such entries (moby#44688) but by the
container port (moby#53384); the entry's original destination is the *host* port.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import Conntrack, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

_LOOPBACK = IPv4Network("127.0.0.0/8")
ANY_IPV4 = "0.0.0.0"


def _local_ipv4_addresses() -> set[str]:
    with IPRoute() as ipr:
        addrs = ipr.get_addr(family=socket.AF_INET)
        return {a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS") for a in addrs}


def delete_udp_flows_to(host_ip: str, host_port: int) -> int:
    """Delete UDP entries whose original destination is ``host_ip:host_port`` (any local
    address when ``host_ip`` is 0.0.0.0). Returns how many were deleted."""
    targets = _local_ipv4_addresses() if host_ip == ANY_IPV4 else {host_ip}
    deleted = 0
    with Conntrack() as ct:
        query = NFCTAttrTuple(proto=socket.IPPROTO_UDP, dport=host_port)
        for entry in list(ct.dump_entries(tuple_orig=query)):
            daddr = entry.tuple_orig.daddr
            if daddr not in targets and not (
                host_ip == ANY_IPV4 and IPv4Address(daddr) in _LOOPBACK
            ):
                continue
            try:
                ct.delete(entry)
                deleted += 1
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:  # it may have expired meanwhile
                    raise
    return deleted
