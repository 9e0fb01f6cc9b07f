"""The facade the daemon uses: the default bridge network, container endpoints, published ports.

Order of operations when publishing follows Docker 28 (port reservation before NAT rules): bind
every host port first, then add every NAT mapping in one firewall transaction, so a failure at
either step leaves no rule and no socket behind, and no connection is accepted before its DNAT
rule exists.

The pyroute2 calls are synchronous and start their own event loop: from asyncio code, call the
controller in a worker thread (``asyncio.to_thread``). Methods are serialised by a lock.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from netd import bridge, conntrack, sandbox, sysctl
from netd.errors import NetdError
from netd.firewall import ANY_IPV4, BridgeNetwork, Firewall, PortMapping, make_firewall
from netd.ipam import Ipam
from netd.jsonstate import read_json, write_json_atomic
from netd.naming import host_veth_name, mac_for_ip, netns_name, valid_ifname
from netd.portmap import PortReservation, detach_drop_filter, reserve_host_port
from netd.portspec import PROTOCOLS, PortBinding

__all__ = [
    "Endpoint",
    "NetdConfig",
    "NetdError",
    "NetworkController",
    "PublishedPort",
]

log = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Files under <data_root>/network (netd/__main__.py reads them too).
STATE_DIR = "network"
ENDPOINTS_FILE = "endpoints.json"  # endpoints and published ports, by container id
NETWORK_FILE = "network.json"  # the bridge and the firewall it was set up with
IPAM_FILE = "ipam.json"


@dataclass
class NetdConfig:
    data_root: Path  # netd keeps its JSON state under data_root / "network"
    bridge: str = "pyengine0"
    bridge_cidr: str = "10.47.0.1/16"  # gateway address/prefix of the default bridge
    # nftables: the table pyengine owns (family inet); iptables: the prefix of its chains
    table: str = "pyengine"
    userland_proxy: bool = True
    firewall_backend: str = "nftables"
    netns_prefix: str = "pyengine-"  # namespaces are /run/netns/<prefix><first 12 of id>


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


@dataclass
class PublishedPort:
    proto: str
    host_ip: str  # "0.0.0.0" = every local IPv4 address
    host_port: int
    container_ip: str
    container_port: int
    # The socket reserving the host port; never persisted. With the userland proxy the daemon
    # hands a dup of it to pyengine-proxy (-use-listen-fd); netd closes its copy on unpublish.
    sock: socket.socket | None = field(default=None, compare=False, repr=False)

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
        }


def _close(ports: list[PublishedPort]) -> None:
    for port in ports:
        if port.sock is not None:
            port.sock.close()
            port.sock = None


def _normalise_host_ip(host_ip: str) -> str:
    if host_ip in ("", ANY_IPV4):
        return ANY_IPV4
    try:
        addr = ipaddress.ip_address(host_ip)
    except ValueError:
        raise NetdError(f'invalid host IP "{host_ip}"') from None
    if addr.version == 6:
        raise NetdError(f'cannot publish on IPv6 address "{host_ip}": IPv6 is not supported yet')
    return str(addr)


class NetworkController:
    def __init__(self, cfg: NetdConfig) -> None:
        if not valid_ifname(cfg.bridge):
            raise NetdError(f'invalid bridge name "{cfg.bridge}"')
        try:
            self._gateway = IPv4Interface(cfg.bridge_cidr)
        except ValueError:
            raise NetdError(f'invalid bridge_cidr "{cfg.bridge_cidr}"') from None
        if self._gateway.network.prefixlen > 30 or self._gateway.ip in (
            self._gateway.network.network_address,
            self._gateway.network.broadcast_address,
        ):
            raise NetdError(
                f'bridge_cidr "{cfg.bridge_cidr}" must be a host address in a /30 or larger'
            )
        self.cfg = cfg
        self._state_dir = cfg.data_root / STATE_DIR
        self._state_file = self._state_dir / ENDPOINTS_FILE
        self._network_file = self._state_dir / NETWORK_FILE
        self._lock = threading.RLock()
        self._firewall: Firewall = make_firewall(
            cfg.firewall_backend, cfg.table, cfg.userland_proxy
        )
        self._ipam = Ipam.load(self._state_dir / IPAM_FILE, self._gateway.network, self._gateway.ip)
        self._endpoints: dict[str, Endpoint] = {}
        self._ports: dict[str, list[PublishedPort]] = {}
        self._load_state()
        self._ready = False

    # -- persisted state --------------------------------------------------------------------

    def _load_state(self) -> None:
        data = read_json(self._state_file, {}) or {}
        for cid, raw in data.get("endpoints", {}).items():
            self._endpoints[cid] = Endpoint(**raw)
        for cid, raws in data.get("ports", {}).items():
            self._ports[cid] = [PublishedPort(**raw) for raw in raws]

    def _save_state(self) -> None:
        write_json_atomic(
            self._state_file,
            {
                "endpoints": {cid: asdict(ep) for cid, ep in self._endpoints.items()},
                "ports": {
                    cid: [p.to_json() for p in ports] for cid, ports in self._ports.items() if ports
                },
            },
        )

    def _save_network(self) -> None:
        write_json_atomic(
            self._network_file,
            {
                "bridge": self.cfg.bridge,
                "subnet": str(self._gateway.network),
                "gateway": str(self._gateway.ip),
                "firewall_backend": self.cfg.firewall_backend,
                "table": self.cfg.table,
                "userland_proxy": self.cfg.userland_proxy,
            },
        )

    def _remove_previous_firewall(self) -> None:
        """A daemon started before with another backend or table left its rules behind."""
        previous = read_json(self._network_file, None) or {}
        backend, table = previous.get("firewall_backend"), previous.get("table")
        current = (self.cfg.firewall_backend, self.cfg.table)
        if not backend or not table or (backend, table) == current:
            return
        log.info("removing the rules of the previous firewall (%s, table %s)", backend, table)
        try:
            make_firewall(backend, table, bool(previous.get("userland_proxy"))).uninstall()
        except NetdError as exc:
            log.warning("cannot remove the previous %s rules of %s: %s", backend, table, exc)

    def _network(self) -> BridgeNetwork:
        return BridgeNetwork(self.cfg.bridge, self._gateway.network, self._gateway.ip)

    def _all_mappings(self) -> list[PortMapping]:
        return [p.mapping() for ports in self._ports.values() for p in ports]

    # -- setup / teardown -------------------------------------------------------------------

    def setup(self) -> None:
        """Bring up the bridge, sysctls and a fresh firewall table. Idempotent.

        Endpoints persisted by a previous daemon are kept when their namespace and veth still
        exist (otherwise their leftovers are removed), and their published ports are reserved
        and mapped again.
        """
        with self._lock:
            sysctl.enable_ip_forward()
            bridge.ensure_bridge(self.cfg.bridge, self._gateway)
            # DNAT of 127.0.0.0/8 traffic to the bridge needs it (Docker's
            # setupLoopbackAddressesRouting); off again when the proxy handles loopback.
            sysctl.set_route_localnet(self.cfg.bridge, not self.cfg.userland_proxy)
            self._restore_endpoints()
            fresh = self._restore_port_reservations()
            try:
                self._remove_previous_firewall()
                self._firewall.install([self._network()], self._all_mappings())
            except BaseException:
                _close(fresh)
                raise
            self._save_network()
            self._save_state()
            self._ready = True

    def _restore_endpoints(self) -> None:
        for cid, ep in list(self._endpoints.items()):
            if sandbox.netns_exists(ep.netns_name) and sandbox.link_exists(ep.host_veth):
                sandbox.plug_into_bridge(ep.host_veth, self.cfg.bridge, self._hairpin)
                continue
            log.warning("endpoint of %s is gone; removing its leftovers", cid[:12])
            self._remove_endpoint_objects(ep)
            self._endpoints.pop(cid)
            _close(self._ports.pop(cid, []))
        for owner in self._ipam.owners() - set(self._endpoints):
            # An endpoint creation interrupted after its address was allocated.
            self._remove_endpoint_objects(self._names_for(owner))
            self._ipam.release_owner(owner)

    def _restore_port_reservations(self) -> list[PublishedPort]:
        """Re-bind the host ports of persisted mappings that hold no socket in this process."""
        fresh: list[PublishedPort] = []
        for cid, ports in self._ports.items():
            for port in list(ports):
                if port.sock is not None:
                    continue
                try:
                    res = reserve_host_port(
                        port.proto,
                        port.host_ip,
                        port.host_port,
                        0,
                        lambda proto, ip, n, skip=port: self._is_taken(proto, ip, n, skip),
                    )
                except NetdError as exc:
                    log.warning("dropping mapping of %s: %s", cid[:12], exc)
                    ports.remove(port)
                    continue
                port.sock = res.sock
                self._after_reserve(port)
                fresh.append(port)
        return fresh

    def teardown(self) -> None:
        """Remove everything netd made: endpoints, mappings, the table, the bridge, the state."""
        with self._lock:
            for cid in list(self._endpoints):
                self.delete_endpoint(cid)
            for cid in list(self._ports):
                self.unpublish(cid)
            self._firewall.uninstall()
            bridge.delete_bridge(self.cfg.bridge)
            self._ipam.clear()
            self._state_file.unlink(missing_ok=True)
            self._network_file.unlink(missing_ok=True)
            try:
                self._state_dir.rmdir()
            except OSError:
                pass  # not empty: files that are not ours stay
            self._ready = False

    # -- endpoints --------------------------------------------------------------------------

    @property
    def _hairpin(self) -> bool:
        # Only DNAT mode sends a container's packets back out of its own bridge port (a
        # container reaching its own published port); the proxy connects from the host.
        return not self.cfg.userland_proxy

    def _names_for(self, container_id: str) -> Endpoint:
        ns = netns_name(self.cfg.netns_prefix, container_id)
        return Endpoint(
            container_id, ns, sandbox.netns_path(ns), host_veth_name(container_id), "", 0, "", ""
        )

    @staticmethod
    def _remove_endpoint_objects(ep: Endpoint) -> None:
        sandbox.delete_link(ep.host_veth)
        sandbox.delete_netns(ep.netns_name)

    def create_endpoint(self, container_id: str) -> Endpoint:
        """A namespace with ``eth0`` on the bridge, an address from IPAM, ``lo`` up and a
        default route via the gateway."""
        with self._lock:
            if not self._ready:
                raise NetdError("network controller is not set up (call setup() first)")
            if not _CONTAINER_ID.match(container_id):
                raise NetdError(f'invalid container id "{container_id}"')
            if container_id in self._endpoints:
                raise NetdError(f"container {container_id[:12]} already has an endpoint")
            names = self._names_for(container_id)
            for other in self._endpoints.values():
                if names.netns_name == other.netns_name or names.host_veth == other.host_veth:
                    raise NetdError(
                        f"container id {container_id[:12]} clashes with {other.container_id[:12]}"
                    )
            addr = self._ipam.allocate(container_id)
            ep = Endpoint(
                container_id=container_id,
                netns_name=names.netns_name,
                netns_path=names.netns_path,
                host_veth=names.host_veth,
                ip=str(addr),
                prefixlen=self._gateway.network.prefixlen,
                gateway=str(self._gateway.ip),
                mac=mac_for_ip(addr),
            )
            created_netns = False
            try:
                sandbox.create_netns(ep.netns_name)
                created_netns = True
                sandbox.connect_netns_to_bridge(
                    ep.netns_name,
                    ep.host_veth,
                    self.cfg.bridge,
                    IPv4Interface(f"{ep.ip}/{ep.prefixlen}"),
                    IPv4Address(ep.gateway),
                    ep.mac,
                    self._hairpin,
                )
                self._endpoints[container_id] = ep
                self._save_state()
            except BaseException:
                self._endpoints.pop(container_id, None)
                if created_netns:
                    sandbox.delete_link(ep.host_veth)
                    sandbox.delete_netns(ep.netns_name)
                self._ipam.release(ep.ip)
                raise
            return ep

    def delete_endpoint(self, container_id: str) -> None:
        """Unpublish, then remove the veth, the namespace and the address. Idempotent."""
        with self._lock:
            self.unpublish(container_id)
            ep = self._endpoints.get(container_id)
            if ep is None:
                return
            self._remove_endpoint_objects(ep)
            self._ipam.release(ep.ip)
            del self._endpoints[container_id]
            self._save_state()

    def endpoints(self) -> dict[str, Endpoint]:
        with self._lock:
            return dict(self._endpoints)

    # -- published ports --------------------------------------------------------------------

    def _is_taken(
        self, proto: str, host_ip: str, port: int, skip: PublishedPort | None = None
    ) -> bool:
        """Whether this engine already maps ``port`` on ``host_ip`` (or on every address)."""
        for ports in self._ports.values():
            for p in ports:
                if p is skip or p.proto != proto or p.host_port != port:
                    continue
                if p.host_ip == host_ip or ANY_IPV4 in (p.host_ip, host_ip):
                    return True
        return False

    def _after_reserve(self, port: PublishedPort) -> None:
        """With the proxy, UDP datagrams must now reach the socket the proxy will read."""
        if self.cfg.userland_proxy and port.proto == "udp" and port.sock is not None:
            detach_drop_filter(port.sock)

    def publish(
        self, container_id: str, endpoint: Endpoint, bindings: list[PortBinding]
    ) -> list[PublishedPort]:
        """Reserve every host port, then map them all in one firewall transaction."""
        with self._lock:
            if not self._ready:
                raise NetdError("network controller is not set up (call setup() first)")
            if self._endpoints.get(container_id) != endpoint:
                raise NetdError(f"container {container_id[:12]} has no such endpoint")
            for b in bindings:
                if b.proto not in PROTOCOLS:
                    raise NetdError(f'unsupported protocol "{b.proto}"')
            requests = [(b, _normalise_host_ip(b.host_ip)) for b in bindings]
            new: list[PublishedPort] = []

            def taken(proto: str, host_ip: str, port: int) -> bool:
                if self._is_taken(proto, host_ip, port):
                    return True
                return any(
                    p.proto == proto
                    and p.host_port == port
                    and (p.host_ip == host_ip or ANY_IPV4 in (p.host_ip, host_ip))
                    for p in new
                )

            try:
                for b, host_ip in requests:
                    res: PortReservation = reserve_host_port(
                        b.proto, host_ip, b.host_port, b.host_port_end, taken
                    )
                    new.append(
                        PublishedPort(
                            b.proto,
                            host_ip,
                            res.host_port,
                            endpoint.ip,
                            b.container_port,
                            res.sock,
                        )
                    )
                self._firewall.add_mappings([p.mapping() for p in new])
            except BaseException:
                _close(new)
                raise
            try:
                self._ports.setdefault(container_id, []).extend(new)
                self._save_state()
            except BaseException:
                self._ports[container_id] = [
                    p for p in self._ports[container_id] if all(p is not n for n in new)
                ]
                self._firewall.remove_mappings([p.mapping() for p in new])
                _close(new)
                raise
            for port in new:
                if port.proto == "udp":
                    self._flush_udp_conntrack(port)
                self._after_reserve(port)
            return new

    @staticmethod
    def _flush_udp_conntrack(port: PublishedPort) -> None:
        try:
            conntrack.delete_udp_flows_to(port.host_ip, port.host_port)
        except Exception as exc:  # stale flows only delay the new mapping; not fatal
            log.warning("cannot flush conntrack for udp port %d: %s", port.host_port, exc)

    def published(self, container_id: str) -> list[PublishedPort]:
        """The ports published for ``container_id`` (sockets included)."""
        with self._lock:
            return list(self._ports.get(container_id, []))

    def unpublish(self, container_id: str) -> None:
        """Remove all of the container's mappings in one transaction and close their sockets."""
        with self._lock:
            ports = self._ports.get(container_id, [])
            if not ports:
                self._ports.pop(container_id, None)
                return
            self._firewall.remove_mappings([p.mapping() for p in ports])
            del self._ports[container_id]
            _close(ports)
            self._save_state()
