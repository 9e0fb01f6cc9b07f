"""What the lab is: the options ``up`` is asked for, the plan made of them (names, addresses,
daemons), and the state file that records it (``<dir>/lab.json``)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.jsonstate import read_json, write_json_atomic
from netd.firewall import BACKENDS

BIN = Path(sys.executable).parent
DEFAULT_DIR = Path("/var/lib/pyengine-lab")
STATE_FILE = "lab.json"

# "pyelab" plus up to three letters or digits: the longest name made from it,
# "<prefix>-proxy", must fit IFNAMSIZ - 1 = 15 characters (<linux/if.h>).
_PREFIX = re.compile(r"^pyelab[a-z0-9]{0,3}$")
ROLES = ("proxy", "dnat")


class LabError(Exception):
    """The lab could not do what was asked; the message says why in one line."""


@dataclass(frozen=True)
class ClientLink:
    """The client namespace and the veth pair that joins it to the engine host."""

    netns: str
    host_if: str  # the host's end
    subnet: str
    host_ip: str  # the engine host's address on the link: what the client connects to
    client_ip: str
    ifname: str = "eth0"  # the client's end, inside the namespace

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen


@dataclass
class LabDaemon:
    """One pyengined of the lab, under the lab's directory and names."""

    role: str  # "proxy" | "dnat"
    userland_proxy: bool
    bridge: str
    bip: str  # gateway address / prefix length
    table: str  # nftables table, or prefix of the iptables chains
    port: int  # the host port the exercises publish nginx's port 80 on
    root: str  # directory holding data/, <role>.sock and <role>.log
    pid: int = 0

    @property
    def socket_path(self) -> Path:
        return Path(self.root) / f"{self.role}.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def data_root(self) -> Path:
        return Path(self.root) / "data"

    @property
    def log_path(self) -> Path:
        return Path(self.root) / f"{self.role}.log"

    @property
    def gateway(self) -> str:
        return str(ipaddress.IPv4Interface(self.bip).ip)

    @property
    def subnet(self) -> str:
        return str(ipaddress.IPv4Interface(self.bip).network)

    @property
    def mode(self) -> str:
        return "userland proxy" if self.userland_proxy else "kernel DNAT"

    @property
    def flag(self) -> str:
        return f"--userland-proxy={'true' if self.userland_proxy else 'false'}"

    def pyengine(self) -> list[str]:
        return [str(BIN / "pyengine"), "-H", self.host]


@dataclass
class LabState:
    """Everything ``up`` made, persisted as <dir>/lab.json before the kernel is touched."""

    prefix: str
    directory: str
    firewall_backend: str
    client: ClientLink | None
    daemons: list[LabDaemon] = field(default_factory=list)
    ready: bool = False  # False while ``up`` runs (``down`` then cleans up what exists)

    def daemon(self, role: str) -> LabDaemon:
        for d in self.daemons:
            if d.role == role:
                return d
        raise LabError(f"the lab has no {role} daemon")

    def save(self) -> None:
        write_json_atomic(Path(self.directory) / STATE_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: Path) -> LabState:
        raw = read_json(directory / STATE_FILE, None)
        if raw is None:
            raise LabError(f"no lab is up in {directory} (python -m lab up)")
        try:
            client = ClientLink(**raw["client"]) if raw.get("client") else None
            daemons = [LabDaemon(**d) for d in raw["daemons"]]
            return cls(
                prefix=raw["prefix"],
                directory=raw["directory"],
                firewall_backend=raw["firewall_backend"],
                client=client,
                daemons=daemons,
                ready=bool(raw.get("ready")),
            )
        except (KeyError, TypeError) as exc:
            raise LabError(f"{directory / STATE_FILE} is not a lab state file: {exc}") from None


@dataclass(frozen=True)
class LabOptions:
    """What ``up`` is asked for (the defaults are the names docs/lab.md shows)."""

    directory: Path = DEFAULT_DIR
    prefix: str = "pyelab"
    client_subnet: str = "198.18.200.0/24"
    proxy_bip: str = "10.201.0.1/24"
    dnat_bip: str = "10.201.1.1/24"
    proxy_port: int = 8081
    dnat_port: int = 8082
    firewall_backend: str = "nftables"
    with_client: bool = True


def plan(options: LabOptions) -> LabState:
    """The lab ``options`` describe, checked for consistency (nothing is touched)."""
    if not _PREFIX.fullmatch(options.prefix):
        raise LabError(f'invalid prefix "{options.prefix}" (pyelab, then at most 3 of a-z0-9)')
    if options.firewall_backend not in BACKENDS:
        raise LabError(f'unknown firewall backend "{options.firewall_backend}"')
    if options.proxy_port == options.dnat_port:
        raise LabError("the two daemons need different host ports")
    client = None
    if options.with_client:
        try:
            subnet = ipaddress.IPv4Network(options.client_subnet)
        except ValueError as exc:
            raise LabError(f"invalid client subnet: {exc}") from None
        if subnet.prefixlen > 30:
            raise LabError(f"client subnet {subnet} is too small (a /30 or larger)")
        host_ip, client_ip = (str(a) for a in list(subnet.hosts())[:2])
        client = ClientLink(
            netns=f"{options.prefix}-client",
            host_if=f"{options.prefix}-veth",
            subnet=str(subnet),
            host_ip=host_ip,
            client_ip=client_ip,
        )
    directory = options.directory.resolve()
    daemons = []
    for role, bip, port in (
        ("proxy", options.proxy_bip, options.proxy_port),
        ("dnat", options.dnat_bip, options.dnat_port),
    ):
        try:
            iface = ipaddress.IPv4Interface(bip)
        except ValueError as exc:
            raise LabError(f"invalid --{role}-bip: {exc}") from None
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise LabError(f"--{role}-bip {bip} must be a host address of its subnet")
        daemons.append(
            LabDaemon(
                role=role,
                userland_proxy=role == "proxy",
                bridge=f"{options.prefix}-{role}",
                bip=bip,
                table=f"{options.prefix}_{role}",
                port=port,
                root=str(directory / role),
            )
        )
    return LabState(options.prefix, str(directory), options.firewall_backend, client, daemons)
