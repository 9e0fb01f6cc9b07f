"""The run's names and addresses, and the external client host.

Every kernel object the run creates carries ``pyebench`` and a short run id, so two runs (or a
leftover of a killed one) never collide. The engine host is the machine itself (pyengined runs
in the initial namespace, as in production); the external client is a network namespace joined
to it by a veth pair, standing in for a machine on the LAN.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network

# Candidate subnets, checked against the host's routes at start. 198.18.0.0/15 is the range
# RFC 2544 reserves for benchmarking; 192.0.2.0/24 is the host's own network and never used.
BRIDGE_CANDIDATES = tuple(IPv4Network(f"10.{a}.{b}.0/24") for a in (93, 94, 95) for b in range(256))
EXTERNAL_CANDIDATES = tuple(
    IPv4Network(f"198.19.{c}.{d}/30") for c in (213, 214) for d in range(0, 256, 4)
)


class TopologyError(Exception):
    pass


def sh(*argv: str, timeout: float = 30) -> str:
    """Run an ``ip``/``nft`` command; raise TopologyError with its stderr on failure."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


@dataclass(frozen=True)
class RunNames:
    """Names of everything the run creates (interface names stay within IFNAMSIZ - 1 = 15)."""

    run_id: str  # 4 hex digits

    @classmethod
    def fresh(cls) -> RunNames:
        return cls(secrets.token_hex(2))

    @property
    def prefix(self) -> str:
        return f"pyebench{self.run_id}"

    def daemon(self, role: str) -> str:
        """Bridge and nftables table of one pyengined: ``pyebench1a2bp`` (13 characters)."""
        return f"{self.prefix}{role}"

    def docker_bridge(self, role: str) -> str:
        """Bridge (and cgroup parent) of one bench dockerd: ``pyebd1a2bd`` (10 characters)."""
        return f"pyebd{self.run_id}{role}"

    @property
    def external_netns(self) -> str:
        return f"pyebench-{self.run_id}-ext"

    @property
    def external_host_if(self) -> str:
        return f"{self.prefix}x"


def _used_networks() -> list[IPv4Network]:
    """Every IPv4 route and address of the host (what a new subnet must not overlap)."""
    used: list[IPv4Network] = []
    for route in json.loads(sh("ip", "-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        if not dst or dst == "default":
            continue
        try:
            used.append(IPv4Network(dst, strict=False))
        except ValueError:
            continue
    for link in json.loads(sh("ip", "-j", "-4", "addr") or "[]"):
        for addr in link.get("addr_info", []):
            used.append(IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return used


def choose_subnets(count: int, candidates: tuple[IPv4Network, ...]) -> list[IPv4Network]:
    """``count`` candidates that overlap no route or address of the host."""
    used = _used_networks()
    chosen: list[IPv4Network] = []
    for net in candidates:
        if any(net.overlaps(u) for u in used) or any(net.overlaps(c) for c in chosen):
            continue
        chosen.append(net)
        if len(chosen) == count:
            return chosen
    raise TopologyError(f"no {count} free subnets among the candidates {candidates[0]}...")


@dataclass(frozen=True)
class ExternalClient:
    netns: str
    host_if: str
    host_ip: str  # the engine host's address on the veth: what external clients connect to
    client_ip: str


def create_external_client(names: RunNames, subnet: IPv4Network) -> ExternalClient:
    """The client namespace with ``eth0`` (second address of ``subnet``) and the host end of
    the veth (first address). Rolls back what it made when a step fails."""
    host_ip, client_ip = (str(a) for a in list(subnet.hosts())[:2])
    ext = ExternalClient(names.external_netns, names.external_host_if, host_ip, client_ip)
    sh("ip", "netns", "add", ext.netns)
    try:
        veth = ("type", "veth", "peer", "name", "eth0", "netns", ext.netns)
        sh("ip", "link", "add", ext.host_if, *veth)
        sh("ip", "addr", "add", f"{host_ip}/{subnet.prefixlen}", "dev", ext.host_if)
        sh("ip", "link", "set", ext.host_if, "up")
        inside = ("ip", "-n", ext.netns)
        sh(*inside, "link", "set", "lo", "up")
        sh(*inside, "addr", "add", f"{client_ip}/{subnet.prefixlen}", "dev", "eth0")
        sh(*inside, "link", "set", "eth0", "up")
    except BaseException:
        delete_external_client(ext)
        raise
    return ext


def delete_external_client(ext: ExternalClient) -> None:
    """Idempotent: deleting the namespace also deletes the veth's inner end and so the pair."""
    subprocess.run(["ip", "link", "del", ext.host_if], capture_output=True, timeout=30)
    subprocess.run(["ip", "netns", "del", ext.netns], capture_output=True, timeout=30)


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` run inside ``netns`` (None: in the host's namespace)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def leftovers(names: RunNames) -> list[str]:
    """Links, namespaces and nftables tables carrying this run's names (expected: none)."""
    found: list[str] = []
    for link in json.loads(sh("ip", "-j", "link") or "[]"):
        if link.get("ifname", "").startswith((names.prefix, names.docker_bridge(""))):
            found.append(f"link {link['ifname']}")
    for ns in json.loads(sh("ip", "-j", "netns", "list") or "[]"):
        if ns.get("name", "").startswith(f"pyebench-{names.run_id}"):
            found.append(f"netns {ns['name']}")
    for line in sh("nft", "list", "tables").splitlines():
        if names.prefix in line:
            found.append(line.strip())
    return found
