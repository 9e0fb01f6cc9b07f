"""nftables backend: one ``inet`` table, published ports as elements of two DNAT maps.

Each map is consulted by a single rule, so the lookup cost does not grow with the number of
published ports and publishing a port is an element change, not a rule change (nft(8), "MAPS"
and "NAT STATEMENTS": ``dnat ip to <key> map @m`` with an ``ipv4_addr . inet_service`` value
sets address and port at once). Every change is one libnftables batch, which the kernel commits
atomically or not at all.

The ``raw_prerouting`` chain runs before conntrack and NAT (priority raw, nft(8) "CHAINS"), so
its drops see the destination as it was on the wire: a packet to a published host port still
carries the host's address there, while one routed straight at a container carries the
container's. The loopback drop looks the port up in the same map the DNAT rule uses, so it
follows publish/unpublish without any rule change.

``filter_forward`` starts with the network-wide drops: an internal network's bridge forwards
nothing in or out, and a packet leaving one bridge for another goes through ``isolate_networks``
(Docker's DOCKER-ISOLATION stages in one chain), which drops it unless conntrack marks its
connection as DNATed, i.e. as a connection to a published port.

``filter_input`` drops what comes in from a bridge for 127.0.0.0/8 without being part of a
DNATed connection (``ct status & dnat == 0``: the "!" form of a flag test, nft(8) "CT
EXPRESSION"; ``!= dnat`` would compare the whole status word). With ``forward_drop`` the
``filter_forward`` chain's policy is drop, so only pyengine's bridges' traffic is routed (IPv4
only: the drop follows ``net.ipv4.ip_forward``, IPv6 is accepted as before); every base chain
of every table must accept a packet for it to pass (nft(8) "CHAINS": a drop verdict is final),
so this table alone stops the rest.

IPv6 (networks created with ``--ipv6``): two more maps with ``ipv6_addr`` keys and values, and
the same rules for the IPv6 subnets. The host's ``::1`` is never DNATed: the kernel will not
send a packet with a loopback source out of a non-loopback interface (IPv6 has no
``route_localnet``; RFC 4291 2.5.3), so, as Docker does (``! -d ::1`` on its ip6tables OUTPUT
jump), a connection to ``[::1]:<port>`` is left to the socket on ``[::]:<port>``: the userland
proxy when it runs, else the reserving socket, which refuses it.

Gateway modes (netd/firewall/__init__.py): ``nat-unprotected`` and ``routed`` leave a family's
subnet out of ``raw_prerouting``; ``nat-unprotected`` accepts what is forwarded to the bridge in
that family; ``routed`` skips the masquerade and accepts what is forwarded to a target in the set
``routed4``/``routed6`` (container address . protocol . port of the published mappings into a
routed network: a set keeps the forward rule fixed as ports come and go) or ICMP; ``isolated``
adds drops to ``filter_input`` and ``filter_output`` for the bridge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import nftables

from common.ports import PortMapping
from netd.firewall import (
    ANY_ADDRESSES,
    ANY_IPV4,
    ANY_IPV6,
    GW_ISOLATED,
    GW_NAT_UNPROTECTED,
    GW_ROUTED,
    BridgeNetwork,
    Firewall,
    FirewallError,
    check_mapping,
    dnat_mappings,
    is_ipv6_mapping,
    routed_targets,
)
from netd.firewall.returnpath import nft_chain
from netd.naming import BRIDGE_GROUP, valid_ifname

# Keyed by the destination address: mappings bound to one host address.
MAP_ON_ADDR = "published_on_addr"
# Keyed by protocol and port only: mappings bound to every local address (0.0.0.0).
MAP_ON_ANY = "published_on_any"
# The same two for IPv6 host and container addresses.
MAP6_ON_ADDR = "published6_on_addr"
MAP6_ON_ANY = "published6_on_any"
MAPS = (MAP_ON_ADDR, MAP_ON_ANY, MAP6_ON_ADDR, MAP6_ON_ANY)
# The keys of MAP_ON_ADDR on 127.0.0.0/8, as a set: the raw chain's drop of such ports from a
# wire looks them up here. A lookup of a map's keys as a set ("... @map") is refused with EINVAL
# by Linux 6.1 (Debian 12's kernel); newer kernels take it.
LOOPBACK4 = "published_on_loopback"
# Published targets (container address . protocol . port) on routed networks, per family.
ROUTED4 = "routed4"
ROUTED6 = "routed6"
ISOLATE_CHAIN = "isolate_networks"

_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def _map_name(m: PortMapping) -> str:
    if is_ipv6_mapping(m):
        return MAP6_ON_ANY if m.host_ip == ANY_IPV6 else MAP6_ON_ADDR
    return MAP_ON_ANY if m.host_ip == ANY_IPV4 else MAP_ON_ADDR


def _on_loopback4(m: PortMapping) -> bool:
    return _map_name(m) == MAP_ON_ADDR and m.host_ip.startswith("127.")


def _key(m: PortMapping) -> str:
    if m.host_ip in ANY_ADDRESSES:
        return f"{m.proto} . {m.host_port}"
    return f"{m.host_ip} . {m.proto} . {m.host_port}"


def _element(m: PortMapping) -> str:
    return f"{_key(m)} : {m.container_ip} . {m.container_port}"


class NftablesFirewall(Firewall):
    """Owns ``table inet <table>``; touches nothing outside it."""

    def __init__(self, table: str, userland_proxy: bool) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise FirewallError(f'invalid nftables table name "{table}"')
        self.table = table
        self.userland_proxy = userland_proxy
        self._nft = nftables.Nftables()
        self._nft_json = nftables.Nftables()
        self._nft_json.set_json_output(True)
        # The networks of the last install: which mappings open a routed network's port.
        self._networks: tuple[BridgeNetwork, ...] = ()

    # -- transactions -----------------------------------------------------------------------

    def _run(self, script: str) -> None:
        rc, _out, err = self._nft.cmd(script)
        if rc != 0:
            raise FirewallError(_one_line(err))

    def _table_exists(self) -> bool:
        rc, _out, _err = self._nft.cmd(f"list table inet {self.table}")
        return bool(rc == 0)

    # -- ruleset ----------------------------------------------------------------------------

    def _ruleset(self, networks: Sequence[BridgeNetwork]) -> str:
        for net in networks:
            if not valid_ifname(net.bridge):
                raise FirewallError(f'invalid bridge name "{net.bridge}"')
        proxy = self.userland_proxy
        raw = [
            # A port published on a loopback address is for this host only, even when some
            # interface has route_localnet=1 (moby#45610).
            'iifname != "lo" ip daddr 127.0.0.0/8 '
            f"ip daddr . meta l4proto . th dport @{LOOPBACK4} counter drop",
        ]
        # Loopback never arrives from a wire.
        prerouting = ["ip daddr 127.0.0.0/8 return", "ip6 daddr ::1 return"]
        # ::1 cannot be DNATed off the host (see the module's docstring).
        output: list[str] = ["ip6 daddr ::1 return"]
        postrouting: list[str] = []
        # Before any accept: internal networks, then the isolation between networks.
        forward_first: list[str] = []
        forward: list[str] = []
        input_: list[str] = []
        output_filter: list[str] = []
        # Jumped to by packets leaving a bridge through another interface: those going into
        # another of our bridges are dropped, unless they belong to a connection to a published
        # port (DNATed, or the reply of one), which any client may open.
        # Published ports of routed networks are open to any client as well.
        isolate = [
            "ct status dnat return",
            f"ip daddr . meta l4proto . th dport @{ROUTED4} return",
            f"ip6 daddr . meta l4proto . th dport @{ROUTED6} return",
        ]
        for net in networks:
            br, subnet = f'"{net.bridge}"', str(net.subnet)
            # Containers are reached through the bridge or through DNAT of a host address,
            # never by routing to their addresses from elsewhere; the gateway is the host's.
            if net.protected(4):
                raw.append(
                    f"iifname != {br} ip daddr {subnet} ip daddr != {net.gateway} counter drop"
                )
            subnet6 = str(net.subnet6) if net.subnet6 is not None else ""
            if subnet6 and net.protected(6):
                raw.append(
                    f"iifname != {br} ip6 daddr {subnet6} ip6 daddr != {net.gateway6} counter drop"
                )
            isolate.append(f"oifname {br} counter drop")
            input_.append(f"iifname {br} ip daddr 127.0.0.0/8 ct status & dnat == 0 counter drop")
            for family, nfproto in ((4, "ipv4"), (6, "ipv6")):
                if net.mode(family) == GW_ISOLATED:
                    # Neither to nor from the host itself (Docker: no address on the bridge).
                    input_.append(f"iifname {br} meta nfproto {nfproto} counter drop")
                    output_filter.append(f"oifname {br} meta nfproto {nfproto} counter drop")
            if net.internal:
                forward_first += [
                    f"iifname {br} oifname != {br} counter drop",
                    f"oifname {br} iifname != {br} counter drop",
                ]
                continue
            forward_first.append(f"iifname {br} oifname != {br} jump {ISOLATE_CHAIN}")
            if proxy:
                # Containers reach published ports through the userland proxy (Docker's
                # "! -i docker0" on the nat DOCKER jump).
                prerouting.append(f"iifname {br} return")
            if net.masquerades(4):
                postrouting.append(f"ip saddr {subnet} oifname != {br} masquerade")
            if subnet6 and net.masquerades(6):
                # NAT66, as Docker 28 does for an IPv6 network unless masquerade is off.
                postrouting.append(f"ip6 saddr {subnet6} oifname != {br} masquerade")
            if not proxy:
                # Host loopback and hairpin connections were DNATed to the bridge: rewrite the
                # source so replies come back through this host and get un-NATed.
                postrouting.append(f"oifname {br} ip saddr 127.0.0.0/8 masquerade")
                postrouting.append(f"oifname {br} ip saddr {subnet} ct status dnat masquerade")
                if subnet6:
                    postrouting.append(
                        f"oifname {br} ip6 saddr {subnet6} ct status dnat masquerade"
                    )
            forward += [
                f"oifname {br} ct state established,related accept",
                f"oifname {br} ct status dnat accept",
                f"iifname {br} accept",
                *_gateway_mode_accepts(net, br),
                f"oifname {br} drop",
            ]
        if proxy:
            output.append("ip daddr 127.0.0.0/8 return")  # host loopback goes to the proxy
        prerouting.append("fib daddr type local jump published_dnat")
        output.append("fib daddr type local jump published_dnat")
        forward_policy = "accept"
        if self.forward_drop:
            forward_policy = "drop"
            forward += [
                "meta nfproto ipv6 accept",  # the drop is about net.ipv4.ip_forward
                # Other pyengine daemons' bridges: their own tables decide (netd/bridge.py).
                f"meta iifgroup {BRIDGE_GROUP} accept",
                f"meta oifgroup {BRIDGE_GROUP} accept",
            ]

        def chain(name: str, lines: list[str]) -> str:
            body = "".join(f"\n    {line}" for line in lines)
            return f"  chain {name} {{{body}\n  }}\n"

        return (
            f"table inet {self.table} {{\n"
            f"  map {MAP_ON_ADDR} {{\n"
            "    type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n"
            "  }\n"
            f"  map {MAP_ON_ANY} {{\n"
            "    type inet_proto . inet_service : ipv4_addr . inet_service\n"
            "  }\n"
            f"  map {MAP6_ON_ADDR} {{\n"
            "    type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service\n"
            "  }\n"
            f"  map {MAP6_ON_ANY} {{\n"
            "    type inet_proto . inet_service : ipv6_addr . inet_service\n"
            "  }\n"
            f"  set {LOOPBACK4} {{\n"
            "    type ipv4_addr . inet_proto . inet_service\n"
            "  }\n"
            f"  set {ROUTED4} {{\n"
            "    type ipv4_addr . inet_proto . inet_service\n"
            "  }\n"
            f"  set {ROUTED6} {{\n"
            "    type ipv6_addr . inet_proto . inet_service\n"
            "  }\n"
            + chain(
                "published_dnat",
                [
                    "meta nfproto ipv4 dnat ip to ip daddr . meta l4proto . th dport "
                    f"map @{MAP_ON_ADDR}",
                    f"meta nfproto ipv4 dnat ip to meta l4proto . th dport map @{MAP_ON_ANY}",
                    "meta nfproto ipv6 dnat ip6 to ip6 daddr . meta l4proto . th dport "
                    f"map @{MAP6_ON_ADDR}",
                    f"meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @{MAP6_ON_ANY}",
                ],
            )
            + chain(
                "raw_prerouting",
                ["type filter hook prerouting priority raw; policy accept;", *raw],
            )
            + chain(
                "nat_prerouting",
                ["type nat hook prerouting priority dstnat; policy accept;", *prerouting],
            )
            + chain("nat_output", ["type nat hook output priority -100; policy accept;", *output])
            + chain(
                "nat_postrouting",
                ["type nat hook postrouting priority srcnat; policy accept;", *postrouting],
            )
            + chain(ISOLATE_CHAIN, isolate)
            + nft_chain(networks, self.transparent_mark)
            + chain(
                "filter_input",
                ["type filter hook input priority filter; policy accept;", *input_],
            )
            + chain(
                "filter_output",
                ["type filter hook output priority filter; policy accept;", *output_filter],
            )
            + chain(
                "filter_forward",
                [
                    f"type filter hook forward priority filter; policy {forward_policy};",
                    *forward_first,
                    *forward,
                ],
            )
            + "}\n"
        )

    def _elements(self, verb: str, mappings: Sequence[PortMapping], with_values: bool) -> str:
        lines = []
        for name in MAPS:
            items = [m for m in dnat_mappings(mappings) if _map_name(m) == name]
            if items:
                render = _element if with_values else _key
                body = ", ".join(render(m) for m in items)
                lines.append(f"{verb} element inet {self.table} {name} {{ {body} }}\n")
        loopback = [_key(m) for m in dnat_mappings(mappings) if _on_loopback4(m)]
        if loopback:
            body = ", ".join(loopback)
            lines.append(f"{verb} element inet {self.table} {LOOPBACK4} {{ {body} }}\n")
        return "".join(lines)

    def _routed_elements(self, verb: str, targets: Sequence[tuple[str, str, int]]) -> str:
        lines = []
        for name, v6 in ((ROUTED4, False), (ROUTED6, True)):
            items = [f"{ip} . {proto} . {port}" for ip, proto, port in targets if (":" in ip) == v6]
            if items:
                lines.append(f"{verb} element inet {self.table} {name} {{ {', '.join(items)} }}\n")
        return "".join(lines)

    # -- Firewall ---------------------------------------------------------------------------

    def install(self, networks: Sequence[BridgeNetwork], mappings: Sequence[PortMapping]) -> None:
        for m in mappings:
            check_mapping(m)
        # "add" then "delete" makes the delete valid whether or not the table exists; the new
        # table replaces the old one in the same commit, so there is no unprotected window.
        self._run(
            f"add table inet {self.table}\n"
            f"delete table inet {self.table}\n"
            + self._ruleset(networks)
            + self._elements("add", mappings, with_values=True)
            + self._routed_elements("add", routed_targets(networks, mappings))
        )
        self._networks = tuple(networks)

    def add_mappings(self, mappings: Sequence[PortMapping]) -> None:
        for m in mappings:
            check_mapping(m)
        if mappings:
            # "create" fails with EEXIST when the key exists, even with the same value; "add"
            # of a set element that is there already is a no-op (two host ports, one target).
            self._run(
                self._elements("create", mappings, with_values=True)
                + self._routed_elements("add", routed_targets(self._networks, mappings))
            )

    def remove_mappings(self, mappings: Sequence[PortMapping]) -> None:
        for m in mappings:
            check_mapping(m)
        if not mappings:
            return
        if routed_targets(self._networks, mappings):
            self._remove_routed(mappings)
            return
        try:
            self._run(self._elements("delete", mappings, with_values=False))
        except FirewallError:
            # nft 1.0.6 has no "destroy element": retry with only the keys still present.
            if not self._table_exists():
                return
            present = {(_map_name(m), _key(m)) for m in self.mappings()}
            left = [m for m in mappings if (_map_name(m), _key(m)) in present]
            if left:
                self._run(self._elements("delete", left, with_values=False))

    def _remove_routed(self, mappings: Sequence[PortMapping]) -> None:
        """Remove mappings of which some open a routed network's port: a target leaves its set
        with the last mapping to it, in the same batch."""
        if not self._table_exists():
            return
        gone = {(_map_name(m), _key(m)) for m in dnat_mappings(mappings)}
        present = self.mappings()
        removed = [m for m in present if (_map_name(m), _key(m)) in gone]
        kept = [m for m in present if (_map_name(m), _key(m)) not in gone]
        still_open = set(routed_targets(self._networks, kept))
        closing = [t for t in routed_targets(self._networks, mappings) if t not in still_open]
        script = self._elements("delete", removed, with_values=False)
        # "add" then "delete": valid whether or not the element is there (nft 1.0.6 has no
        # "destroy element"), in one batch.
        script += self._routed_elements("add", closing) + self._routed_elements("delete", closing)
        if script:
            self._run(script)

    def mappings(self) -> list[PortMapping]:
        result: list[PortMapping] = []
        for name in MAPS:
            rc, out, err = self._nft_json.cmd(f"list map inet {self.table} {name}")
            if rc != 0:
                raise FirewallError(_one_line(err))
            for item in json.loads(out)["nftables"]:
                for key, value in item.get("map", {}).get("elem", []):
                    result.append(_mapping_from_json(name, key, value))
        return result

    def uninstall(self) -> None:
        self._run(f"add table inet {self.table}\ndelete table inet {self.table}\n")

    def installed(self) -> bool:
        return self._table_exists()

    def describe(self) -> str:
        rc, out, _err = self._nft.cmd(f"list table inet {self.table}")
        return out if rc == 0 else ""

    def variant(self) -> str:
        return ""


def _gateway_mode_accepts(net: BridgeNetwork, br: str) -> list[str]:
    """What a network's gateway modes let through to its bridge, before its final drop."""
    rules = []
    for family, ip, nfproto, icmp, routed in (
        (4, "ip", "ipv4", "icmp", ROUTED4),
        (6, "ip6", "ipv6", "ipv6-icmp", ROUTED6),
    ):
        if family == 6 and net.subnet6 is None:
            continue
        mode = net.mode(family)
        if mode == GW_NAT_UNPROTECTED:
            rules.append(f"oifname {br} meta nfproto {nfproto} counter accept")
        elif mode == GW_ROUTED:
            rules += [
                f"oifname {br} {ip} daddr . meta l4proto . th dport @{routed} counter accept",
                f"oifname {br} meta l4proto {icmp} accept",
            ]
    return rules


def _mapping_from_json(name: str, key: Any, value: Any) -> PortMapping:
    key_parts = key["concat"]
    container_ip, container_port = value["concat"]
    if name in (MAP_ON_ANY, MAP6_ON_ANY):
        host_ip, (proto, host_port) = ANY_IPV4 if name == MAP_ON_ANY else ANY_IPV6, key_parts
    else:
        host_ip, proto, host_port = key_parts
    return PortMapping(proto, host_ip, int(host_port), container_ip, int(container_port))


def _one_line(err: str) -> str:
    """libnftables reports "Error: <why>" then the offending command and a caret line."""
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    if not lines:
        return "nftables transaction failed"
    why = lines[0].removeprefix("Error: ")
    command = next((ln for ln in lines[1:] if not set(ln) <= {"^", "~", " "}), "")
    return f"nftables: {why}" + (f" (in: {command})" if command else "")
