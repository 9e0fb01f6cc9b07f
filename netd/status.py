"""What netd has set up, for people learning how it works: the networks (with their bridges)
and endpoints from the persisted state, checked against the kernel, and the firewall rules and
published-port mappings as the kernel holds them now. Read-only: nothing here changes the
kernel or a file.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

from pyroute2 import IPRoute

from common.jsonstate import read_json
from common.ports import PortMapping
from netd import sandbox
from netd.controller import (
    ENDPOINTS_FILE,
    IPAM_FILE,
    NETWORK_FILE,
    STATE_DIR,
    Endpoint,
    NetdConfig,
    PublishedPort,
)
from netd.errors import NetdError
from netd.firewall import BACKENDS, Firewall, make_firewall
from netd.network import DEFAULT_NETWORK, READY, Network, default_network_id
from netd.state import NetdState

_IFF_UP = 0x1  # <linux/if.h>


@dataclass
class BridgeStatus:
    name: str
    subnet: str  # from the persisted state ("" when unknown)
    exists: bool = False
    up: bool = False
    addresses: list[str] = field(default_factory=list)  # live IPv4 address/prefix
    ports: list[str] = field(default_factory=list)  # live enslaved interfaces


@dataclass
class NetworkStatus:
    network: Network
    bridge: BridgeStatus


@dataclass
class EndpointStatus:
    endpoint: Endpoint
    netns_present: bool
    veth_present: bool  # for a macvlan/ipvlan endpoint: its link inside the namespace


@dataclass
class PortStatus:
    container_id: str
    port: PublishedPort
    # None: the kernel's mappings could not be read, or the port is not the firewall's (an
    # IPv6 host address, served by the userland proxy alone: PublishedPort.in_firewall)
    in_kernel: bool | None


@dataclass
class NetdStatus:
    data_root: Path
    networks: list[NetworkStatus]  # the default network first
    backend: str  # "" when no firewall of ours was found
    table: str
    userland_proxy: bool | None
    endpoints: list[EndpointStatus]
    ports: list[PortStatus]
    unknown_mappings: list[PortMapping]  # in the kernel, not in the persisted state
    firewall_text: str
    firewall_error: str = ""
    iptables_variant: str = ""  # "nf_tables" or "legacy" for the iptables backend

    @property
    def bridge(self) -> BridgeStatus:
        """The default network's bridge."""
        return self.networks[0].bridge


def _bridge_status(name: str, subnet: str) -> BridgeStatus:
    status = BridgeStatus(name, subnet)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return status
        index = found[0]
        link = ipr.get_links(index)[0]
        status.exists = True
        status.up = bool(link["flags"] & _IFF_UP)
        status.addresses = [
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=index, family=socket.AF_INET)
        ]
        status.ports = sorted(
            port.get_attr("IFLA_IFNAME")
            for port in ipr.get_links()
            if port.get_attr("IFLA_MASTER") == index
        )
    return status


def _default_network(network: dict[str, str], defaults: NetdConfig) -> Network:
    """The default network as the firewall record (network.json) describes it."""
    bridge = network.get("bridge") or defaults.bridge
    subnet = network.get("subnet", "")
    gateway = network.get("gateway", "")
    seed = IPv4Interface(f"{gateway}/{subnet.split('/')[-1]}" if subnet else defaults.bridge_cidr)
    return Network(
        id=default_network_id(bridge, seed),
        name=DEFAULT_NETWORK,
        bridge=bridge,
        subnet=subnet or str(seed.network),
        gateway=gateway or str(seed.ip),
        default=True,
    )


def _pick_backend(table: str, userland_proxy: bool) -> tuple[str, Firewall | None]:
    """The backend whose objects for ``table`` exist (nftables first), if any."""
    for backend in BACKENDS:
        try:
            firewall = make_firewall(backend, table, userland_proxy)
            if firewall.installed():
                return backend, firewall
        except NetdError:
            continue
    return "", None


def collect_status(
    data_root: Path, table: str | None = None, backend: str | None = None
) -> NetdStatus:
    state_dir = data_root / STATE_DIR
    network = read_json(state_dir / NETWORK_FILE, None) or {}
    defaults = NetdConfig(data_root=data_root)
    table = table or network.get("table") or defaults.table
    proxy = network.get("userland_proxy")
    persisted = NetdState.load(
        state_dir / ENDPOINTS_FILE, _default_network(network, defaults), state_dir / IPAM_FILE
    )
    known_networks = list(persisted.networks.values())
    if not any(n.default for n in known_networks):
        known_networks.insert(0, _default_network(network, defaults))
    # A macvlan/ipvlan network's link is its parent (its children live in the namespaces).
    networks = [
        NetworkStatus(net, _bridge_status(net.bridge or net.parent, net.subnet))
        for net in known_networks
    ]
    endpoints = [
        EndpointStatus(
            ep,
            sandbox.netns_exists(ep.netns_name),
            sandbox.link_exists(ep.host_veth)
            if ep.host_veth
            else sandbox.link_exists_inside(ep.netns_name, ep.ifname),
        )
        for ep in persisted.endpoints.values()
    ]

    firewall: Firewall | None = None
    error = ""
    chosen = backend or network.get("firewall_backend")
    try:
        if chosen:
            firewall = make_firewall(chosen, table, bool(proxy))
        else:
            chosen, firewall = _pick_backend(table, bool(proxy))
    except NetdError as exc:
        error = str(exc)
    text = ""
    variant = ""
    live: list[PortMapping] | None = None
    if firewall is not None:
        try:
            variant = firewall.variant()
            text = firewall.describe()
            live = firewall.mappings() if text else []
        except NetdError as exc:
            error = str(exc)

    ports: list[PortStatus] = []
    known: set[PortMapping] = set()
    for cid, published in persisted.ports.items():
        for port in published:
            in_kernel = None
            if port.in_firewall and port.host_port:  # routed (host port 0): no DNAT
                known.add(port.mapping())
                in_kernel = None if live is None else port.mapping() in live
            ports.append(PortStatus(cid, port, in_kernel))
    unknown = [m for m in live or [] if m not in known]
    return NetdStatus(
        data_root=data_root,
        networks=networks,
        backend=chosen or "",
        table=table,
        userland_proxy=proxy,
        endpoints=endpoints,
        ports=ports,
        unknown_mappings=unknown,
        firewall_text=text,
        firewall_error=error,
        iptables_variant=variant,
    )


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _mapping_text(m: PortMapping) -> str:
    host = f"[{m.host_ip}]" if ":" in m.host_ip else m.host_ip
    return f"{m.proto} {host}:{m.host_port} -> {m.container_ip}:{m.container_port}"


def render_status(status: NetdStatus) -> str:
    out: list[str] = [f"netd state under {status.data_root / STATE_DIR}", ""]

    proxy = {True: "on", False: "off (kernel DNAT only)", None: "unknown"}[status.userland_proxy]
    out.append(f"userland proxy: {proxy}")
    out.append("")

    out.append(f"Networks ({len(status.networks)})")
    for ns in status.networks:
        net, b = ns.network, ns.bridge
        flags = [
            flag
            for flag, on in (
                ("default", net.default),
                ("internal", net.internal),
                ("icc off", not net.enable_icc),
                ("no masquerade", not net.masquerade),
                (net.state, net.state != READY),
            )
            if on
        ]
        range_text = f"  ip-range {net.ip_range}" if net.ip_range else ""
        out.append(
            f"  {net.name}  {net.id[:12]}  subnet {net.subnet}  gateway {net.gateway}"
            f"{range_text}" + (f"  ({', '.join(flags)})" if flags else "")
        )
        if not net.is_bridge:
            made = ", made by netd" if net.created_parent else ""
            what = f"{net.driver} {net.mode}{' ' + net.flag if net.flag else ''}"
            found = ("UP" if b.up else "DOWN") if b.exists else "no such link"
            out.append(f"    {what} on parent {net.parent} ({found}{made})")
        elif b.exists:
            state = "UP" if b.up else "DOWN"
            addrs = ", ".join(b.addresses) or "no address"
            out.append(f"    {b.name}  {addrs}  {state}  ports: {', '.join(b.ports) or 'none'}")
        else:
            out.append(f"    {b.name}  (no such link)")
    out.append("")

    out.append(f"Endpoints ({len(status.endpoints)})")
    if status.endpoints:
        names = {ns.network.id: ns.network.name for ns in status.networks}
        rows = [["CONTAINER", "NETWORK", "IF", "NETNS", "HOST LINK", "ADDRESS", "MAC", "LIVE"]]
        for e in status.endpoints:
            ep = e.endpoint
            missing = [
                name
                for name, present in (("netns", e.netns_present), ("veth", e.veth_present))
                if not present
            ]
            live = "yes" if not missing else "missing " + ",".join(missing)
            if ep.state != READY:
                live = f"{ep.state}, {live}"
            rows.append(
                [
                    ep.container_id[:12],
                    names.get(ep.network_id, ep.network_name or "?"),
                    ep.ifname,
                    ep.netns_name,
                    ep.host_veth or "(none: child of parent)",
                    f"{ep.ip}/{ep.prefixlen}",
                    ep.mac,
                    live,
                ]
            )
        out += _table(rows)
    out.append("")

    out.append(f"Published ports ({len(status.ports)})")
    if status.ports:
        rows = [["CONTAINER", "MAPPING", "IN KERNEL"]]
        for p in status.ports:
            seen = {True: "yes", False: "NO", None: "?"}[p.in_kernel]
            if not p.port.in_firewall:
                seen = "no (proxy only)"
            rows.append([p.container_id[:12], _mapping_text(p.port.mapping()), seen])
        out += _table(rows)
    for m in status.unknown_mappings:
        out.append(f"  in the kernel but not in the state: {_mapping_text(m)}")
    out.append("")

    if not status.backend:
        out.append(f'Firewall: nothing installed for table "{status.table}"')
    else:
        where = (
            f"table inet {status.table}"
            if status.backend == "nftables"
            else f"{status.iptables_variant or 'unknown'} API, chains {status.table.upper()}-* "
            f"and their jumps tagged {status.table}"
        )
        out.append(f"Firewall ({status.backend}, {where}), live from the kernel")
        if status.firewall_text:
            out += ["  " + line if line else "" for line in status.firewall_text.splitlines()]
        elif not status.firewall_error:
            out.append("  (nothing installed)")
    if status.firewall_error:
        out.append(f"  error: {status.firewall_error}")
    return "\n".join(out) + "\n"
