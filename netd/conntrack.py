"""Flushing stale UDP conntrack entries for a newly published host port.

A UDP flow seen before the DNAT mapping existed keeps its conntrack entry (and so its old,
un-NATed destination) for as long as packets keep arriving; NAT rules are consulted only for
a connection's first packet (conntrack(8)). Docker flushes such entries (moby#44688) but by the
container port (moby#53384); the entry's original destination is the *host* port.

Both families are handled: an IPv6 host port is never NATed (the userland proxy carries it),
so its stale entries are harmless, but flushing them too keeps one rule for every port.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Network, IPv6Network, ip_address

from pyroute2 import Conntrack, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

ANY_IPV4 = "0.0.0.0"
ANY_IPV6 = "::"
_LOOPBACK: dict[int, IPv4Network | IPv6Network] = {
    socket.AF_INET: IPv4Network("127.0.0.0/8"),
    socket.AF_INET6: IPv6Network("::1/128"),
}


def _local_addresses(family: socket.AddressFamily) -> set[str]:
    with IPRoute() as ipr:
        addrs = ipr.get_addr(family=family)
        return {
            str(ip_address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))) for a in addrs
        }


def delete_udp_flows_to(host_ip: str, host_port: int) -> int:
    """Delete UDP entries whose original destination is ``host_ip:host_port`` (any local
    address of the family when ``host_ip`` is 0.0.0.0 or ::). Returns how many were deleted."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    unspecified = host_ip in (ANY_IPV4, ANY_IPV6)
    targets = _local_addresses(family) if unspecified else {str(ip_address(host_ip))}
    deleted = 0
    with Conntrack(nfgen_family=family) as ct:
        query = NFCTAttrTuple(family=family, proto=socket.IPPROTO_UDP, dport=host_port)
        for entry in list(ct.dump_entries(tuple_orig=query)):
            daddr = ip_address(entry.tuple_orig.daddr)
            if str(daddr) not in targets and not (unspecified and daddr in _LOOPBACK[family]):
                continue
            try:
                ct.delete(entry)
                deleted += 1
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:  # it may have expired meanwhile
                    raise
    return deleted
