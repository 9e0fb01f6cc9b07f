"""A container's network sandbox: a named network namespace, and the veth pairs that join it to
bridges (host end on the bridge, peer born inside the namespace as ``eth<N>``), or the
macvlan/ipvlan children of a parent link born inside it as ``eth<N>`` (netd/macvlan.py).

Namespaces are only ever entered with ``flags=0``: pyroute2 would otherwise create a missing
one (``O_CREAT`` is its default), and a namespace must exist only while netd's state says so.
"""

from __future__ import annotations

import os
import socket
import subprocess
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from netd import macvlan
from netd.errors import NetdError

NETNS_RUN_DIR = "/run/netns"
IFA_F_NODAD = 0x02  # <linux/if_addr.h>
_SYSCTL_TIMEOUT = 30  # seconds


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


def _in_netns(name: str) -> IPRoute:
    return IPRoute(netns=name, flags=0)


def link_exists(ifname: str) -> bool:
    if not ifname:
        return False
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def delete_link(ifname: str) -> None:
    """Delete a host link (for a veth this removes the peer too); no-op when absent."""
    if not ifname:
        return
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=ifname):
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                raise NetdError(f"cannot delete link {ifname}: {exc.args[-1]}") from None


def enable_ipv6_inside(netns_name: str, ifname: str) -> None:
    """disable_ipv6=0 and accept_dad=0 on ``ifname`` inside the namespace.

    /proc/sys/net shows the sysctls of the reading task's namespace, so they are written by a
    child that joins the namespace (nsenter(1)); netd's own threads never change namespace.
    DAD is off because the address is unique by IPAM, and a tentative address cannot be used
    for a second or more after the interface comes up (RFC 4862 5.4)."""
    conf = f"net.ipv6.conf.{ifname}"
    argv = [
        "nsenter",
        f"--net={netns_path(netns_name)}",
        "sysctl",
        "-q",
        "-w",
        f"{conf}.disable_ipv6=0",
        f"{conf}.accept_dad=0",
    ]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=_SYSCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetdError(f"cannot enable IPv6 on {ifname} in {netns_name}: {exc}") from None
    if result.returncode != 0:
        why = result.stderr.strip().splitlines()[-1:] or ["sysctl failed"]
        raise NetdError(f"cannot enable IPv6 on {ifname} in {netns_name}: {why[0]}")


def _configure_inside(
    netns_name: str,
    ifname: str,
    address: IPv4Interface,
    mac: str,
    mtu: int,
    address6: IPv6Interface | None = None,
) -> None:
    if address6 is not None:
        enable_ipv6_inside(netns_name, ifname)
    with _in_netns(netns_name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")
        index = ns.link_lookup(ifname=ifname)[0]
        if mac:  # an ipvlan child has its parent's
            ns.link("set", index=index, address=mac)
        if mtu:
            ns.link("set", index=index, mtu=mtu)
        ns.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        if address6 is not None:
            ns.addr(
                "add",
                index=index,
                address=str(address6.ip),
                prefixlen=address6.network.prefixlen,
                flags=IFA_F_NODAD,
            )
        ns.link("set", index=index, state="up")


def plug_into_bridge(host_veth: str, bridge: str, hairpin: bool, isolated: bool) -> None:
    """Enslave ``host_veth`` to ``bridge`` (again), set its port flags and bring it up."""
    with IPRoute() as ipr:
        bridges = ipr.link_lookup(ifname=bridge)
        ports = ipr.link_lookup(ifname=host_veth)
        if not bridges or not ports:
            raise NetdError(f"cannot plug {host_veth} into {bridge}: link missing")
        try:
            ipr.link("set", index=ports[0], master=bridges[0])
            # Hairpin mode lets a frame leave through the port it came in on, so a container
            # can reach itself through a DNATed host port (bridge(8), "hairpin"). An isolated
            # port forwards to non-isolated ports only (bridge(8), "isolated"; the bridge's own
            # interface, i.e. the gateway, is not a port), which is how enable_icc=false keeps
            # containers of one network apart without br_netfilter.
            ipr.brport(
                "set", index=ports[0], mode=1 if hairpin else 0, isolated=1 if isolated else 0
            )
            ipr.link("set", index=ports[0], state="up")
        except NetlinkError as exc:
            raise NetdError(f"cannot plug {host_veth} into {bridge}: {exc.args[-1]}") from None


def connect_netns_to_bridge(
    netns_name: str,
    host_veth: str,
    ifname: str,
    bridge: str,
    address: IPv4Interface,
    mac: str,
    hairpin: bool,
    isolated: bool,
    mtu: int = 0,
    address6: IPv6Interface | None = None,
) -> None:
    """Create the veth pair with its peer born inside the namespace as ``ifname``, address it
    and enslave the host end to ``bridge``. All or nothing (routes: ``set_default_route``)."""
    if not netns_exists(netns_name):
        raise NetdError(f"network namespace {netns_name} does not exist")
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=host_veth,
                kind="veth",
                peer={"ifname": ifname, "net_ns_fd": netns_name},
            )
            if mtu:
                ipr.link("set", index=ipr.link_lookup(ifname=host_veth)[0], mtu=mtu)
    except NetlinkError as exc:
        raise NetdError(f"cannot create veth {host_veth}: {exc.args[-1]}") from None
    try:
        _configure_inside(netns_name, ifname, address, mac, mtu, address6)
        plug_into_bridge(host_veth, bridge, hairpin, isolated)
    except NetlinkError as exc:
        delete_link(host_veth)
        raise NetdError(f"cannot configure veth {host_veth}: {exc.args[-1]}") from None
    except BaseException:
        delete_link(host_veth)
        raise


def set_default_route(
    netns_name: str,
    via: tuple[str, IPv4Address] | tuple[str, IPv6Address] | None,
    family: int = socket.AF_INET,
) -> None:
    """Make the namespace's default route of ``family`` (AF_INET or AF_INET6) go through
    ``(ifname, gateway)``, or have none."""
    default = "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"
    try:
        with _in_netns(netns_name) as ns:
            current = [
                r
                for r in ns.get_routes(family=family, dst_len=0, table=254)
                if r.get_attr("RTA_GATEWAY") is not None
            ]
            wanted = None
            if via is not None:
                found = ns.link_lookup(ifname=via[0])
                if not found:
                    raise NetdError(f"no interface {via[0]} in network namespace {netns_name}")
                wanted = (found[0], str(via[1]))
            have = [(r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY")) for r in current]
            if have == ([wanted] if wanted else []):
                return
            for route in current:
                ns.route(
                    "del",
                    dst=default,
                    oif=route.get_attr("RTA_OIF"),
                    gateway=route.get_attr("RTA_GATEWAY"),
                )
            if wanted is not None:
                ns.route("add", dst=default, oif=wanted[0], gateway=wanted[1])
    except NetlinkError as exc:
        raise NetdError(
            f"cannot set the default route in network namespace {netns_name}: {exc.args[-1]}"
        ) from None


def link_exists_inside(netns_name: str, ifname: str) -> bool:
    if not netns_exists(netns_name):
        return False
    with _in_netns(netns_name) as ns:
        return bool(ns.link_lookup(ifname=ifname))


def delete_link_inside(netns_name: str, ifname: str) -> None:
    """Delete ``ifname`` inside the namespace; no-op when either is absent."""
    if not netns_exists(netns_name):
        return
    with _in_netns(netns_name) as ns:
        for index in ns.link_lookup(ifname=ifname):
            try:
                ns.link("del", index=index)
            except NetlinkError as exc:
                raise NetdError(
                    f"cannot delete link {ifname} in {netns_name}: {exc.args[-1]}"
                ) from None


def connect_netns_to_parent(
    netns_name: str,
    child: macvlan.ChildSpec,
    ifname: str,
    address: IPv4Interface,
    mac: str,
    address6: IPv6Interface | None = None,
) -> None:
    """A macvlan/ipvlan child of ``child.parent`` born inside the namespace as ``ifname``,
    addressed and up. All or nothing (routes: ``set_default_route``)."""
    if not netns_exists(netns_name):
        raise NetdError(f"network namespace {netns_name} does not exist")
    macvlan.add_child(child, netns_name, ifname)
    try:
        _configure_inside(netns_name, ifname, address, mac, 0, address6)
    except NetlinkError as exc:
        delete_link_inside(netns_name, ifname)
        raise NetdError(f"cannot configure {child.driver} link {ifname}: {exc.args[-1]}") from None
    except BaseException:
        delete_link_inside(netns_name, ifname)
        raise
