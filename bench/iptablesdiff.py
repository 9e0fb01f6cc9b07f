"""What dockerd added to the host's iptables, and the exact removal of it.

``dockerd --iptables=true`` creates the chains DOCKER, DOCKER-USER and DOCKER-ISOLATION-STAGE-1/2
(filter) and DOCKER (nat), jumps to them from the built-in chains, and adds rules naming its
bridge (FORWARD accepts, POSTROUTING masquerade). It leaves all of it behind when it stops.

The removal works from a snapshot taken before dockerd started (``iptables-save`` text): a rule
is removed only if it is new since the snapshot (counted as a multiset, so a rule that was
there before is never touched, even when an identical one was added) *and* it is Docker's:
in a new DOCKER* chain, or in a built-in chain (dockerd adds to no other) and jumping to a
DOCKER* chain or naming dockerd's bridge or an address inside its subnet (the per-container
hairpin ``-s C/32 -d C/32 ... -j MASQUERADE`` in POSTROUTING names no chain and no bridge,
and a killed dockerd leaves it too). Other programs changing iptables meanwhile (the machine
is shared) keep their rules. Chains are removed only if they are DOCKER* chains that did not
exist before. Tables themselves are never removed, and no table is ever restored from a
snapshot.
"""

from __future__ import annotations

import shlex
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import ip_network

TIMEOUT_SECONDS = 120
# IPv4 and IPv6: (save, restore) programs of the variant on PATH (iptables-nft on Debian 12).
PROGRAMS: dict[int, tuple[str, str]] = {
    4: ("iptables-save", "iptables-restore"),
    6: ("ip6tables-save", "ip6tables-restore"),
}


class IptablesError(Exception):
    pass


def is_docker_chain(name: str) -> bool:
    return name == "DOCKER" or name.startswith("DOCKER-")


@dataclass(frozen=True)
class Ruleset:
    """One family's ``iptables-save`` output: per table, its user-defined chains and its
    ``-A`` lines in order (built-in chains are those with a policy other than ``-``)."""

    family: int
    chains: dict[str, list[str]] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def docker_chains(self) -> list[str]:
        """``table/chain`` of every DOCKER* chain."""
        return [
            f"{table}/{chain}"
            for table, chains in self.chains.items()
            for chain in chains
            if is_docker_chain(chain)
        ]


def parse_save(text: str, family: int) -> Ruleset:
    ruleset = Ruleset(family)
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            ruleset.chains.setdefault(table, [])
            ruleset.rules.setdefault(table, [])
        elif line.startswith(":") and table:
            name, policy = line[1:].split()[:2]
            if policy == "-":
                ruleset.chains[table].append(name)
        elif line.startswith("-A ") and table:
            ruleset.rules[table].append(line.strip())
    return ruleset


def save_text(family: int) -> str:
    """The current ``iptables-save`` (or ``ip6tables-save``) output."""
    program = PROGRAMS[family][0]
    result = subprocess.run([program], capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    if result.returncode != 0:
        raise IptablesError(f"{program}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def current(family: int) -> Ruleset:
    return parse_save(save_text(family), family)


@dataclass(frozen=True)
class RuleFacts:
    chain: str
    target: str  # after -j / -g, "" when none
    interfaces: tuple[str, ...]  # after -i / -o
    addresses: tuple[str, ...]  # after -s / -d


def rule_facts(line: str) -> RuleFacts:
    """The parts of an ``-A CHAIN ...`` line that say whose rule it is."""
    tokens = shlex.split(line)
    target, interfaces, addresses = "", [], []
    for option, value in zip(tokens, tokens[1:], strict=False):
        if option in ("-j", "--jump", "-g", "--goto"):
            target = value
        elif option in ("-i", "--in-interface", "-o", "--out-interface"):
            interfaces.append(value)
        elif option in ("-s", "--source", "-d", "--destination"):
            addresses.append(value)
    return RuleFacts(tokens[1], target, tuple(interfaces), tuple(addresses))


@dataclass
class TableAdditions:
    rules: list[str] = field(default_factory=list)  # outside Docker's chains: deleted one by one
    chain_rules: list[str] = field(default_factory=list)  # inside them: go with the flush
    chains: list[str] = field(default_factory=list)  # new DOCKER* chains: flushed, deleted


@dataclass
class DockerAdditions:
    family: int
    tables: dict[str, TableAdditions] = field(default_factory=dict)

    @property
    def rule_count(self) -> int:
        return sum(len(t.rules) + len(t.chain_rules) for t in self.tables.values())

    @property
    def empty(self) -> bool:
        return not any(t.rules or t.chains for t in self.tables.values())

    def describe(self) -> str:
        parts = []
        for table, t in self.tables.items():
            if t.rules or t.chains:
                parts.append(f"{table}: {len(t.rules)} rules, chains {', '.join(t.chains) or '-'}")
        return f"IPv{self.family} " + ("; ".join(parts) or "nothing")


def _inside(address: str, subnets: tuple[str, ...]) -> bool:
    try:
        net = ip_network(address, strict=False)
        within = [ip_network(s, strict=False) for s in subnets]
    except ValueError:
        return False
    return any(net.version == s.version and net.subnet_of(s) for s in within)  # type: ignore[arg-type]  # same version


def docker_additions(
    before: Ruleset, after: Ruleset, bridge: str, subnets: tuple[str, ...] = ()
) -> DockerAdditions:
    """What dockerd (bridge ``bridge``, addresses inside ``subnets``) added between the two
    rulesets."""
    additions = DockerAdditions(after.family)
    for table, rules in after.rules.items():
        old_chains = set(before.chains.get(table, []))
        new_docker = [
            c for c in after.chains.get(table, []) if is_docker_chain(c) and c not in old_chains
        ]
        user_chains = set(after.chains.get(table, []))
        there_before = Counter(before.rules.get(table, []))
        found = TableAdditions(chains=new_docker)
        for line in rules:
            if there_before[line] > 0:
                there_before[line] -= 1  # the same rule existed before: never touched
                continue
            facts = rule_facts(line)
            if facts.chain in new_docker:
                found.chain_rules.append(line)
            elif facts.chain in user_chains:
                continue  # dockerd adds rules only to built-in chains and to its own
            elif (
                is_docker_chain(facts.target)
                or bridge in facts.interfaces
                or any(_inside(a, subnets) for a in facts.addresses)
            ):
                found.rules.append(line)
        if found.rules or found.chains:
            additions.tables[table] = found
    return additions


def removal_batch(additions: DockerAdditions) -> str:
    """``iptables-restore --noflush`` input: per table (one transaction each, see
    iptables-restore(8)) delete the rules, then flush every new chain, then delete them (the
    chains jump to one another, so all are emptied before any is deleted)."""
    out: list[str] = []
    for table, t in additions.tables.items():
        out.append(f"*{table}")
        out += ["-D" + line[2:] for line in t.rules]
        out += [f"-F {chain}" for chain in t.chains]
        out += [f"-X {chain}" for chain in t.chains]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def remove_docker_additions(
    before: Ruleset, bridge: str, subnets: tuple[str, ...] = (), attempts: int = 3
) -> DockerAdditions:
    """Remove what dockerd added since ``before``; returns what was removed. The ruleset is read
    again right before each attempt, so a concurrent change by another program only costs a
    retry and never makes this delete something that is not Docker's."""
    restore = PROGRAMS[before.family][1]
    removed = DockerAdditions(before.family)
    error = ""
    for _ in range(attempts):
        additions = docker_additions(before, current(before.family), bridge, subnets)
        if additions.empty:
            return removed
        result = subprocess.run(
            [restore, "-w", "--noflush"],
            input=removal_batch(additions),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
        if result.returncode == 0:
            return additions
        error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
    raise IptablesError(f"{restore}: could not remove dockerd's rules: {error}")
