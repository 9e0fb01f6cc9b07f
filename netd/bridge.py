"""The Linux bridge that container veths plug into; its address is the containers' gateway."""

from __future__ import annotations

import socket
from ipaddress import IPv4Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netd.errors import NetdError
from netd.naming import mac_for_ip


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def ensure_bridge(name: str, gateway: IPv4Interface) -> None:
    """Create ``name`` if missing, make ``gateway`` its only IPv4 address, and bring it up.

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
            wanted = (str(gateway.ip), gateway.network.prefixlen)
            for address, prefixlen in have - {wanted}:
                ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            if wanted not in have:
                ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])
            ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            if created:
                delete_bridge(name)
            raise NetdError(f"cannot set up bridge {name}: {exc.args[-1]}") from None
        except BaseException:
            if created:
                delete_bridge(name)
            raise


def delete_bridge(name: str) -> None:
    """Remove the bridge (its ports are detached, not deleted); no-op when absent."""
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)
