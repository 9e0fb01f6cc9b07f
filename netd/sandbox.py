"""A container's network sandbox: a named network namespace and the veth pair that joins it to
the bridge (host end on the bridge, peer renamed ``eth0`` inside the namespace)."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv4Interface

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from netd.errors import NetdError

NETNS_RUN_DIR = "/run/netns"
CONTAINER_IFNAME = "eth0"


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create_netns(name: str) -> None:
    """A new namespace bind-mounted at /run/netns/<name> (what ``ip netns add`` does)."""
    if netns_exists(name):
        raise NetdError(f"network namespace {name} already exists")
    try:
        netns.create(name)
    except OSError as exc:
        raise NetdError(f"cannot create network namespace {name}: {exc}") from None


def delete_netns(name: str) -> None:
    """Unmount and remove /run/netns/<name>; its interfaces go when its last user leaves."""
    if netns_exists(name):
        netns.remove(name)


def link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def delete_link(ifname: str) -> None:
    """Delete a host link (for a veth this removes the peer too); no-op when absent."""
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=ifname):
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                raise NetdError(f"cannot delete link {ifname}: {exc.args[-1]}") from None


def _configure_inside(
    netns_name: str, address: IPv4Interface, gateway: IPv4Address, mac: str
) -> None:
    with IPRoute(netns=netns_name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")
        eth0 = ns.link_lookup(ifname=CONTAINER_IFNAME)[0]
        ns.link("set", index=eth0, address=mac)
        ns.addr("add", index=eth0, address=str(address.ip), prefixlen=address.network.prefixlen)
        ns.link("set", index=eth0, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=str(gateway))


def plug_into_bridge(host_veth: str, bridge: str, hairpin: bool) -> None:
    """Enslave ``host_veth`` to ``bridge`` (again), set its hairpin mode and bring it up."""
    with IPRoute() as ipr:
        bridges = ipr.link_lookup(ifname=bridge)
        ports = ipr.link_lookup(ifname=host_veth)
        if not bridges or not ports:
            raise NetdError(f"cannot plug {host_veth} into {bridge}: link missing")
        try:
            ipr.link("set", index=ports[0], master=bridges[0])
            # Hairpin mode lets a frame leave through the port it came in on, so a container
            # can reach itself through a DNATed host port (bridge(8), "hairpin").
            ipr.brport("set", index=ports[0], mode=1 if hairpin else 0)
            ipr.link("set", index=ports[0], state="up")
        except NetlinkError as exc:
            raise NetdError(f"cannot plug {host_veth} into {bridge}: {exc.args[-1]}") from None


def connect_netns_to_bridge(
    netns_name: str,
    host_veth: str,
    bridge: str,
    address: IPv4Interface,
    gateway: IPv4Address,
    mac: str,
    hairpin: bool,
) -> None:
    """Create the veth pair with its peer born inside the namespace as eth0, address it, route
    by default through ``gateway``, and enslave the host end to ``bridge``. All or nothing."""
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=host_veth,
                kind="veth",
                peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": netns_name},
            )
    except NetlinkError as exc:
        raise NetdError(f"cannot create veth {host_veth}: {exc.args[-1]}") from None
    try:
        _configure_inside(netns_name, address, gateway, mac)
        plug_into_bridge(host_veth, bridge, hairpin)
    except NetlinkError as exc:
        delete_link(host_veth)
        raise NetdError(f"cannot configure veth {host_veth}: {exc.args[-1]}") from None
    except BaseException:
        delete_link(host_veth)
        raise
