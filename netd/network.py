"""A network: the default one (``bridge``, the daemon's ``--bridge``/``--bip``) or a
user-defined one, with the Docker options netd understands. User-defined networks are bridge
networks, or macvlan/ipvlan ones (their options: netd/macvlan.py); below, the bridge driver's.

Options (Docker's names, values as strings; ``strconv.ParseBool`` spellings for booleans):

* ``com.docker.network.bridge.name``: the bridge's interface name (default ``pyebr-<id9>``);
* ``com.docker.network.bridge.enable_icc``: ``false`` isolates the bridge's container ports from
  each other (bridge port isolation, bridge(8) ``isolated``), so containers of the network
  cannot reach one another, while each still reaches its gateway and the outside. This works
  with or without br_netfilter; when it is active (bridge-nf-call-iptables=1) a DNATed frame
  between two containers of one bridge is bridged, not routed, so, as with Docker's
  ``-i br -o br -j DROP``, a neighbour cannot reach a container's published port either;
* ``com.docker.network.bridge.enable_ip_masquerade``: ``false`` leaves outgoing traffic un-NATed;
* ``com.docker.network.bridge.host_binding_ipv4``: the host address ports are published on when
  a binding names none (default 0.0.0.0);
* ``com.docker.network.driver.mtu``: the MTU of the containers' veth pairs;
* ``com.docker.network.bridge.gateway_mode_ipv4`` / ``..._ipv6``: Docker 28's gateway mode of
  each family (netd/firewall/__init__.py says what each makes): ``nat`` (the default),
  ``nat-unprotected``, ``routed`` or ``isolated`` (only with ``--internal``, as Docker requires).

Any other option is refused, so a user never believes an option took effect when it did not.

``enable_ipv6`` (``network create --ipv6``, Docker 28's IPv6 bridge network) gives the network
an IPv6 subnet as well as its IPv4 one: the user's, or a /64 of netd's unique local pool
(netd/subnetpool.py). The bridge carries both gateways; each container gets an address of each
family. The default network gets IPv6 the same way from pyengined's ``--ipv6
--fixed-cidr-v6=<prefix>`` (netd/control/base.py).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any

from common.timefmt import utc_rfc3339
from netd import macvlan
from netd.errors import Conflict, NetdError
from netd.firewall import GATEWAY_MODES, GW_ISOLATED, GW_NAT, BridgeNetwork
from netd.naming import bridge_name_for, valid_ifname
from netd.subnetpool import (
    DEFAULT_IPV6_POOL,
    HostRoute,
    check_no_route_overlap,
    pick_subnet,
    pick_subnet6,
)

DEFAULT_NETWORK = "bridge"
DRIVER = "bridge"
# Docker's pre-defined networks: "bridge" is netd's default network; "host" and "none" are not
# bridge networks, but their names are taken all the same.
PREDEFINED_NETWORKS = (DEFAULT_NETWORK, "host", "none")

OPT_BRIDGE_NAME = "com.docker.network.bridge.name"
OPT_ENABLE_ICC = "com.docker.network.bridge.enable_icc"
OPT_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
OPT_HOST_BINDING = "com.docker.network.bridge.host_binding_ipv4"
OPT_MTU = "com.docker.network.driver.mtu"
OPT_GATEWAY_MODE4 = "com.docker.network.bridge.gateway_mode_ipv4"
OPT_GATEWAY_MODE6 = "com.docker.network.bridge.gateway_mode_ipv6"
SUPPORTED_OPTIONS = (
    OPT_BRIDGE_NAME,
    OPT_ENABLE_ICC,
    OPT_MASQUERADE,
    OPT_HOST_BINDING,
    OPT_MTU,
    OPT_GATEWAY_MODE4,
    OPT_GATEWAY_MODE6,
)

# Docker's network name rule (daemon/network.go, "validNetworkName" via restrictedNamePattern).
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")

# Lifecycle of a record in the state file. An operation writes its record (or mark) before it
# touches the kernel, so the next setup() knows what a crash may have left: "creating" is
# rolled back, "removing" is carried through.
CREATING, READY, REMOVING = "creating", "ready", "removing"


def new_network_id() -> str:
    return secrets.token_hex(32)


def default_network_id(bridge: str, gateway: IPv4Interface) -> str:
    """Stable across restarts for the same ``--bridge``/``--bip`` (the API showed this id
    before netd kept networks: keep it)."""
    seed = f"pyengine default network {bridge} {gateway.with_prefixlen}"
    return hashlib.sha256(seed.encode()).hexdigest()


def check_network_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NetdError(
            f'invalid network name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed'
        )


def _parse_bool(option: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise NetdError(f'invalid value "{value}" for option {option} (want true or false)')


@dataclass(frozen=True)
class BridgeOptions:
    bridge_name: str = ""
    enable_icc: bool = True
    masquerade: bool = True
    host_binding_ipv4: str = "0.0.0.0"
    mtu: int = 0  # 0: the kernel's default (1500 for veth)
    gateway_mode4: str = GW_NAT
    gateway_mode6: str = GW_NAT


def _parse_gateway_mode(option: str, value: str) -> str:
    # Docker's wording (libnetwork/drivers/bridge: parseErr around newGwMode); "" is nat there.
    if value == "":
        return GW_NAT
    if value not in GATEWAY_MODES:
        raise NetdError(f'failed to parse {option} value: {value} (invalid gateway mode "{value}")')
    return value


def parse_options(options: dict[str, str] | None) -> BridgeOptions:
    """Docker driver options → what netd does with them; unknown options are refused."""
    options = dict(options or {})
    for key, value in options.items():
        if key not in SUPPORTED_OPTIONS:
            supported = ", ".join(SUPPORTED_OPTIONS)
            raise NetdError(f'unsupported network option "{key}" (supported: {supported})')
        if not isinstance(value, str):
            raise NetdError(f"option {key} must be a string, got {value!r}")
    parsed = BridgeOptions()
    if OPT_ENABLE_ICC in options:
        parsed = replace(parsed, enable_icc=_parse_bool(OPT_ENABLE_ICC, options[OPT_ENABLE_ICC]))
    if OPT_MASQUERADE in options:
        parsed = replace(parsed, masquerade=_parse_bool(OPT_MASQUERADE, options[OPT_MASQUERADE]))
    if OPT_BRIDGE_NAME in options:
        parsed = replace(parsed, bridge_name=options[OPT_BRIDGE_NAME])
    if OPT_HOST_BINDING in options:
        value = options[OPT_HOST_BINDING]
        try:
            address = IPv4Address(value)
        except ValueError:
            raise NetdError(
                f'invalid value "{value}" for option {OPT_HOST_BINDING} (want an IPv4 address)'
            ) from None
        parsed = replace(parsed, host_binding_ipv4=str(address))
    if OPT_MTU in options:
        value = options[OPT_MTU]
        if not value.isdigit() or not 68 <= int(value) <= 65535:
            raise NetdError(f'invalid value "{value}" for option {OPT_MTU} (want 68-65535)')
        parsed = replace(parsed, mtu=int(value))
    if OPT_GATEWAY_MODE4 in options:
        mode = _parse_gateway_mode(OPT_GATEWAY_MODE4, options[OPT_GATEWAY_MODE4])
        parsed = replace(parsed, gateway_mode4=mode)
    if OPT_GATEWAY_MODE6 in options:
        mode = _parse_gateway_mode(OPT_GATEWAY_MODE6, options[OPT_GATEWAY_MODE6])
        parsed = replace(parsed, gateway_mode6=mode)
    return parsed


@dataclass
class Network:
    id: str  # 64 hex
    name: str
    bridge: str  # the Linux bridge
    subnet: str  # IPv4 network, e.g. "10.112.0.0/24"
    gateway: str  # the bridge's address, the containers' default gateway
    ip_range: str = ""  # automatic addresses come from here ("" = the whole subnet)
    internal: bool = False  # no traffic in or out of the bridge but to its own containers
    enable_icc: bool = True
    masquerade: bool = True
    host_binding_ipv4: str = "0.0.0.0"
    mtu: int = 0
    gateway_mode4: str = GW_NAT  # Docker 28's gateway modes, per family
    gateway_mode6: str = GW_NAT
    enable_ipv6: bool = False
    configured_subnet: bool = False  # the user gave the subnet (Docker allows --ip only then)
    subnet6: str = ""  # IPv6 network when enable_ipv6, e.g. "fd00:86::/64"
    gateway6: str = ""  # the bridge's IPv6 address, the containers' IPv6 default gateway
    configured_subnet6: bool = False  # the user gave the IPv6 subnet (--ip6 only then)
    default: bool = False  # the daemon's default network, "bridge"
    driver: str = DRIVER  # "bridge", or "macvlan"/"ipvlan" (netd/macvlan.py): bridge == ""
    # macvlan/ipvlan: the host link the containers' links hang off, the driver's mode (and
    # ipvlan's flag), and whether netd made the parent (a vlan sub-interface or the stand-in
    # bridge), so removing the network removes it.
    parent: str = ""
    mode: str = ""
    flag: str = ""
    created_parent: bool = False
    options: dict[str, str] = field(default_factory=dict)  # as the user gave them
    labels: dict[str, str] = field(default_factory=dict)
    created: str = ""
    state: str = READY
    attachable: bool = False  # Docker's flag, kept and shown (it means nothing without swarm)

    @property
    def is_bridge(self) -> bool:
        return self.driver == DRIVER

    @property
    def child_spec(self) -> macvlan.ChildSpec:
        """A macvlan/ipvlan network's container links."""
        return macvlan.ChildSpec(self.driver, self.parent, self.mode, self.flag)

    @property
    def interface(self) -> IPv4Interface:
        """The gateway address with the subnet's prefix: what the bridge carries."""
        return IPv4Interface(f"{self.gateway}/{IPv4Network(self.subnet).prefixlen}")

    @property
    def interface6(self) -> IPv6Interface | None:
        """The IPv6 gateway address with the IPv6 subnet's prefix (None: an IPv4-only network)."""
        if not self.subnet6:
            return None
        return IPv6Interface(f"{self.gateway6}/{IPv6Network(self.subnet6).prefixlen}")

    def firewall_view(self) -> BridgeNetwork:
        return BridgeNetwork(
            self.bridge,
            IPv4Network(self.subnet),
            IPv4Address(self.gateway),
            internal=self.internal,
            masquerade=self.masquerade,
            subnet6=IPv6Network(self.subnet6) if self.subnet6 else None,
            gateway6=IPv6Address(self.gateway6) if self.gateway6 else None,
            gateway_mode4=self.gateway_mode4,
            gateway_mode6=self.gateway_mode6,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Network:
        return cls(**data)


@dataclass(frozen=True)
class NetworkRequest:
    """What ``create_network`` is asked for (Docker's NetworkCreate: at most one IPv4 and one
    IPv6 subnet)."""

    name: str
    subnet: str | None = None
    gateway: str | None = None
    ip_range: str | None = None
    internal: bool = False
    enable_ipv6: bool = False
    options: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    subnet6: str | None = None
    gateway6: str | None = None
    driver: str = DRIVER


def _parse_subnet(text: str) -> IPv4Network:
    try:
        subnet = IPv4Network(text, strict=False)
    except ValueError:
        raise NetdError(f'invalid subnet "{text}"') from None
    if str(subnet.network_address) != text.split("/")[0]:
        raise NetdError(f"invalid subnet {text}: it should be {subnet}")
    if subnet.prefixlen > 30:
        raise NetdError(f"subnet {subnet} is too small: a /30 or larger is needed")
    return subnet


def parse_subnet6(text: str) -> IPv6Network:
    try:
        subnet = IPv6Network(text, strict=False)
    except ValueError:
        raise NetdError(f'invalid IPv6 subnet "{text}"') from None
    if subnet.network_address != IPv6Address(text.split("/")[0]):
        raise NetdError(f"invalid subnet {text}: it should be {subnet}")
    if subnet.prefixlen > 126:
        raise NetdError(f"subnet {subnet} is too small: a /126 or larger is needed")
    return subnet


def _parse_gateway6(text: str | None, subnet: IPv6Network) -> IPv6Address:
    if not text:
        return subnet.network_address + 1
    try:
        gateway = IPv6Address(text)
    except ValueError:
        raise NetdError(f'invalid IPv6 gateway "{text}"') from None
    if gateway not in subnet or gateway == subnet.network_address:
        raise NetdError(f"gateway {gateway} is not a host address of subnet {subnet}")
    return gateway


def _plan_subnet6(
    request: NetworkRequest,
    existing: Sequence[Network],
    routes: Sequence[HostRoute],
    own_bridges: set[str],
) -> tuple[str, str]:
    """The IPv6 subnet and gateway of a network (("", "") when IPv6 is not enabled)."""
    if not request.enable_ipv6:
        if request.subnet6 or request.gateway6:
            raise NetdError("an IPv6 subnet or gateway needs IPv6 enabled (--ipv6)")
        return "", ""
    taken = [IPv6Network(n.subnet6) for n in existing if n.subnet6]
    if request.subnet6:
        subnet = parse_subnet6(request.subnet6)
        for net in existing:
            if net.subnet6 and subnet.overlaps(IPv6Network(net.subnet6)):
                raise Conflict(f'subnet {subnet} overlaps network "{net.name}" ({net.subnet6})')
        check_no_route_overlap(subnet, routes, own_bridges)
    else:
        if request.gateway6:
            raise NetdError("an IPv6 gateway needs an IPv6 subnet")
        subnet = pick_subnet6(DEFAULT_IPV6_POOL, taken, routes, own_bridges)
    return str(subnet), str(_parse_gateway6(request.gateway6, subnet))


def _parse_gateway(text: str | None, subnet: IPv4Network) -> IPv4Address:
    if not text:
        return subnet.network_address + 1
    try:
        gateway = IPv4Address(text)
    except ValueError:
        raise NetdError(f'invalid gateway "{text}"') from None
    if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
        raise NetdError(f"gateway {gateway} is not a host address of subnet {subnet}")
    return gateway


def _parse_ip_range(text: str | None, subnet: IPv4Network) -> str:
    if not text:
        return ""
    try:
        pool = IPv4Network(text)
    except ValueError:
        raise NetdError(f'invalid ip-range "{text}"') from None
    if not pool.subnet_of(subnet):
        raise NetdError(f"ip-range {pool} is not inside subnet {subnet}")
    return str(pool)


def _plan_bridge(opts: BridgeOptions, existing: Sequence[Network]) -> tuple[str, str]:
    """A bridge network's id and bridge name."""
    network_id = new_network_id()
    while not opts.bridge_name and any(n.bridge == bridge_name_for(network_id) for n in existing):
        network_id = new_network_id()  # 36 bits of the id name the bridge: a rare clash
    bridge = opts.bridge_name or bridge_name_for(network_id)
    if not valid_ifname(bridge):
        raise NetdError(f'invalid bridge name "{bridge}"')
    for net in existing:
        if net.bridge == bridge:
            raise Conflict(f'bridge {bridge} is already used by network "{net.name}"')
    return network_id, bridge


def _plan_parent(
    driver: str, link: macvlan.LinkOptions, network_id: str, existing: Sequence[Network]
) -> tuple[str, bool]:
    """A macvlan/ipvlan network's parent link, and whether netd is to create it ("", False
    for a bridge network). Whether the link exists is asked of the kernel here."""
    if driver == DRIVER:
        return "", False
    parent = link.parent or macvlan.standin_parent_name(network_id)
    in_use = [(n.name, n.parent) for n in existing if n.parent]
    macvlan.check_parent(parent, in_use)
    if any(n.bridge == parent for n in existing):
        raise Conflict(f"interface {parent} is the bridge of another network")
    if not link.parent:
        if macvlan.link_exists(parent):
            raise Conflict(f"interface {parent} already exists")
        return parent, True
    if macvlan.link_exists(parent):
        return parent, False
    if macvlan.vlan_parent(parent) is None:
        raise NetdError(f"parent interface {parent} does not exist")
    return parent, True


def plan_network(
    request: NetworkRequest,
    existing: Sequence[Network],
    routes: Sequence[HostRoute],
    pools: Sequence[tuple[str, int]],
) -> Network:
    """Validate ``request`` against the ``existing`` networks and the host's ``routes`` into a
    record in state CREATING (nothing is created yet). An explicit subnet may overlap neither
    another network nor a route of the host; an automatic one is the first free pool subnet."""
    name = request.name
    check_network_name(name)
    if name in PREDEFINED_NETWORKS or any(n.name == name for n in existing):
        raise Conflict(f"network with name {name} already exists")
    labels = dict(request.labels or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise NetdError("network labels must map strings to strings")
    driver = request.driver or DRIVER
    if driver == DRIVER:
        opts = parse_options(request.options)
        if GW_ISOLATED in (opts.gateway_mode4, opts.gateway_mode6) and not request.internal:
            # Docker's words (bridge driver, parseNetworkOptions).
            raise NetdError("gateway mode 'isolated' can only be used for an internal network")
        network_id, bridge = _plan_bridge(opts, existing)
        link = macvlan.LinkOptions("", "")
    elif driver in macvlan.LINK_DRIVERS:
        opts = BridgeOptions()
        link = macvlan.parse_link_options(driver, dict(request.options or {}))
        network_id, bridge = new_network_id(), ""
    else:
        raise NetdError(f'network driver "{driver}" is not supported (bridge, macvlan, ipvlan)')
    parent, created_parent = _plan_parent(driver, link, network_id, existing)

    own_bridges = {n.bridge for n in existing if n.bridge}
    if request.subnet:
        subnet = _parse_subnet(request.subnet)
        for net in existing:
            if subnet.overlaps(IPv4Network(net.subnet)):
                raise Conflict(f'subnet {subnet} overlaps network "{net.name}" ({net.subnet})')
        if driver == DRIVER:
            # A macvlan/ipvlan subnet is the parent's LAN: the host may well route it.
            check_no_route_overlap(subnet, routes, own_bridges)
    else:
        if request.gateway or request.ip_range:
            raise NetdError("a gateway or an ip-range needs a subnet")
        taken = [IPv4Network(n.subnet) for n in existing]
        subnet = pick_subnet(pools, taken, routes, own_bridges)
    subnet6, gateway6 = _plan_subnet6(request, existing, routes, own_bridges)
    return Network(
        id=network_id,
        name=name,
        bridge=bridge,
        subnet=str(subnet),
        gateway=str(_parse_gateway(request.gateway, subnet)),
        ip_range=_parse_ip_range(request.ip_range, subnet),
        # No parent: the containers reach only each other (Docker's dummy parent).
        internal=bool(request.internal) or (driver != DRIVER and not link.parent),
        enable_icc=opts.enable_icc,
        masquerade=opts.masquerade,
        host_binding_ipv4=opts.host_binding_ipv4,
        mtu=opts.mtu,
        gateway_mode4=opts.gateway_mode4,
        gateway_mode6=opts.gateway_mode6,
        configured_subnet=bool(request.subnet),
        enable_ipv6=bool(request.enable_ipv6),
        subnet6=subnet6,
        gateway6=gateway6,
        configured_subnet6=bool(request.subnet6),
        driver=driver,
        parent=parent,
        mode=link.mode,
        flag=link.flag,
        created_parent=created_parent,
        options=dict(request.options or {}),
        labels=labels,
        created=utc_rfc3339(digits=6),
        state=CREATING,
    )
