"""iptables backend: chains pyengine owns in the raw, nat and filter tables, one rule per port.

For table name ``pyengine`` the chains are (prefix = the table name upper-cased)::

    raw    PREROUTING  --tag--> PYENGINE-PREROUTING   direct-routing and loopback-spoofing drops
    nat    PREROUTING  --tag--> PYENGINE-PREROUTING --> PYENGINE-DNAT   one DNAT rule per port
    nat    OUTPUT      --tag--> PYENGINE-OUTPUT     --> PYENGINE-DNAT
    nat    POSTROUTING --tag--> PYENGINE-POSTROUTING                    masquerade
    filter FORWARD     --tag--> PYENGINE-FORWARD    --> PYENGINE-ISOLATE   bridge forwarding policy
                                                    --> PYENGINE-ROUTED    routed mode's open ports
    filter INPUT       --tag--> PYENGINE-INPUT      loopback from a bridge, not DNATed: dropped
    filter OUTPUT      --tag--> PYENGINE-OUTPUT     to an isolated bridge: dropped

The jumps from the built-in chains carry ``-m comment --comment <table>`` (the "tag"); they and
the chains above are all this backend ever writes or deletes. The rules mirror the nftables
backend one for one, except that each published port is a rule of its own (iptables has no
maps), so the DNAT lookup is linear in the number of ports.

Every change is one ``iptables-restore --noflush`` run. iptables-restore commits each
``*table`` section as a transaction of its own (iptables-restore(8); xtables-restore.c commits
"per table"), so a batch spanning tables is atomic per table only: when a later section fails,
the sections committed before it are put back from the snapshot read just before the change.

The ``iptables-restore``/``iptables-save`` on PATH are used, i.e. whichever variant Debian's
``iptables`` alternative selects (iptables-nft by default since Debian 10).

With ``forward_drop`` the IPv4 filter FORWARD policy is set to DROP (a ``:FORWARD DROP``
line: in --noflush mode a built-in chain's declaration sets its policy and keeps its rules), in
the same filter commit as the rules; the policy found before is kept in
``forward_policy_before`` (the controller persists it) and put back by an ``install`` without
``forward_drop`` and by ``uninstall``. It is the one thing outside our chains this backend
changes, as Docker does.

IPv6: the same chains, with the same names, are kept by ``ip6tables-restore`` for the IPv6
subnets of networks created with ``--ipv6`` and the IPv6 mappings (``-d <addr>/128 ...
--to-destination [<addr>]:<port>``). The interface rules (forwarding, isolation, internal) are
the same in both families. A change touching both families commits IPv4 first; when the IPv6
batch fails, the IPv4 tables are put back from their snapshot. ``::1`` is never DNATed (the
kernel does not route a loopback source off the host; Docker's ip6tables OUTPUT jump has
``! -d ::1`` for the same reason): in DNAT mode ``[::1]:<port>`` is refused by the reserving
socket, with the proxy the proxy serves it.

Gateway modes (netd/firewall/__init__.py) are per family. ``PYENGINE-ROUTED`` holds an ACCEPT
per published target (container address, protocol, port) on a routed network, jumped to from
routed bridges' forward rules and ``PYENGINE-ISOLATE``; it follows the mappings as DNAT does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.ports import PortMapping
from netd.firewall import (
    ANY_ADDRESSES,
    GW_ISOLATED,
    BridgeNetwork,
    Firewall,
    FirewallError,
    check_mapping,
    dnat_mappings,
    is_ipv6_mapping,
    routed_targets,
)
from netd.firewall.iptables_specs import (
    Ruleset,
    TableState,
    describe_key,
    dnat_spec,
    gateway_mode_rules,
    loopback_drop_spec,
    mapping_from_spec,
    mapping_key,
    one_line,
    owned_lines,
    routed_spec,
    with_forward_policy,
)
from netd.firewall.returnpath import iptables_state
from netd.naming import valid_ifname

# iptables chain names hold at most 28 characters (XT_EXTENSION_MAXNAMELEN - 1) and the longest
# suffix is "-POSTROUTING": 16 are left for the table name.
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")
_TIMEOUT = 120  # seconds for one iptables-save / iptables-restore run
_COUNTERS = re.compile(r"^\[\d+:\d+\] ")
_FORWARD_POLICY = re.compile(r"^:FORWARD (\w+)", re.MULTILINE)

# The order a change visits the tables: DNAT rules before the raw drops that protect them. A
# loopback-bound mapping is DNATed only in OUTPUT: no window in which the LAN could reach it.
TABLES = ("nat", "raw", "filter", "mangle")  # mangle: netd/firewall/returnpath.py


@dataclass(frozen=True)
class _Jump:
    """A tagged rule in a built-in chain that jumps to one of our chains."""

    table: str
    builtin: str
    suffix: str
    # Inserted first so our drops and the bridge's forwarding policy come before the host's own
    # rules (as Docker's DOCKER-FORWARD); NAT jumps are appended after the host's.
    first: bool


_JUMPS = (
    _Jump("raw", "PREROUTING", "PREROUTING", first=True),
    _Jump("nat", "PREROUTING", "PREROUTING", first=False),
    _Jump("nat", "OUTPUT", "OUTPUT", first=False),
    _Jump("nat", "POSTROUTING", "POSTROUTING", first=False),
    _Jump("filter", "FORWARD", "FORWARD", first=True),
    _Jump("filter", "INPUT", "INPUT", first=True),
    _Jump("filter", "OUTPUT", "OUTPUT", first=True),
    _Jump("mangle", "PREROUTING", "PREROUTING", first=True),  # only with transparent_mark
)
_CHAIN_SUFFIXES = {
    "raw": ("PREROUTING",),
    "nat": ("PREROUTING", "OUTPUT", "POSTROUTING", "DNAT"),
    "filter": ("FORWARD", "ISOLATE", "INPUT", "OUTPUT", "ROUTED"),
    "mangle": ("PREROUTING",),
}


@dataclass(frozen=True)
class _Tools:
    """The restore/save pair of one address family."""

    family: int  # 4 or 6
    restore: str
    save: str


class IptablesFirewall(Firewall):
    """Owns the chains ``<TABLE>-*`` and their tagged jumps; touches no other rule or chain."""

    def __init__(
        self,
        table: str,
        userland_proxy: bool,
        restore: str = "iptables-restore",
        save: str = "iptables-save",
        restore6: str = "ip6tables-restore",
        save6: str = "ip6tables-save",
    ) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise FirewallError(
                f'invalid table name "{table}" for the iptables backend '
                "(a letter, then at most 15 letters, digits or underscores)"
            )
        for tool in (restore, save, restore6, save6):
            if shutil.which(tool) is None:
                raise FirewallError(f"the iptables backend needs {tool} on PATH")
        self.table = table
        self.tag = table
        self.prefix = table.upper()
        self.userland_proxy = userland_proxy
        self._restore = restore
        self._save = save
        self._v4 = _Tools(4, restore, save)
        self._v6 = _Tools(6, restore6, save6)
        # The networks of the last install: which mappings open a routed network's port.
        self._networks: tuple[BridgeNetwork, ...] = ()

    # -- names ------------------------------------------------------------------------------

    def chain(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def _owned_chains(self, table: str) -> set[str]:
        return {self.chain(s) for s in _CHAIN_SUFFIXES.get(table, ())}

    def _jump_spec(self, jump: _Jump) -> str:
        return f"-m comment --comment {self.tag} -j {self.chain(jump.suffix)}"

    def variant(self) -> str:
        """Which kernel API the iptables tools on PATH use: "nf_tables" or "legacy"."""
        out = self._command([self._restore, "--version"], "").stdout
        found = re.search(r"\((\w+)\)", out)
        return found.group(1) if found else "unknown"

    # -- reading ----------------------------------------------------------------------------

    def _command(self, argv: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"iptables: cannot run {argv[0]}: {exc}") from None

    def _save_text(self, *args: str, tools: _Tools | None = None) -> str:
        save = (tools or self._v4).save
        result = self._command([save, *args], "")
        if result.returncode != 0:
            raise FirewallError(one_line(result.stderr or f"{save} failed"))
        return result.stdout

    def _parse(self, text: str) -> Ruleset:
        """What we own in each table of an iptables-save dump (absent tables: empty)."""
        result: Ruleset = {t: TableState() for t in TABLES}
        state: TableState | None = None
        owned: set[str] = set()
        jump_targets: dict[str, str] = {}
        for raw_line in text.splitlines():
            line = _COUNTERS.sub("", raw_line)  # iptables-save -c: "[packets:bytes] -A ..."
            if line.startswith("*"):
                table = line[1:].strip()
                state = result.setdefault(table, TableState())
                owned = self._owned_chains(table)
                jump_targets = {self._jump_spec(j): j.builtin for j in _JUMPS if j.table == table}
            elif state is None:
                continue
            elif line.startswith(":"):
                name = line[1:].split()[0]
                if name in owned:
                    state.chains.setdefault(name, [])
            elif line.startswith("-A "):
                chain, _, spec = line[3:].partition(" ")
                if chain in state.chains:
                    state.chains[chain].append(spec)
                elif jump_targets.get(spec) == chain:
                    state.jumps.append((chain, spec))
        return result

    def _read(self, tools: _Tools | None = None) -> Ruleset:
        return self._parse(self._save_text(tools=tools))

    # -- the ruleset ------------------------------------------------------------------------

    def _target(
        self, networks: Sequence[BridgeNetwork], mappings: Sequence[PortMapping], family: int = 4
    ) -> Ruleset:
        """The complete state of a fresh install of one family: chains, jumps, a rule a mapping."""
        for net in networks:
            if not valid_ifname(net.bridge):
                raise FirewallError(f'invalid bridge name "{net.bridge}"')
        v6 = family == 6
        mappings = [m for m in mappings if is_ipv6_mapping(m) == v6]
        proxy = self.userland_proxy
        c = self.chain
        raw: list[str] = []
        loopback = "::1/128" if v6 else "127.0.0.0/8"
        prerouting = [f"-d {loopback} -j RETURN"]  # loopback never arrives from a wire
        # ::1 cannot be DNATed off the host (see the module's docstring).
        output: list[str] = ["-d ::1/128 -j RETURN"] if v6 else []
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
        isolate = ["-m conntrack --ctstate DNAT -j RETURN", f"-j {c('ROUTED')}"]
        for net in networks:
            br = net.bridge
            if not v6:
                # route_localnet=1 must not open the host's loopback to the bridge (CVE-2020-8558)
                input_.append(f"-d 127.0.0.0/8 -i {br} -m conntrack ! --ctstate DNAT -j DROP")
            subnet, gateway = (
                (str(net.subnet), f"{net.gateway}/32")
                if not v6
                else (str(net.subnet6), f"{net.gateway6}/128")
                if net.subnet6 is not None
                else ("", "")
            )
            # Containers are reached through the bridge or through DNAT of a host address; the
            # gateway address is the host's own.
            if subnet and net.protected(family):
                raw.append(f"-d {gateway} -j RETURN")
                raw.append(f"-d {subnet} ! -i {br} -j DROP")
            isolate.append(f"-o {br} -j DROP")
            if net.mode(family) == GW_ISOLATED:
                # Neither to nor from the host itself (Docker: no address on the bridge).
                input_.append(f"-i {br} -j DROP")
                output_filter.append(f"-o {br} -j DROP")
            if net.internal:
                forward_first += [f"-i {br} ! -o {br} -j DROP", f"! -i {br} -o {br} -j DROP"]
                continue
            forward_first.append(f"-i {br} ! -o {br} -j {c('ISOLATE')}")
            if proxy:
                prerouting.append(f"-i {br} -j RETURN")  # containers go through the proxy
            if net.masquerades(family) and subnet:
                postrouting.append(f"-s {subnet} ! -o {br} -j MASQUERADE")
            if not proxy:
                # Loopback and hairpin connections DNATed to the bridge: rewrite the source so
                # replies come back through this host and get un-NATed.
                if not v6:
                    postrouting.append(f"-s 127.0.0.0/8 -o {br} -j MASQUERADE")
                if subnet:
                    postrouting.append(
                        f"-s {subnet} -o {br} -m conntrack --ctstate DNAT -j MASQUERADE"
                    )
            forward += [
                f"-o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                f"-o {br} -m conntrack --ctstate DNAT -j ACCEPT",
                f"-i {br} -j ACCEPT",
                *gateway_mode_rules(net, family, c("ROUTED")),
                f"-o {br} -j DROP",
            ]
        if proxy and not v6:
            output.append("-d 127.0.0.0/8 -j RETURN")  # host loopback goes to the proxy
        prerouting.append(f"-m addrtype --dst-type LOCAL -j {c('DNAT')}")
        output.append(f"-m addrtype --dst-type LOCAL -j {c('DNAT')}")
        # Mappings bound to one address come first, as the nftables backend consults its
        # per-address map before the any-address one.
        ordered = sorted(dnat_mappings(mappings), key=lambda m: m.host_ip in ANY_ADDRESSES)
        dnat = [dnat_spec(m) for m in ordered]
        raw += [spec for m in ordered if (spec := loopback_drop_spec(m))]
        target: Ruleset = {
            "raw": TableState({c("PREROUTING"): raw}),
            "nat": TableState(
                {
                    c("PREROUTING"): prerouting,
                    c("OUTPUT"): output,
                    c("POSTROUTING"): postrouting,
                    c("DNAT"): dnat,
                }
            ),
            "filter": TableState(
                {
                    c("FORWARD"): forward_first + forward,
                    c("ISOLATE"): isolate,
                    c("INPUT"): input_,
                    c("OUTPUT"): output_filter,
                    c("ROUTED"): [routed_spec(t) for t in routed_targets(networks, mappings)],
                }
            ),
            "mangle": iptables_state(networks, self.transparent_mark, c("PREROUTING"), self.tag),
        }
        for jump in _JUMPS[:-1]:
            target[jump.table].jumps.append((jump.builtin, self._jump_spec(jump)))
        return target

    def _converge(self, table: str, current: TableState, target: TableState) -> list[str]:
        """The restore section turning ``current`` into ``target`` (empty: nothing to do).

        Declaring a chain in --noflush mode creates it or flushes it (iptables-restore(8)), so
        every owned chain is rewritten whole; jumps already in place are kept.
        """
        if current == target:
            return []
        lines = [f"*{table}"]
        lines += [f":{chain} - [0:0]" for chain in sorted(set(current.chains) | set(target.chains))]
        stale = list(current.jumps)
        missing: list[tuple[str, str]] = []
        for jump in target.jumps:
            if jump in stale:
                stale.remove(jump)
            else:
                missing.append(jump)
        lines += [f"-D {builtin} {spec}" for builtin, spec in stale]
        lines += [f"-X {chain}" for chain in sorted(set(current.chains) - set(target.chains))]
        for chain, rules in target.chains.items():
            lines += [f"-A {chain} {rule}" for rule in rules]
        first = {(j.table, j.builtin) for j in _JUMPS if j.first}
        for builtin, spec in missing:
            where = f"-I {builtin} 1" if (table, builtin) in first else f"-A {builtin}"
            lines.append(f"{where} {spec}")
        lines.append("COMMIT")
        return lines

    # -- transactions -----------------------------------------------------------------------

    def _apply(
        self, sections: dict[str, list[str]], snapshot: Ruleset, tools: _Tools | None = None
    ) -> None:
        """Run one restore batch; if it fails, put back every table it already committed."""
        tools = tools or self._v4
        batch = [line for table in TABLES for line in sections.get(table, [])]
        if not batch:
            return
        result = self._command([tools.restore, "-w", "--noflush"], "\n".join(batch) + "\n")
        if result.returncode == 0:
            return
        error = one_line(result.stderr, batch)
        try:
            self.restore_snapshot(snapshot, tools)
        except FirewallError as exc:
            raise FirewallError(f"{error}; restoring the previous rules failed: {exc}") from None
        raise FirewallError(error)

    def restore_snapshot(self, snapshot: Ruleset, tools: _Tools | None = None) -> None:
        """Bring one family's tables back to ``snapshot`` (what ``_read`` returned)."""
        tools = tools or self._v4
        current = self._read(tools)
        rollback = [
            line
            for table in TABLES
            for line in self._converge(table, current[table], snapshot[table])
        ]
        if rollback:
            undo = self._command([tools.restore, "-w", "--noflush"], "\n".join(rollback) + "\n")
            if undo.returncode != 0:
                raise FirewallError(one_line(undo.stderr, rollback))

    def _require_installed(self, snapshot: Ruleset) -> list[str]:
        dnat = snapshot["nat"].chains.get(self.chain("DNAT"))
        if dnat is None:
            raise FirewallError(f"iptables: chain {self.chain('DNAT')} is not installed")
        return dnat

    # -- per family -------------------------------------------------------------------------

    def _families(self) -> tuple[_Tools, _Tools]:
        return (self._v4, self._v6)

    def _both(self, change: Callable[[_Tools], Ruleset | None]) -> None:
        """Run ``change`` for IPv4 then IPv6 (each returns its snapshot before changing
        anything, or None when it changed nothing); when the IPv6 one fails, IPv4 is put back."""
        snapshot4 = change(self._v4)
        try:
            change(self._v6)
        except BaseException as exc:
            if snapshot4 is not None:
                try:
                    self.restore_snapshot(snapshot4, self._v4)
                except FirewallError as undo:
                    raise FirewallError(
                        f"{exc}; restoring the previous IPv4 rules failed: {undo}"
                    ) from None
            raise

    def _add_family(self, tools: _Tools, mappings: Sequence[PortMapping]) -> Ruleset | None:
        mine = [m for m in mappings if is_ipv6_mapping(m) == (tools.family == 6)]
        if not mine:
            return None
        snapshot = self._read(tools)
        dnat = self._require_installed(snapshot)
        held = {mapping_key(m) for spec in dnat if (m := mapping_from_spec(spec)) is not None}
        for m in dnat_mappings(mine):
            if mapping_key(m) in held:
                raise FirewallError(f"iptables: {describe_key(m)} is mapped already")
            held.add(mapping_key(m))
        nat, raw = [], []
        for m in dnat_mappings(mine):
            any_address = m.host_ip in ANY_ADDRESSES
            where, position = ("-A", "") if any_address else ("-I", " 1")
            nat.append(f"{where} {self.chain('DNAT')}{position} {dnat_spec(m)}")
            if spec := loopback_drop_spec(m):
                raw.append(f"-A {self.chain('PREROUTING')} {spec}")
        sections = {"nat": ["*nat", *nat, "COMMIT"]} if nat else {}
        if raw:
            sections["raw"] = ["*raw", *raw, "COMMIT"]
        routed = set(snapshot["filter"].chains.get(self.chain("ROUTED"), []))
        opening = [
            f"-A {self.chain('ROUTED')} {spec}"
            for t in routed_targets(self._networks, mine)
            if (spec := routed_spec(t)) not in routed
        ]
        if opening:
            sections["filter"] = ["*filter", *opening, "COMMIT"]
        self._apply(sections, snapshot, tools)
        return snapshot

    def _remove_family(self, tools: _Tools, mappings: Sequence[PortMapping]) -> Ruleset | None:
        mine = [m for m in mappings if is_ipv6_mapping(m) == (tools.family == 6)]
        if not mine:
            return None
        snapshot = self._read(tools)
        dnat = snapshot["nat"].chains.get(self.chain("DNAT"))
        if dnat is None:
            return None  # nothing installed: nothing to remove
        present = {mapping_key(m): m for spec in dnat if (m := mapping_from_spec(spec)) is not None}
        raw_rules = set(snapshot["raw"].chains.get(self.chain("PREROUTING"), []))
        nat, raw = [], []
        removed = [present[k] for k in dict.fromkeys(mapping_key(m) for m in mine) if k in present]
        kept = [m for k, m in present.items() if m not in removed]
        still_open = set(routed_targets(self._networks, kept))
        routed = set(snapshot["filter"].chains.get(self.chain("ROUTED"), []))
        closing = [
            f"-D {self.chain('ROUTED')} {rule}"
            for t in routed_targets(self._networks, mine)
            if t not in still_open and (rule := routed_spec(t)) in routed
        ]
        for held in removed:
            nat.append(f"-D {self.chain('DNAT')} {dnat_spec(held)}")
            spec = loopback_drop_spec(held)
            if spec is not None and spec in raw_rules:
                raw.append(f"-D {self.chain('PREROUTING')} {spec}")
        sections = {}
        if nat:
            sections["nat"] = ["*nat", *nat, "COMMIT"]
        if raw:
            sections["raw"] = ["*raw", *raw, "COMMIT"]
        if closing:
            sections["filter"] = ["*filter", *closing, "COMMIT"]
        self._apply(sections, snapshot, tools)
        return snapshot

    # -- Firewall ---------------------------------------------------------------------------

    def install(self, networks: Sequence[BridgeNetwork], mappings: Sequence[PortMapping]) -> None:
        for m in mappings:
            check_mapping(m)
        keys = [mapping_key(m) for m in dnat_mappings(mappings)]
        if len(set(keys)) != len(keys):
            raise FirewallError("iptables: a host port is mapped twice")
        current, policy, before = self._forward_policy_plan(self.forward_drop)

        def install_family(tools: _Tools) -> Ruleset:
            target = self._target(networks, mappings, tools.family)
            snapshot = self._read(tools)
            sections = {t: self._converge(t, snapshot[t], target[t]) for t in TABLES}
            if tools.family == 4:
                with_forward_policy(sections, policy)
            self._apply(sections, snapshot, tools)
            return snapshot

        self._change_with_policy(install_family, current, policy)
        self.forward_policy_before = before
        self._networks = tuple(networks)

    def remember_forward_policy(self) -> None:
        if self.forward_drop and self.forward_policy_before is None:
            self.forward_policy_before = self._forward_policy()

    def _forward_policy(self) -> str:
        """The IPv4 filter FORWARD policy now (ACCEPT when the table does not exist)."""
        found = _FORWARD_POLICY.search(self._save_text("-t", "filter"))
        return found.group(1) if found else "ACCEPT"

    def _forward_policy_plan(self, dropping: bool) -> tuple[str, str | None, str | None]:
        """(the FORWARD policy now, the one to set or None, ``forward_policy_before`` after)."""
        current = self._forward_policy()
        if dropping:
            before = self.forward_policy_before or current
            return current, ("DROP" if current != "DROP" else None), before
        recorded = self.forward_policy_before
        return current, (recorded if recorded and recorded != current else None), None

    def _change_with_policy(
        self, change: Callable[[_Tools], Ruleset | None], current: str, policy: str | None
    ) -> None:
        """``_both(change)``; when the IPv6 part fails after IPv4 set ``policy``, the IPv4
        snapshot restore puts our chains back and this puts the policy back."""
        try:
            self._both(change)
        except BaseException:
            if policy is not None and self._forward_policy() != current:
                lines = ["*filter", f":FORWARD {current} [0:0]", "COMMIT"]
                self._command([self._v4.restore, "-w", "--noflush"], "\n".join(lines) + "\n")
            raise

    def add_mappings(self, mappings: Sequence[PortMapping]) -> None:
        for m in mappings:
            check_mapping(m)
        if mappings:
            self._both(lambda tools: self._add_family(tools, mappings))

    def remove_mappings(self, mappings: Sequence[PortMapping]) -> None:
        for m in mappings:
            check_mapping(m)
        if mappings:
            self._both(lambda tools: self._remove_family(tools, mappings))

    def mappings(self) -> list[PortMapping]:
        result: list[PortMapping] = []
        for tools in self._families():
            state = self._parse(self._save_text("-t", "nat", tools=tools))
            dnat = self._require_installed(state)
            result += [m for spec in dnat if (m := mapping_from_spec(spec)) is not None]
        return result

    def uninstall(self) -> None:
        current, policy, _before = self._forward_policy_plan(False)

        def uninstall_family(tools: _Tools) -> Ruleset:
            snapshot = self._read(tools)
            sections = {t: self._converge(t, snapshot[t], TableState()) for t in TABLES}
            if tools.family == 4:
                with_forward_policy(sections, policy)
            self._apply(sections, snapshot, tools)
            return snapshot

        self._change_with_policy(uninstall_family, current, policy)
        self.forward_policy_before = None

    def installed(self) -> bool:
        return any(
            not state.empty() for tools in self._families() for state in self._read(tools).values()
        )

    def describe(self) -> str:
        """Our chains and jumps per table and family, with [packets:bytes] counters."""
        parts = []
        for tools in self._families():
            text = self._describe_family(tools)
            if text:
                parts.append(f"# {tools.save}\n{text}" if tools.family == 6 else text)
        return "".join(parts)

    def _describe_family(self, tools: _Tools) -> str:
        text = self._save_text("-c", tools=tools)
        return owned_lines(text, self._parse(text))
