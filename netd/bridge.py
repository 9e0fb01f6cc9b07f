"""The Linux bridge that container veths plug into; its address is the containers' gateway."""

from __future__ import annotations

import socket
from ipaddress import IPv4Interface, IPv6Interface
from typing import TYPE_CHECKING

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netd import sysctl
from netd.errors import NetdError
from netd.firewall import GW_ISOLATED
from netd.naming import BRIDGE_GROUP, mac_for_ip

if TYPE_CHECKING:
    from netd.network import Network

IFA_F_NODAD = 0x02  # <linux/if_addr.h>: no duplicate address detection
_RT_SCOPE_UNIVERSE = 0  # global addresses; link-local ones (fe80::/10) are the kernel's


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def ensure_bridge(
    name: str,
    gateway: IPv4Interface,
    gateway6: IPv6Interface | None = None,
    with_ipv4: bool = True,
) -> None:
    """Create ``name`` if missing, make ``gateway`` its only IPv4 address (none without
    ``with_ipv4``: Docker 28's ``isolated`` gateway mode) and ``gateway6`` its only global
    IPv6 address (none when None), and bring it up.

    The IPv6 gateway is added "nodad": it is this host's by construction, and an address in
    DAD stays tentative (unusable as a source) for a second or more (RFC 4862 5.4).

    The bridge gets a fixed MAC; otherwise it takes the lowest MAC of its ports, which changes
    as containers come and go (bridge(8) / br_stp_recalculate_bridge_id).
    """
    with IPRoute() as ipr:
        created = False
        found = ipr.link_lookup(ifname=name)
        try:
            if not found:
                ipr.link("add", ifname=name, kind="bridge", address=mac_for_ip(gateway.ip))
                created = True
                found = ipr.link_lookup(ifname=name)
            index = found[0]
            if _link_kind(ipr, index) != "bridge":
                raise NetdError(f"interface {name} exists and is not a bridge")
            have = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in ipr.get_addr(index=index, family=socket.AF_INET)
            }
            wanted = {(str(gateway.ip), gateway.network.prefixlen)} if with_ipv4 else set()
            for address, prefixlen in have - wanted:
                ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            for address, prefixlen in wanted - have:
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            _ensure_gateway6(ipr, name, index, gateway6)
            ipr.link("set", index=index, state="up", group=BRIDGE_GROUP)
        except NetlinkError as exc:
            if created:
                delete_bridge(name)
            raise NetdError(f"cannot set up bridge {name}: {exc.args[-1]}") from None
        except BaseException:
            if created:
                delete_bridge(name)
            raise


def _ensure_gateway6(ipr: IPRoute, name: str, index: int, gateway6: IPv6Interface | None) -> None:
    if gateway6 is not None:
        sysctl.enable_ipv6_on(name)
    have = {
        (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
        for a in ipr.get_addr(index=index, family=socket.AF_INET6)
        if a["scope"] == _RT_SCOPE_UNIVERSE
    }
    wanted = {(str(gateway6.ip), gateway6.network.prefixlen)} if gateway6 is not None else set()
    for address, prefixlen in have - wanted:
        ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
    for address, prefixlen in wanted - have:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)


def delete_bridge(name: str) -> None:
    """Remove the bridge (its ports are detached, not deleted); no-op when absent."""
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)


def ensure_network_bridge(net: Network) -> None:
    """A bridge network's bridge, with its gateway addresses except in a family whose gateway
    mode is ``isolated`` (Docker 28: "No address is assigned to the bridge" in that mode)."""
    interface6 = net.interface6 if net.gateway_mode6 != GW_ISOLATED else None
    ensure_bridge(net.bridge, net.interface, interface6, with_ipv4=net.gateway_mode4 != GW_ISOLATED)
