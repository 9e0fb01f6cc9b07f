"""Subnets for user-defined networks: picked from address pools, never overlapping another
network or a route of the host.

The default pool is 10.112.0.0/12 carved into /24s (4096 networks of 253 containers). Docker's
own pools are 172.17.0.0/16-172.31.0.0/16 and 192.168.0.0/16 in /20s; ours stays clear of them
so pyengine and a Docker daemon can share a host, and of pyengine's default bridge
(10.47.0.0/16 unless ``--bip`` says otherwise).

Like Docker (libnetwork ``netutils.CheckRouteOverlaps``) the host's IPv4 routes of the main table
are read at creation time and every pool subnet one of them overlaps is skipped; default routes
(0.0.0.0/0) overlap everything and are ignored.

IPv6 networks (``--ipv6``) without an explicit IPv6 subnet get a /64 of the unique local
(RFC 4193) pool fdd0:5079:656e::/48, skipping the /64s the host's IPv6 routes overlap the same
way (::/0 ignored).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from pyroute2 import IPRoute

from netd.errors import Conflict, NetdError

DEFAULT_ADDRESS_POOLS: tuple[tuple[str, int], ...] = (("10.112.0.0/12", 24),)
# "pye" in the 40-bit global ID of an RFC 4193 prefix (fd + 0xd05079656e is "\xd0Pyen").
DEFAULT_IPV6_POOL: tuple[str, int] = ("fdd0:5079:656e::/48", 64)
_RT_TABLE_MAIN = 254  # <linux/rtnetlink.h>


@dataclass(frozen=True)
class HostRoute:
    dst: IPv4Network | IPv6Network
    dev: str


def host_routes() -> list[HostRoute]:
    """The IPv4 and IPv6 routes of the main table (default routes left out; IPv6 link-local,
    multicast and the loopback route too, which no pool subnet can overlap)."""
    routes: list[HostRoute] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family, network in ((socket.AF_INET, IPv4Network), (socket.AF_INET6, IPv6Network)):
            for route in ipr.get_routes(family=family, table=_RT_TABLE_MAIN):
                if route["dst_len"] == 0 or route.get_attr("RTA_DST") is None:
                    continue
                dst = network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False)
                routes.append(HostRoute(dst, names.get(route.get_attr("RTA_OIF"), "")))
    return routes


def parse_pools(pools: Sequence[tuple[str, int]]) -> list[tuple[IPv4Network, int]]:
    parsed = []
    for base, size in pools:
        try:
            network = IPv4Network(base)
        except ValueError:
            raise NetdError(f'invalid address pool "{base}"') from None
        if not network.prefixlen <= size <= 30:
            raise NetdError(f"invalid subnet size /{size} for address pool {network}")
        parsed.append((network, size))
    return parsed


def check_no_route_overlap(
    subnet: IPv4Network | IPv6Network, routes: Iterable[HostRoute], own_bridges: set[str]
) -> None:
    """Refuse a subnet that overlaps a route of the host (routes via our bridges excepted)."""
    for route in routes:
        if route.dst.version != subnet.version or route.dev in own_bridges:
            continue
        if subnet.overlaps(route.dst):
            raise Conflict(
                f"subnet {subnet} overlaps the host route {route.dst} dev {route.dev or '?'}"
            )


def pick_subnet(
    pools: Sequence[tuple[str, int]],
    taken: Sequence[IPv4Network],
    routes: Sequence[HostRoute],
    own_bridges: set[str],
) -> IPv4Network:
    """The first pool subnet overlapping neither ``taken`` nor a foreign host route."""
    blocked = list(taken) + [
        r.dst for r in routes if r.dev not in own_bridges and r.dst.version == 4
    ]
    for base, size in parse_pools(pools):
        for candidate in base.subnets(new_prefix=size):
            if not any(candidate.overlaps(other) for other in blocked):
                return candidate
    described = ", ".join(f"{base} in /{size}s" for base, size in pools)
    raise Conflict(f"all predefined address pools have been fully subnetted ({described})")


def pick_subnet6(
    pool: tuple[str, int],
    taken: Sequence[IPv6Network],
    routes: Sequence[HostRoute],
    own_bridges: set[str],
) -> IPv6Network:
    """The first /64 (``pool``'s size) of ``pool`` overlapping neither ``taken`` nor a foreign
    IPv6 host route."""
    base, size = IPv6Network(pool[0]), pool[1]
    blocked = list(taken) + [
        r.dst for r in routes if r.dev not in own_bridges and r.dst.version == 6
    ]
    # Candidates are walked, not listed: a /48 holds 65536 /64s.
    for candidate in base.subnets(new_prefix=size):
        if not any(candidate.overlaps(other) for other in blocked):
            return candidate
    raise Conflict(f"the IPv6 address pool {base} in /{size}s has been fully subnetted")
