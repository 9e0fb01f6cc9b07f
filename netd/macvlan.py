"""The ``macvlan`` and ``ipvlan`` drivers (Docker's libnetwork/drivers/macvlan and ipvlan): a
container's interface is a child link of a host "parent" link, moved into its namespace. Its
frames leave through the parent onto the parent's LAN, with no bridge, no NAT, no firewall rule
and no published port on the way.

Options (Docker's names):

* ``parent``: the host link the children hang off. ``<link>.<N>`` (e.g. ``eth0.10``) that does
  not exist yet is created as an 802.1q sub-interface of ``<link>`` with VLAN id N, and removed
  with the network (only when netd created it: ``Network.created_parent``). No parent: Docker
  makes a ``dummy`` link as the parent and the containers reach only each other. This kernel may
  have no dummy module, so netd makes an empty, address-less Linux bridge ``pyemv-<id9>`` the
  parent instead: macvlan children in bridge mode (and ipvlan ones in any mode) switch frames
  between themselves inside the parent, which is all a dummy gives; the network is internal.
* ``macvlan_mode``: ``bridge`` (default), ``private`` or ``vepa`` (ip-link(8) "MACVLAN Type
  Support"). ``passthru`` (one child that takes over the parent) is refused.
* ``ipvlan_mode``: ``l2`` (default), ``l3`` or ``l3s``; ``ipvlan_flag``: ``bridge`` (default),
  ``private`` or ``vepa``. ipvlan children share the parent's MAC address.

Whether the kernel can make a link kind (ipvlan, 802.1q vlan) is found by trying it, never by
guessing from a module list: a kernel without the module answers EOPNOTSUPP.

As with macvlan anywhere, a child cannot reach the host through its own parent (the parent
drops frames from its children: macvlan.c's source check), so the host and its containers on a
macvlan network talk through the LAN only.
"""

from __future__ import annotations

import errno
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netd.errors import Conflict, NetdError
from netd.naming import valid_ifname

MACVLAN, IPVLAN = "macvlan", "ipvlan"
LINK_DRIVERS = (MACVLAN, IPVLAN)

OPT_PARENT = "parent"
OPT_MACVLAN_MODE = "macvlan_mode"
OPT_IPVLAN_MODE = "ipvlan_mode"
OPT_IPVLAN_FLAG = "ipvlan_flag"
SUPPORTED_OPTIONS = {
    MACVLAN: (OPT_PARENT, OPT_MACVLAN_MODE),
    IPVLAN: (OPT_PARENT, OPT_IPVLAN_MODE, OPT_IPVLAN_FLAG),
}
MACVLAN_MODES = ("bridge", "private", "vepa")
# <linux/if_link.h>: IPVLAN_MODE_L2/L3/L3S and IPVLAN_F_PRIVATE/IPVLAN_F_VEPA (0 = bridge).
IPVLAN_MODES = {"l2": 0, "l3": 1, "l3s": 2}
IPVLAN_FLAGS = {"bridge": 0, "private": 1, "vepa": 2}

_VLAN_PARENT = re.compile(r"^(?P<link>[A-Za-z0-9_-][A-Za-z0-9_.-]*)\.(?P<vid>[0-9]{1,4})$")
_UNAVAILABLE = {
    "ipvlan": "ipvlan is not available in this kernel (no ipvlan module)",
    "vlan": "802.1q VLAN sub-interfaces are not available in this kernel (no 8021q module)",
}


@dataclass(frozen=True)
class LinkOptions:
    parent: str  # "" = no parent given: netd makes a stand-in (see the module's doc)
    mode: str  # macvlan: bridge/private/vepa; ipvlan: l2/l3/l3s
    flag: str = ""  # ipvlan only: bridge/private/vepa


def standin_parent_name(network_id: str) -> str:
    """The parent netd makes for a network without ``-o parent`` (Docker's ``dm-<id12>``)."""
    return f"pyemv-{network_id[:9]}"


def parse_link_options(driver: str, options: dict[str, str]) -> LinkOptions:
    """Docker's macvlan/ipvlan options → what netd does with them; unknown ones are refused."""
    supported = SUPPORTED_OPTIONS[driver]
    for key, value in options.items():
        if key not in supported:
            raise NetdError(
                f'unsupported {driver} network option "{key}" (supported: {", ".join(supported)})'
            )
        if not isinstance(value, str):
            raise NetdError(f"option {key} must be a string, got {value!r}")
    parent = options.get(OPT_PARENT, "")
    if parent == "lo":
        raise NetdError(f"loopback interface is not a valid {driver} parent link")
    if parent and not valid_ifname(parent):
        raise NetdError(f'invalid parent interface name "{parent}"')
    if driver == MACVLAN:
        mode = options.get(OPT_MACVLAN_MODE) or "bridge"
        if mode == "passthru":
            raise NetdError("macvlan_mode passthru is not supported by pyengined")
        if mode not in MACVLAN_MODES:
            raise NetdError(
                f"requested macvlan mode '{mode}' is not valid, 'bridge' mode is the macvlan "
                "driver default"
            )
        return LinkOptions(parent, mode)
    mode = options.get(OPT_IPVLAN_MODE) or "l2"
    if mode not in IPVLAN_MODES:
        raise NetdError(f"requested ipvlan mode '{mode}' is not valid (l2, l3 or l3s)")
    flag = options.get(OPT_IPVLAN_FLAG) or "bridge"
    if flag not in IPVLAN_FLAGS:
        raise NetdError(f"requested ipvlan flag '{flag}' is not valid (bridge, private or vepa)")
    return LinkOptions(parent, mode, flag)


def vlan_parent(parent: str) -> tuple[str, int] | None:
    """``("eth0", 10)`` for ``eth0.10``; None when ``parent`` is not of that form."""
    match = _VLAN_PARENT.fullmatch(parent)
    if match is None:
        return None
    vid = int(match["vid"])
    if not 1 <= vid <= 4094:
        raise NetdError(f"invalid VLAN id {vid} in parent {parent} (want 1-4094)")
    return match["link"], vid


def check_parent(parent: str, others: Sequence[tuple[str, str]]) -> None:
    """One network per parent link (Docker's rule); ``others``: (network name, parent)."""
    for name, used in others:
        if used == parent:
            raise Conflict(f"network {name} is already using parent interface {parent}")


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _kind(ipr: IPRoute, index: int) -> str | None:
    info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _unavailable(kind: str) -> NetdError:
    return NetdError(_UNAVAILABLE.get(kind, f"{kind} is not available in this kernel"))


def link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return _lookup(ipr, ifname) is not None


def create_parent(parent: str) -> None:
    """Make the parent netd owns: ``<link>.<N>`` as an 802.1q sub-interface of ``<link>``, any
    other name as the stand-in bridge; up either way."""
    vlan = vlan_parent(parent)
    with IPRoute() as ipr:
        try:
            if vlan is not None:
                lower = _lookup(ipr, vlan[0])
                if lower is None:
                    raise NetdError(f"parent interface {vlan[0]} of {parent} does not exist")
                ipr.link("add", ifname=parent, kind="vlan", link=lower, vlan_id=vlan[1])
            else:
                ipr.link("add", ifname=parent, kind="bridge")
            index = _lookup(ipr, parent)
            if index is None:
                raise NetdError(f"link {parent} vanished after its creation")
            ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP and vlan is not None:
                raise _unavailable("vlan") from None
            raise NetdError(f"cannot create parent link {parent}: {exc.args[-1]}") from None


def delete_parent(parent: str) -> None:
    """Remove a parent netd made (its children go with it); only a vlan or bridge link of that
    name, so a link someone else made since is left alone. No-op when absent."""
    with IPRoute() as ipr:
        index = _lookup(ipr, parent)
        if index is None or _kind(ipr, index) not in ("vlan", "bridge"):
            return
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            raise NetdError(f"cannot delete parent link {parent}: {exc.args[-1]}") from None


@dataclass(frozen=True)
class ChildSpec:
    """What a container's link on a macvlan/ipvlan network is made of."""

    driver: str
    parent: str
    mode: str
    flag: str = ""

    def link_args(self) -> dict[str, object]:
        if self.driver == MACVLAN:
            return {"kind": "macvlan", "macvlan_mode": self.mode}
        return {
            "kind": "ipvlan",
            "ipvlan_mode": IPVLAN_MODES[self.mode],
            "ipvlan_flags": IPVLAN_FLAGS[self.flag or "bridge"],
        }


def probe_driver(child: ChildSpec) -> None:
    """Make and delete one child of ``parent``: refuses a network the kernel cannot serve
    (no ipvlan module, a parent that cannot carry children) at create time."""
    name = f"pyeprb{secrets.token_hex(4)}"
    with IPRoute() as ipr:
        index = _lookup(ipr, child.parent)
        if index is None:
            raise NetdError(f"parent interface {child.parent} does not exist")
        try:
            ipr.link("add", ifname=name, link=index, **child.link_args())
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP:
                raise _unavailable(child.driver) from None
            raise NetdError(
                f"cannot make a {child.driver} link on {child.parent}: {exc.args[-1]}"
            ) from None
        probe = _lookup(ipr, name)
        if probe is not None:
            ipr.link("del", index=probe)


def add_child(child: ChildSpec, netns_name: str, ifname: str) -> None:
    """A child of the parent born inside the namespace as ``ifname`` (IFLA_NET_NS_FD on
    RTM_NEWLINK: it never exists on the host under another name)."""
    with IPRoute() as ipr:
        index = _lookup(ipr, child.parent)
        if index is None:
            raise NetdError(f"parent interface {child.parent} does not exist")
        try:
            ipr.link("add", ifname=ifname, link=index, net_ns_fd=netns_name, **child.link_args())
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP:
                raise _unavailable(child.driver) from None
            raise NetdError(
                f"cannot create {child.driver} link on {child.parent}: {exc.args[-1]}"
            ) from None
