"""The firewall interface netd programs: NAT for published ports, masquerade, forwarding, and
the early drops that keep containers unreachable except through published ports.

Both backends implement the same policy (docs in each module):

* packets routed straight at a container address from outside its bridge are dropped before
  conntrack sees them (Docker 28's "direct routing" protection);
* packets to a port published on a loopback address are dropped unless they arrive on ``lo``,
  so a LAN host cannot reach it by spoofing 127.0.0.1 (moby#45610, moby#41872);
* published ports are DNATed from every other interface, and from the host itself;
* no traffic is forwarded between two bridge networks (Docker's DOCKER-ISOLATION), except
  connections to published ports, which any client may open;
* an internal network's bridge forwards nothing to or from any other interface, and its
  subnet is not masqueraded;
* a packet from a bridge to 127.0.0.0/8 is dropped on its way in unless it belongs to a DNATed
  connection (the replies of the host's own connections to a loopback-published port): with
  ``route_localnet=1`` on the bridge (DNAT mode) a container could otherwise reach every service
  of the host's loopback through its gateway (CVE-2020-8558; Kubernetes' KUBE-FIREWALL rule
  "block incoming localnet connections");
* with ``forward_drop`` (set when pyengined turned ``net.ipv4.ip_forward`` on itself), IPv4
  traffic routed between interfaces that are not pyengine's bridges is dropped: the host does
  not become a router for its other links because containers need forwarding (Docker sets the
  iptables FORWARD policy to DROP for the same reason, moby#14041, libnetwork#1526).

Both families: a network with an IPv6 subnet (``--ipv6``) gets the same direct-routing drop and
masquerade (NAT66, as Docker 28 does for unique local subnets) for it, and a mapping whose host
address and container address are IPv6 (``::`` = every local IPv6 address) is DNATed like an
IPv4 one. The forwarding and isolation rules match interfaces, so they hold for both families.

Gateway modes (Docker 28's ``com.docker.network.bridge.gateway_mode_ipv4``/``_ipv6``), each
family of each network on its own:

* ``nat`` (the default): everything above;
* ``nat-unprotected``: as ``nat`` without the direct-routing protection: no raw drop for the
  subnet, and the forward chain accepts anything routed to the bridge, so every port of a
  container is reachable by a host that routes to its address (Docker's legacy behaviour);
* ``routed``: no masquerade and no direct-routing drop; a packet routed to the bridge is
  accepted when it is ICMP or when its (container address, protocol, port) is the target of a
  published mapping (Docker 29's semantics, moby#50140: published ports are open to routing
  whether or not the network is the container's gateway), every other one is dropped. The host
  port of such a mapping is still DNATed (Docker ignores it; netd reserves it anyway);
* ``isolated`` (internal networks only): as ``internal``, and the host itself can neither reach
  the bridge's containers nor be reached by them (Docker leaves the bridge without an address;
  netd keeps the address and drops the traffic in the input and output hooks).

A backend owns one table (or chain set) outright and nothing else; every method is one
transaction that either applies completely or leaves the previous state untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from common.ports import PROTOCOLS, PortMapping
from netd.errors import NetdError

ANY_IPV4 = "0.0.0.0"
ANY_IPV6 = "::"
ANY_ADDRESSES = (ANY_IPV4, ANY_IPV6)
BACKENDS = ("nftables", "iptables")

# Docker 28's gateway modes (libnetwork/drivers/bridge, gwMode).
GW_NAT = "nat"
GW_NAT_UNPROTECTED = "nat-unprotected"
GW_ROUTED = "routed"
GW_ISOLATED = "isolated"
GATEWAY_MODES = (GW_NAT, GW_NAT_UNPROTECTED, GW_ROUTED, GW_ISOLATED)


class FirewallError(NetdError):
    """The kernel rejected a firewall transaction (the previous ruleset is intact)."""


@dataclass(frozen=True)
class BridgeNetwork:
    """What the firewall needs to know about one bridge network."""

    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    internal: bool = False  # no forwarding in or out, no masquerade
    masquerade: bool = True  # source NAT for traffic leaving through another interface
    subnet6: IPv6Network | None = None  # IPv6 networks only (--ipv6)
    gateway6: IPv6Address | None = None
    gateway_mode4: str = GW_NAT  # one of GATEWAY_MODES, for the IPv4 subnet
    gateway_mode6: str = GW_NAT  # the same for the IPv6 subnet

    def mode(self, family: int) -> str:
        return self.gateway_mode6 if family == 6 else self.gateway_mode4

    def protected(self, family: int) -> bool:
        """Whether routing straight at a container address of ``family`` is dropped raw."""
        return self.mode(family) not in (GW_NAT_UNPROTECTED, GW_ROUTED)

    def masquerades(self, family: int) -> bool:
        return self.masquerade and self.mode(family) != GW_ROUTED

    def contains(self, address: str) -> bool:
        """Whether ``address`` (a container's) is in one of this network's subnets."""
        ip = ip_address(address)
        if ip.version == 6:
            return self.subnet6 is not None and ip in self.subnet6
        return ip in self.subnet


def routed_targets(
    networks: Sequence[BridgeNetwork], mappings: Sequence[PortMapping]
) -> list[tuple[str, str, int]]:
    """(container address, protocol, container port) of each mapping whose container is on a
    network routed in the mapping's family, once each, in order: what routed mode opens."""
    found: dict[tuple[str, str, int], None] = {}
    for m in mappings:
        family = 6 if is_ipv6_mapping(m) else 4
        for net in networks:
            if net.mode(family) == GW_ROUTED and net.contains(m.container_ip):
                found[(m.container_ip, m.proto, m.container_port)] = None
    return list(found)


def dnat_mappings(mappings: Sequence[PortMapping]) -> list[PortMapping]:
    """The mappings that DNAT a host port (all but the routed ones, whose host port is 0)."""
    return [m for m in mappings if m.host_port]


class Firewall(ABC):
    # Set by the controller before ``install``: drop forwarded IPv4 traffic that is not
    # pyengine's (see the module's docstring).
    forward_drop: bool = False
    # The iptables backend only: the filter FORWARD policy found before it set DROP, put back
    # by ``install`` without ``forward_drop`` and by ``uninstall`` (None: nothing to put back).
    forward_policy_before: str | None = None
    # Set by the controller before ``install`` while a published port is in transparent proxy
    # mode: packets from a bridge that belong to a transparent socket get these mark bits
    # (netd/returnpath.py routes them to the local stack). None: no such rule.
    transparent_mark: int | None = None

    def remember_forward_policy(self) -> None:
        """Fill ``forward_policy_before`` from the kernel when ``forward_drop`` is about to
        change a policy nobody recorded yet, so the caller can persist it first (a no-op for a
        backend that changes no policy)."""
        return None

    @abstractmethod
    def install(self, networks: Sequence[BridgeNetwork], mappings: Sequence[PortMapping]) -> None:
        """Replace everything this backend owns by a fresh base ruleset plus ``mappings``."""

    @abstractmethod
    def add_mappings(self, mappings: Sequence[PortMapping]) -> None:
        """Add all ``mappings`` or none (a host port mapped already is an error)."""

    @abstractmethod
    def remove_mappings(self, mappings: Sequence[PortMapping]) -> None:
        """Remove ``mappings``; ones already gone are ignored."""

    @abstractmethod
    def mappings(self) -> list[PortMapping]:
        """The mappings the kernel holds now."""

    @abstractmethod
    def uninstall(self) -> None:
        """Remove everything this backend owns; no-op when nothing is installed."""

    @abstractmethod
    def installed(self) -> bool:
        """Whether any object this backend owns exists in the kernel."""

    @abstractmethod
    def describe(self) -> str:
        """Everything this backend owns, as the kernel lists it now (with counters), for
        people reading along; empty when nothing is installed."""

    @abstractmethod
    def variant(self) -> str:
        """Which flavour of its kernel API the backend drives, for people reading along:
        "nf_tables" or "legacy" for iptables (whichever the tools on PATH use), "" for a
        backend with only one."""


def make_firewall(backend: str, table: str, userland_proxy: bool) -> Firewall:
    """The backend named by ``NetdConfig.firewall_backend``."""
    if backend == "nftables":
        from netd.firewall.nftables import NftablesFirewall

        return NftablesFirewall(table, userland_proxy)
    if backend == "iptables":
        from netd.firewall.iptables import IptablesFirewall

        return IptablesFirewall(table, userland_proxy)
    supported = ", ".join(BACKENDS)
    raise NetdError(f'unsupported firewall backend "{backend}" (supported: {supported})')


def is_ipv6_mapping(m: PortMapping) -> bool:
    return ":" in m.host_ip


def check_mapping(m: PortMapping) -> None:
    """What both backends require of a mapping before it reaches the kernel."""
    if m.proto not in PROTOCOLS:
        raise FirewallError(f'unsupported protocol "{m.proto}"')
    # Host port 0: a mapping into a routed network, which opens the container's port to
    # direct routing and has no host port to DNAT (see ``routed_targets``).
    for port, lowest in ((m.host_port, 0), (m.container_port, 1)):
        if not isinstance(port, int) or not lowest <= port <= 65535:
            raise FirewallError(f"invalid port {port!r}")
    try:
        host, container = ip_address(m.host_ip), ip_address(m.container_ip)
    except ValueError as exc:
        raise FirewallError(f"invalid mapping: {exc}") from None
    if host.version != container.version:
        raise FirewallError(
            f"cannot map {m.host_ip} to {m.container_ip}: the addresses' families differ"
        )
