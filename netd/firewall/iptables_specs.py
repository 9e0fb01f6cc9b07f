"""The iptables backend's rule specs for one published port, exactly as ip(6)tables-save prints
them back, parsed back into mappings; the rules of the gateway modes; what the backend owns of a
table (``TableState``) and those lines of a dump; its one-line errors; the FORWARD policy line
of a batch. See netd/firewall/iptables.py."""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.ports import PROTOCOLS, PortMapping
from netd.firewall import (
    ANY_ADDRESSES,
    ANY_IPV6,
    GW_NAT_UNPROTECTED,
    GW_ROUTED,
    BridgeNetwork,
    is_ipv6_mapping,
)

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


@dataclass
class TableState:
    """What this backend owns in one iptables table, in iptables-save's words."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> rule specs, in order
    jumps: list[tuple[str, str]] = field(default_factory=list)  # (built-in chain, rule spec)

    def empty(self) -> bool:
        return not self.chains and not self.jumps


Ruleset = dict[str, TableState]  # iptables table -> what we own in it


def owned_lines(text: str, owned: Ruleset) -> str:
    """The lines of an ``iptables-save -c`` dump that are ``owned``'s chains and jumps, per
    table."""
    sections: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        state = owned.get(table)
        if state is None or state.empty():
            continue
        if line.startswith(":"):
            keep = line[1:].split()[0] in state.chains
        elif line.startswith("["):
            _counters, _, rule = line.partition(" ")
            chain, _, spec = rule.removeprefix("-A ").partition(" ")
            keep = chain in state.chains or (chain, spec) in state.jumps
        else:
            keep = False
        if keep:
            sections.setdefault(table, []).append(line)
    return "".join(
        f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
        for table, lines in sections.items()
    )


def mapping_key(m: PortMapping) -> tuple[str, str, int]:
    return (m.host_ip, m.proto, m.host_port)


def describe_key(m: PortMapping) -> str:
    host = f"[{m.host_ip}]" if is_ipv6_mapping(m) else m.host_ip
    return f"{host}:{m.host_port}/{m.proto}"


def dnat_spec(m: PortMapping) -> str:
    """The DNAT rule of one mapping, exactly as ip(6)tables-save prints it back."""
    v6 = is_ipv6_mapping(m)
    dest = "" if m.host_ip in ANY_ADDRESSES else f"-d {m.host_ip}/{128 if v6 else 32} "
    to = f"[{m.container_ip}]" if v6 else m.container_ip
    return (
        f"{dest}-p {m.proto} -m {m.proto} --dport {m.host_port} "
        f"-j DNAT --to-destination {to}:{m.container_port}"
    )


def routed_spec(target: tuple[str, str, int]) -> str:
    """The ACCEPT of one published target on a routed network, as ip(6)tables-save prints it."""
    ip, proto, port = target
    host = f"{ip}/128" if ":" in ip else f"{ip}/32"
    return f"-d {host} -p {proto} -m {proto} --dport {port} -j ACCEPT"


def gateway_mode_rules(net: BridgeNetwork, family: int, routed_chain: str) -> list[str]:
    """What a network's gateway mode in ``family`` lets through to its bridge, before the
    bridge's final drop."""
    if family == 6 and net.subnet6 is None:
        return []
    br, mode = net.bridge, net.mode(family)
    if mode == GW_NAT_UNPROTECTED:
        return [f"-o {br} -j ACCEPT"]
    if mode == GW_ROUTED:
        icmp = "ipv6-icmp" if family == 6 else "icmp"
        return [f"-o {br} -j {routed_chain}", f"-o {br} -p {icmp} -j ACCEPT"]
    return []


def loopback_drop_spec(m: PortMapping) -> str | None:
    """The raw drop guarding a mapping bound to an IPv4 loopback address (None for other
    mappings; the kernel itself drops ::1 arriving on any interface but lo)."""
    if m.host_ip in ANY_ADDRESSES or is_ipv6_mapping(m):
        return None
    if ipaddress.IPv4Address(m.host_ip) not in _LOOPBACK:
        return None
    return f"-d {m.host_ip}/32 ! -i lo -p {m.proto} -m {m.proto} --dport {m.host_port} -j DROP"


def mapping_from_spec(spec: str) -> PortMapping | None:
    """Parse a rule of our DNAT chain; None for a rule of another shape."""
    tokens = shlex.split(spec)
    options: dict[str, str] = {}
    for i, token in enumerate(tokens):
        if token.startswith("-") and i + 1 < len(tokens):
            options.setdefault(token, tokens[i + 1])
    try:
        if options.get("-j") != "DNAT" or options.get("-p") not in PROTOCOLS:
            return None
        if "!" in tokens:
            return None
        container_ip, _, container_port = options["--to-destination"].rpartition(":")
        container = ipaddress.ip_address(container_ip.removeprefix("[").removesuffix("]"))
        host_ip = ANY_IPV6 if container.version == 6 else "0.0.0.0"
        if "-d" in options:
            net = ipaddress.ip_network(options["-d"])
            if net.prefixlen != net.max_prefixlen or net.version != container.version:
                return None
            host_ip = str(net.network_address)
        return PortMapping(
            options["-p"], host_ip, int(options["--dport"]), str(container), int(container_port)
        )
    except (KeyError, ValueError):
        return None


def one_line(err: str, batch: Sequence[str] = ()) -> str:
    """iptables-restore prints "<prog> v1.8.9 (nf_tables): ", the reason with the batch's line
    number, then usage hints; the offending batch line is quoted like the nftables backend's."""
    lines = []
    for raw in err.splitlines():
        line = re.sub(r"^iptables-restore v[\d.]+ \([\w_]+\):\s*", "", raw.strip())
        if line and not line.startswith("Try `"):
            lines.append(line)
    message = "iptables: " + ("; ".join(lines) or "iptables-restore failed")
    found = re.search(r"\bline:? (\d+)", message)
    if found and 1 <= int(found.group(1)) <= len(batch):
        message += f" (in: {batch[int(found.group(1)) - 1]})"
    return message


def with_forward_policy(sections: dict[str, list[str]], policy: str | None) -> None:
    """Add the setting of the filter FORWARD policy to ``sections``' filter commit."""
    if policy is None:
        return
    lines = sections.get("filter") or ["*filter", "COMMIT"]
    sections["filter"] = [lines[0], f":FORWARD {policy} [0:0]", *lines[1:]]
