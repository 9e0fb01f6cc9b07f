"""netd's persisted state: networks (with their address allocations), sandboxes (a container's
namespace), endpoints (a container on a network) and published ports, in one JSON file.

One file, written atomically after every step that changes it, means no crash can leave two
halves of the state disagreeing; records carry a lifecycle mark (``network.CREATING`` /
``READY`` / ``REMOVING``) written *before* the kernel is touched, so the next ``setup()`` knows
what a crash may have left half-done. The file is still called ``endpoints.json`` (the first
slice's name; tools read ``endpoints[*].host_veth`` and ``netns_name`` from it to sweep).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from common.jsonstate import read_json, write_json_atomic
from common.ports import PortMapping
from netd.errors import NetdError
from netd.ipam import Ipam
from netd.network import READY, Network
from netd.portmap import is_ipv6

STATE_VERSION = 2


@dataclass
class Sandbox:
    """A container's network namespace: made with its first endpoint, kept (with only ``lo``)
    when its last endpoint is disconnected, removed with the container."""

    container_id: str
    netns_name: str
    netns_path: str
    state: str = READY


@dataclass
class Endpoint:
    container_id: str
    netns_name: str
    netns_path: str
    host_veth: str
    ip: str
    prefixlen: int
    gateway: str
    mac: str
    network_id: str = ""
    network_name: str = ""
    ifname: str = "eth0"  # inside the namespace
    aliases: list[str] = field(default_factory=list)
    id: str = ""  # 64 hex, Docker's EndpointID
    state: str = READY
    # On a network with IPv6 (--ipv6): the container's IPv6 address; "" otherwise.
    ipv6: str = ""
    ipv6_prefixlen: int = 0
    ipv6_gateway: str = ""

    @property
    def key(self) -> str:
        return endpoint_key(self.container_id, self.network_id)

    @property
    def index(self) -> int:
        """N of ``eth<N>``."""
        return int(self.ifname.removeprefix("eth"))


def endpoint_key(container_id: str, network_id: str) -> str:
    return f"{container_id}/{network_id}"


@dataclass
class PublishedPort:
    proto: str
    host_ip: str  # "0.0.0.0" / "::" = every local IPv4 / IPv6 address
    host_port: int
    container_ip: str
    container_port: int
    network_id: str = ""  # the network whose endpoint address the port is DNATed to
    # Served by the userland proxy alone, not DNATed: a port in transparent proxy mode, whose
    # proxy connects from the client's address (netd/returnpath.py steers the replies back).
    proxy_only: bool = False
    # The socket reserving the host port; never persisted. With the userland proxy the daemon
    # hands a dup of it to pyengine-proxy (-use-listen-fd); netd closes its copy on unpublish.
    sock: socket.socket | None = field(default=None, compare=False, repr=False)

    @property
    def in_firewall(self) -> bool:
        """Whether the firewall maps this port: when the host and container addresses are of
        one family. A port on an IPv6 host address of a container without an IPv6 address is
        the userland proxy's alone (nothing NATs IPv6 to IPv4); so is one on ``::1`` (the
        kernel does not DNAT a loopback source off the host)."""
        if self.host_ip == "::1" or self.proxy_only:
            return False
        return is_ipv6(self.host_ip) == is_ipv6(self.container_ip)

    def mapping(self) -> PortMapping:
        return PortMapping(
            self.proto, self.host_ip, self.host_port, self.container_ip, self.container_port
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "proto": self.proto,
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "container_ip": self.container_ip,
            "container_port": self.container_port,
            "network_id": self.network_id,
            **({"proxy_only": True} if self.proxy_only else {}),
        }


def firewall_mappings(ports: Iterable[PublishedPort]) -> list[PortMapping]:
    """What the firewall is given for ``ports``: only the ones ``in_firewall``."""
    return [p.mapping() for p in ports if p.in_firewall]


def close_ports(ports: list[PublishedPort]) -> None:
    for port in ports:
        if port.sock is not None:
            port.sock.close()
            port.sock = None


def ipam_for(network: Network) -> Ipam:
    return Ipam(
        IPv4Network(network.subnet),
        IPv4Address(network.gateway),
        IPv4Network(network.ip_range) if network.ip_range else None,
    )


def ipam6_for(network: Network) -> Ipam | None:
    if not network.subnet6:
        return None
    return Ipam(IPv6Network(network.subnet6), IPv6Address(network.gateway6))


@dataclass
class NetdState:
    networks: dict[str, Network] = field(default_factory=dict)  # by id, in creation order
    ipams: dict[str, Ipam] = field(default_factory=dict)  # by network id
    ipams6: dict[str, Ipam] = field(default_factory=dict)  # by network id, IPv6 networks only
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)  # by container id
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # by endpoint_key()
    ports: dict[str, list[PublishedPort]] = field(default_factory=dict)  # by container id

    def add_network(self, network: Network) -> None:
        self.networks[network.id] = network
        self.ipams[network.id] = ipam_for(network)
        ipam6 = ipam6_for(network)
        if ipam6 is not None:
            self.ipams6[network.id] = ipam6

    def drop_network(self, network_id: str) -> None:
        self.networks.pop(network_id, None)
        self.ipams.pop(network_id, None)
        self.ipams6.pop(network_id, None)

    def release_addresses(self, ep: Endpoint) -> None:
        """Give the endpoint's addresses (both families) back to its network's IPAMs."""
        ipam = self.ipams.get(ep.network_id)
        if ipam is not None:
            ipam.release(ep.ip)
        ipam6 = self.ipams6.get(ep.network_id)
        if ipam6 is not None and ep.ipv6:
            ipam6.release(ep.ipv6)

    def container_endpoints(self, container_id: str) -> list[Endpoint]:
        """The container's endpoints, ``eth0`` first."""
        found = [ep for ep in self.endpoints.values() if ep.container_id == container_id]
        return sorted(found, key=lambda ep: ep.index)

    def network_endpoints(self, network_id: str) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.network_id == network_id]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "networks": {
                nid: {
                    **net.to_json(),
                    "ipam": self.ipams[nid].to_json(),
                    **({"ipam6": self.ipams6[nid].to_json()} if nid in self.ipams6 else {}),
                }
                for nid, net in self.networks.items()
            },
            "sandboxes": {cid: asdict(sb) for cid, sb in self.sandboxes.items()},
            "endpoints": {key: asdict(ep) for key, ep in self.endpoints.items()},
            "ports": {
                cid: [p.to_json() for p in ports] for cid, ports in self.ports.items() if ports
            },
        }

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path, default: Network, legacy_ipam: Path) -> NetdState:
        """The state in ``path``; a first-slice file (one default network, addresses in
        ``legacy_ipam``) is read as endpoints on ``default``."""
        data = read_json(path, None) or {}
        state = cls()
        version = data.get("version", 1 if data else STATE_VERSION)
        if version == 1:
            return cls._load_first_slice(data, default, legacy_ipam)
        if version != STATE_VERSION:
            raise NetdError(f"{path}: unknown state version {version!r}")
        for nid, raw in data.get("networks", {}).items():
            raw = dict(raw)
            ipam_data = raw.pop("ipam", {})
            ipam6_data = raw.pop("ipam6", {})
            network = Network.from_json(raw)
            state.add_network(network)
            state.ipams[nid].load_json(ipam_data)
            if nid in state.ipams6:
                state.ipams6[nid].load_json(ipam6_data)
        # The file's keys are sorted: restore creation order, the default network first.
        state.networks = dict(
            sorted(state.networks.items(), key=lambda kv: (not kv[1].default, kv[1].created))
        )
        for cid, raw in data.get("sandboxes", {}).items():
            state.sandboxes[cid] = Sandbox(**raw)
        for key, raw in data.get("endpoints", {}).items():
            state.endpoints[key] = Endpoint(**raw)
        for cid, raws in data.get("ports", {}).items():
            state.ports[cid] = [PublishedPort(**raw) for raw in raws]
        return state

    @classmethod
    def _load_first_slice(cls, data: dict[str, Any], default: Network, ipam: Path) -> NetdState:
        state = cls()
        network = Network.from_json(default.to_json())
        state.add_network(network)
        old_ipam = read_json(ipam, None) or {}
        if old_ipam.get("subnet") == network.subnet:
            state.ipams[network.id].load_json(old_ipam)
        for cid, raw in data.get("endpoints", {}).items():
            ep = Endpoint(**raw, network_id=network.id, network_name=network.name)
            state.endpoints[ep.key] = ep
            state.sandboxes[cid] = Sandbox(cid, ep.netns_name, ep.netns_path)
            state.ipams[network.id].claim(ep.ip, cid)
        for cid, raws in data.get("ports", {}).items():
            state.ports[cid] = [PublishedPort(**raw, network_id=network.id) for raw in raws]
        return state
