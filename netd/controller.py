"""The facade the daemon uses: bridge networks (the default one and user-defined ones),
container endpoints on them, and published ports.

A container has one sandbox (a network namespace, made by its first ``connect``) and one
endpoint per network it is connected to: ``eth0`` on the first, ``eth1``... on the next ones.
Its default route goes through the gateway of its first endpoint on a non-internal network.
Ports are published for one endpoint and DNATed to that endpoint's address (Docker publishes on
the network the container was created with: the engine passes the container's first
endpoint); disconnecting that endpoint unpublishes them.

Order of operations when publishing follows Docker 28 (port reservation before NAT rules): bind
every host port first, then add every NAT mapping in one firewall transaction, so a failure at
either step leaves no rule and no socket behind, and no connection is accepted before its DNAT
rule exists.

Crash safety: every change is recorded in the state file (netd/state.py) before the kernel is
touched, with a lifecycle mark, and the firewall is always rebuilt from the state by
``setup()``; so the next ``setup()`` after a crash rolls back what was being created, finishes
what was being removed, and recreates what live endpoints need (see ``setup``).

The pyroute2 calls are synchronous and start their own helper processes: from asyncio code,
call the controller in a worker thread (``asyncio.to_thread``). Methods are serialised by a lock.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import logging
import re
import secrets
import socket
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface
from pathlib import Path
from typing import Any

from common.jsonstate import CorruptRecord, read_record, set_aside, write_json_atomic
from common.ports import PROTOCOLS, PortBinding, PortMapping
from common.timefmt import utc_rfc3339
from netd import bridge, conntrack, forwarding, sandbox, subnetpool, sysctl
from netd.errors import Conflict, Forbidden, NetdError, NotFound
from netd.firewall import ANY_IPV4, Firewall, make_firewall
from netd.naming import (
    container_ifname,
    host_veth_name,
    mac_for_ip,
    netns_name,
    valid_ifname,
)
from netd.network import (
    CREATING,
    DEFAULT_NETWORK,
    OPT_BRIDGE_NAME,
    READY,
    REMOVING,
    Network,
    NetworkRequest,
    default_network_id,
    plan_network,
)
from netd.portmap import (
    ANY_IPV6,
    PortReservation,
    detach_drop_filter,
    host_addresses_overlap,
    is_ipv6,
    reserve_dual_stack_port,
    reserve_host_port,
)
from netd.state import (
    Endpoint,
    NetdState,
    PublishedPort,
    Sandbox,
    close_ports,
    endpoint_key,
    firewall_mappings,
)
from netd.subnetpool import DEFAULT_ADDRESS_POOLS

__all__ = [
    "Conflict",
    "Endpoint",
    "Forbidden",
    "NetdConfig",
    "NetdError",
    "Network",
    "NetworkController",
    "NotFound",
    "PublishedPort",
    "Sandbox",
]

log = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")

# Files under <data_root>/network (netd/status.py reads them too).
STATE_DIR = "network"
ENDPOINTS_FILE = "endpoints.json"  # all of netd's state (netd/state.py)
NETWORK_FILE = "network.json"  # the firewall the rules were installed with, and the bridge
IPAM_FILE = "ipam.json"  # first slice only: read once, then folded into ENDPOINTS_FILE


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
    # Where automatic subnets of user-defined networks come from: (base, prefix length of
    # each subnet). See netd/subnetpool.py.
    address_pools: tuple[tuple[str, int], ...] = DEFAULT_ADDRESS_POOLS
    # Docker's --ip-forward: turn net.ipv4.ip_forward on (containers reach other networks).
    ip_forward: bool = True
    # Docker's --ip-forward-no-drop: when pyengined turned ip_forward on, do not drop the
    # forwarded traffic that is not pyengine's (see netd/forwarding.py).
    ip_forward_no_drop: bool = False


def _normalise_host_ip(host_ip: str) -> str:
    try:
        addr = ipaddress.ip_address(host_ip)
    except ValueError:
        raise NetdError(f'invalid host IP "{host_ip}"') from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # An IPV6_V6ONLY socket cannot bind it (ipv6(7)); the IPv4 address says the same.
        raise NetdError(f'invalid host IP "{host_ip}": use the IPv4 address {addr.ipv4_mapped}')
    return str(addr)


def _publish_addresses(
    host_ip: str, host_binding_ipv4: str, userland_proxy: bool, container_has_ipv6: bool = False
) -> list[str]:
    """The host addresses one binding is published on, as Docker 28 does. Without a host
    address: 0.0.0.0 and :: (the same port on both), but only 0.0.0.0 for a container without
    an IPv6 address when there is no userland proxy (nothing can NAT IPv6 to IPv4), and only
    the network's ``host_binding_ipv4`` when that is set. An explicit IPv6 address needs the
    proxy or a container with an IPv6 address; ``::1`` always needs the proxy (the kernel does
    not DNAT a loopback source off the host).
    """
    if host_ip == "":
        if host_binding_ipv4 != ANY_IPV4:
            return [_normalise_host_ip(host_binding_ipv4)]
        both = userland_proxy or container_has_ipv6
        return [ANY_IPV4, ANY_IPV6] if both else [ANY_IPV4]
    address = _normalise_host_ip(host_ip)
    if is_ipv6(address) and not userland_proxy:
        if not container_has_ipv6:
            raise NetdError(
                f'cannot publish on IPv6 address "{address}": the container has no IPv6 '
                "address and the userland proxy is disabled"
            )
        if address == "::1":
            raise NetdError(
                'cannot publish on "::1" without the userland proxy: the kernel does not '
                "route IPv6 loopback traffic to a container"
            )
    return [address]


class NetworkController:
    def __init__(self, cfg: NetdConfig) -> None:
        if not valid_ifname(cfg.bridge):
            raise NetdError(f'invalid bridge name "{cfg.bridge}"')
        try:
            gateway = IPv4Interface(cfg.bridge_cidr)
        except ValueError:
            raise NetdError(f'invalid bridge_cidr "{cfg.bridge_cidr}"') from None
        if gateway.network.prefixlen > 30 or gateway.ip in (
            gateway.network.network_address,
            gateway.network.broadcast_address,
        ):
            raise NetdError(
                f'bridge_cidr "{cfg.bridge_cidr}" must be a host address in a /30 or larger'
            )
        subnetpool.parse_pools(cfg.address_pools)
        self.cfg = cfg
        self._state_dir = cfg.data_root / STATE_DIR
        self._state_file = self._state_dir / ENDPOINTS_FILE
        self._network_file = self._state_dir / NETWORK_FILE
        self._lock = threading.RLock()
        self._firewall: Firewall = make_firewall(
            cfg.firewall_backend, cfg.table, cfg.userland_proxy
        )
        default = Network(
            id=default_network_id(cfg.bridge, gateway),
            name=DEFAULT_NETWORK,
            bridge=cfg.bridge,
            subnet=str(gateway.network),
            gateway=str(gateway.ip),
            default=True,
            options={OPT_BRIDGE_NAME: cfg.bridge},
            created=utc_rfc3339(digits=6),
        )
        self._st = self._load_state(default)
        self._adopt_default_network(default)
        self._ready = False

    # -- persisted state --------------------------------------------------------------------

    def _save(self) -> None:
        self._st.save(self._state_file)

    def _adopt_default_network(self, default: Network) -> None:
        """Make ``default`` the default network; a previous one (another ``--bridge``/``--bip``)
        may only be replaced when no container is connected to it."""
        st = self._st
        previous = [n for n in st.networks.values() if n.default]
        for old in previous:
            if old.id == default.id:
                continue
            if st.network_endpoints(old.id):
                raise NetdError(
                    f"default network changed from {old.bridge} {old.subnet} to "
                    f"{default.bridge} {default.subnet} while containers are connected to it; "
                    "remove the containers first"
                )
            st.drop_network(old.id)
            if old.bridge != default.bridge:
                # Its bridge is left to the next setup() to delete, as a network being removed.
                old.default, old.state, old.name = False, REMOVING, f"{old.name}-{old.id[:12]}"
                st.add_network(old)
        if default.id not in st.networks:
            for net in st.networks.values():
                if net.state == REMOVING:
                    continue
                if net.bridge == default.bridge:
                    raise Conflict(
                        f'default bridge {default.bridge} is the bridge of network "{net.name}"'
                    )
                if IPv4Network(net.subnet).overlaps(IPv4Network(default.subnet)):
                    raise Conflict(
                        f"default bridge subnet {default.subnet} overlaps network "
                        f'"{net.name}" ({net.subnet})'
                    )
            rest = dict(st.networks)
            st.networks.clear()
            st.add_network(default)
            for nid, net in rest.items():
                ipam = st.ipams[nid]
                st.networks[nid], st.ipams[nid] = net, ipam

    def _save_firewall_record(self) -> None:
        write_json_atomic(
            self._network_file,
            {
                "bridge": self.cfg.bridge,
                "subnet": self.default_network.subnet,
                "gateway": self.default_network.gateway,
                "firewall_backend": self.cfg.firewall_backend,
                "table": self.cfg.table,
                "userland_proxy": self.cfg.userland_proxy,
                "forward_policy_before": self._firewall.forward_policy_before,
            },
        )

    def _load_state(self, default: Network) -> NetdState:
        """The persisted state; one that cannot be read (bad JSON, wrong shape) is set aside
        and logged, and the networks start from the default one alone."""
        try:
            return NetdState.load(self._state_file, default, self._state_dir / IPAM_FILE)
        except NetdError:
            raise  # e.g. a newer daemon's state version: not to be thrown away
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            set_aside(self._state_file, e)
            return NetdState.load(self._state_file, default, self._state_dir / IPAM_FILE)

    def _read_network_record(self) -> dict[str, Any]:
        """What _save_firewall_record() wrote; {} when missing, or corrupt (set aside)."""
        try:
            previous = read_record(self._network_file, None) or {}
            if not isinstance(previous, dict):
                raise CorruptRecord("not a JSON object")
        except CorruptRecord as e:
            set_aside(self._network_file, e)
            return {}
        return previous

    def _remove_previous_firewall(self) -> None:
        """A daemon started before with another backend or table left its rules behind."""
        previous = self._read_network_record()
        backend, table = previous.get("firewall_backend"), previous.get("table")
        current = (self.cfg.firewall_backend, self.cfg.table)
        if not backend or not table or (backend, table) == current:
            return
        log.info("removing the rules of the previous firewall (%s, table %s)", backend, table)
        try:
            old = make_firewall(backend, table, bool(previous.get("userland_proxy")))
            old.forward_policy_before = previous.get("forward_policy_before")
            old.uninstall()
        except NetdError as exc:
            log.warning("cannot remove the previous %s rules of %s: %s", backend, table, exc)

    def _firewall_mappings(self) -> list[PortMapping]:
        return firewall_mappings(p for ports in self._st.ports.values() for p in ports)

    def _install_firewall(self) -> None:
        """Rebuild the whole ruleset from the state, in one transaction."""
        networks = [n.firewall_view() for n in self._st.networks.values() if n.state != REMOVING]
        self._firewall.install(networks, self._firewall_mappings())

    def _require_ready(self) -> None:
        if not self._ready:
            raise NetdError("network controller is not set up (call setup() first)")

    # -- setup / teardown -------------------------------------------------------------------

    def setup(
        self,
        containers: Collection[str] | None = None,
        held_sockets: Mapping[tuple[str, str, int], socket.socket] | None = None,
    ) -> None:
        """Bring the kernel in line with the state; idempotent, and the recovery after a crash.

        * networks: one being created is rolled back, one being removed is removed; the
          others get their bridge (created if missing, address and state fixed);
        * endpoints and sandboxes: those being created are rolled back, those being removed are
          removed, as are those whose namespace is gone or whose container is not in
          ``containers`` (when given: the containers that still exist); live ones are plugged
          into their bridge again, their veth pair recreated if it is missing, and their
          default route set;
        * addresses: exactly the live endpoints' addresses are allocated;
        * published ports: those of removed endpoints are dropped, the others get a reserving
          socket again (a new process holds none): the one ``held_sockets`` has for that
          (proto, host_ip, host_port), if any, else a newly bound one. Held sockets are the
          listening sockets of proxies that outlived the previous daemon: keeping them, rather
          than binding again, keeps those ports open throughout. setup() owns them: those it
          does not use are closed, also when it fails;
        * the firewall: a fresh table (or chain set) from the state, in one transaction.
        """
        held = dict(held_sockets or {})
        try:
            self._setup(containers, held)
        finally:
            for sock in held.values():
                sock.close()

    def _setup(
        self, containers: Collection[str] | None, held: dict[tuple[str, str, int], socket.socket]
    ) -> None:
        with self._lock:
            self._firewall.forward_drop = forwarding.setup(
                self._state_dir, self.cfg.ip_forward, self.cfg.ip_forward_no_drop
            )
            previous = self._read_network_record()
            if (previous.get("firewall_backend"), previous.get("table")) == (
                self.cfg.firewall_backend,
                self.cfg.table,
            ):
                self._firewall.forward_policy_before = previous.get("forward_policy_before")
            st = self._st
            if any(n.subnet6 for n in st.networks.values() if n.state == READY):
                sysctl.enable_ipv6_forward()
            for net in list(st.networks.values()):
                if net.state != READY:
                    log.warning("network %s was left %s; removing it", net.name, net.state)
                    self._forget_network_endpoints(net.id)
                    st.drop_network(net.id)
                    bridge.delete_bridge(net.bridge)
            for net in st.networks.values():
                try:
                    bridge.ensure_bridge(net.bridge, net.interface, net.interface6)
                    # DNAT of 127.0.0.0/8 traffic to the bridge needs it (Docker's
                    # setupLoopbackAddressesRouting); off again when the proxy handles loopback.
                    sysctl.set_route_localnet(net.bridge, not self.cfg.userland_proxy)
                except NetdError as exc:
                    if net.default:
                        raise
                    # The daemon still starts; the network's endpoints are dropped below.
                    log.warning("cannot set up the bridge of network %s: %s", net.name, exc)
            self._reconcile_endpoints(containers)
            self._reconcile_addresses()
            fresh = self._restore_port_reservations(held)
            try:
                self._remove_previous_firewall()
                # The FORWARD policy iptables is about to replace goes to disk first: a crash
                # in between must not lose the policy to put back.
                self._firewall.remember_forward_policy()
                self._save_firewall_record()
                self._install_firewall()
                self._save_firewall_record()
                self._save()
            except BaseException:
                close_ports(fresh)
                raise
            self._ready = True

    def _forget_network_endpoints(self, network_id: str) -> None:
        for ep in self._st.network_endpoints(network_id):
            self._forget_endpoint(ep)

    def _forget_endpoint(self, ep: Endpoint) -> None:
        """Remove an endpoint's veth, address, record and ports, without firewall changes (the
        caller reinstalls the firewall from the state)."""
        sandbox.delete_link(ep.host_veth)
        self._st.release_addresses(ep)
        self._st.endpoints.pop(ep.key, None)
        ports = self._st.ports.get(ep.container_id, [])
        gone = [p for p in ports if p.network_id == ep.network_id]
        close_ports(gone)
        if gone:
            self._st.ports[ep.container_id] = [p for p in ports if p not in gone]

    def _reconcile_endpoints(self, containers: Collection[str] | None) -> None:
        st = self._st
        wanted = None if containers is None else set(containers)
        for sb in list(st.sandboxes.values()):
            present = sandbox.netns_exists(sb.netns_name)
            listed = wanted is None or sb.container_id in wanted
            if sb.state == READY and present and listed:
                continue
            why = (
                f"it was left {sb.state}"
                if sb.state != READY
                else "its namespace is gone"
                if not present
                else "the container no longer exists"
            )
            log.warning("removing the network sandbox of %s: %s", sb.container_id[:12], why)
            for ep in st.container_endpoints(sb.container_id):
                self._forget_endpoint(ep)
            sandbox.delete_netns(sb.netns_name)
            del st.sandboxes[sb.container_id]
            close_ports(st.ports.pop(sb.container_id, []))
        for ep in list(st.endpoints.values()):
            net = st.networks.get(ep.network_id)
            if ep.state != READY or net is None or ep.container_id not in st.sandboxes:
                log.warning(
                    "endpoint %s of %s was left %s", ep.ifname, ep.container_id[:12], ep.state
                )
                self._forget_endpoint(ep)
                continue
            try:
                if sandbox.link_exists(ep.host_veth):
                    sandbox.plug_into_bridge(
                        ep.host_veth, net.bridge, self._hairpin, not net.enable_icc
                    )
                else:
                    log.warning("veth %s is missing; recreating it", ep.host_veth)
                    self._plumb(ep, net)
            except NetdError as exc:
                log.warning("dropping endpoint %s of %s: %s", ep.ifname, ep.container_id[:12], exc)
                self._forget_endpoint(ep)
        for cid in list(st.sandboxes):
            try:
                self._sync_default_route(cid)
            except NetdError as exc:
                log.warning("cannot set the default route of %s: %s", cid[:12], exc)
        for cid, ports in list(st.ports.items()):
            keep = [p for p in ports if self._port_target_is_live(cid, p)]
            close_ports([p for p in ports if p not in keep])
            if keep:
                st.ports[cid] = keep
            else:
                del st.ports[cid]

    def _port_target_is_live(self, container_id: str, port: PublishedPort) -> bool:
        ep = self._st.endpoints.get(endpoint_key(container_id, port.network_id))
        if ep is None or ep.state != READY:
            return False
        return port.container_ip in (ep.ip, ep.ipv6)

    def _reconcile_addresses(self) -> None:
        """Allocations = the live endpoints' addresses (an interrupted allocation is freed)."""
        for nid, ipam in self._st.ipams.items():
            ipam.allocations = {ep.ip: ep.container_id for ep in self._st.network_endpoints(nid)}
        for nid, ipam in self._st.ipams6.items():
            ipam.allocations = {
                ep.ipv6: ep.container_id for ep in self._st.network_endpoints(nid) if ep.ipv6
            }

    def _restore_port_reservations(
        self, held: dict[tuple[str, str, int], socket.socket] | None = None
    ) -> list[PublishedPort]:
        """Give the persisted mappings that hold no socket in this process one again: the
        matching socket taken out of ``held``, else a newly bound one."""
        held = {} if held is None else held
        fresh: list[PublishedPort] = []
        for cid, ports in self._st.ports.items():
            for port in list(ports):
                if port.sock is not None:
                    continue
                kept = held.pop((port.proto, port.host_ip, port.host_port), None)
                if kept is not None:
                    # A surviving proxy serves it: no drop filter to lift (_after_reserve).
                    port.sock = kept
                    fresh.append(port)
                    continue
                try:
                    res = reserve_host_port(
                        port.proto,
                        port.host_ip,
                        port.host_port,
                        0,
                        functools.partial(self._is_taken, skip=port),
                    )
                except NetdError as exc:
                    log.warning("dropping mapping of %s: %s", cid[:12], exc)
                    ports.remove(port)
                    continue
                port.sock = res.sock
                self._after_reserve(port)
                fresh.append(port)
        return fresh

    def teardown(self, remove_networks: bool = False) -> None:
        """Remove everything netd made in the kernel: endpoints, sandboxes, mappings, the
        firewall and every bridge. User-defined networks stay defined (Docker keeps them across
        daemon restarts; the next setup() recreates their bridges) unless ``remove_networks``.
        """
        with self._lock:
            st = self._st
            for cid in {ep.container_id for ep in st.endpoints.values()} | set(st.sandboxes):
                self.delete_endpoint(cid)
            for cid in list(st.ports):
                self.unpublish(cid)
            self._firewall.uninstall()
            for net in st.networks.values():
                bridge.delete_bridge(net.bridge)
            kept = [n for n in st.networks.values() if not n.default and n.state == READY]
            if remove_networks or not kept:
                self._state_file.unlink(missing_ok=True)
                default = self.default_network
                default.state = READY
                self._st = NetdState()
                self._st.add_network(default)
            else:
                for net in list(st.networks.values()):
                    if net.state != READY:
                        st.drop_network(net.id)
                self._save()
            (self._state_dir / IPAM_FILE).unlink(missing_ok=True)
            self._network_file.unlink(missing_ok=True)
            try:
                self._state_dir.rmdir()
            except OSError:
                pass  # not empty: the networks' definitions, or files that are not ours
            self._ready = False

    # -- networks ---------------------------------------------------------------------------

    @property
    def default_network(self) -> Network:
        return next(n for n in self._st.networks.values() if n.default)

    def _resolve(self, ref: str | Network, removing: bool = False) -> Network:
        """By full id, then name, then unique id prefix (Docker's order)."""
        ref = ref.id if isinstance(ref, Network) else ref
        states = (READY, REMOVING) if removing else (READY,)
        nets = [n for n in self._st.networks.values() if n.state in states]
        matchers: tuple[Callable[[Network], bool], ...] = (
            lambda n: n.id == ref,
            lambda n: n.name == ref,
        )
        for match in matchers:
            found = [n for n in nets if match(n)]
            if found:
                return found[0]
        found = [n for n in nets if ref and n.id.startswith(ref)]
        if len(found) > 1:
            raise NotFound(f"network {ref} is ambiguous ({len(found)} matches found)")
        if not found:
            raise NotFound(f"network {ref} not found")
        return found[0]

    def is_internal(self, network_id: str) -> bool:
        """Whether network ``network_id`` is internal (False for one that does not exist).
        Takes no lock, so the event loop may ask it on every DNS query: a network's internal
        flag never changes, and a dict lookup is atomic."""
        net = self._st.networks.get(network_id)
        return net is not None and net.internal

    def network(self, ref: str | Network) -> Network:
        """The network named ``ref``, or with id (prefix) ``ref``; NotFound otherwise."""
        with self._lock:
            return copy.deepcopy(self._resolve(ref))

    def networks(self) -> list[Network]:
        """Every network, the default one first."""
        with self._lock:
            return [copy.deepcopy(n) for n in self._st.networks.values() if n.state == READY]

    def create_network(
        self,
        name: str,
        subnet: str | None = None,
        gateway: str | None = None,
        ip_range: str | None = None,
        internal: bool = False,
        enable_ipv6: bool = False,
        options: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        subnet6: str | None = None,
        gateway6: str | None = None,
    ) -> Network:
        """A user-defined bridge network: its bridge, and its place in the firewall. With
        ``enable_ipv6`` it also gets an IPv6 subnet: ``subnet6`` (and ``gateway6``), or a /64
        of the unique local pool."""
        with self._lock:
            self._require_ready()
            request = NetworkRequest(
                name,
                subnet,
                gateway,
                ip_range,
                internal,
                enable_ipv6,
                options,
                labels,
                subnet6,
                gateway6,
            )
            existing = list(self._st.networks.values())
            network = plan_network(
                request, existing, subnetpool.host_routes(), self.cfg.address_pools
            )
            if sandbox.link_exists(network.bridge):
                raise Conflict(f"interface {network.bridge} already exists")
            st = self._st
            st.add_network(network)
            try:
                self._save()
                if network.subnet6:
                    sysctl.enable_ipv6_forward()
                bridge.ensure_bridge(network.bridge, network.interface, network.interface6)
                sysctl.set_route_localnet(network.bridge, not self.cfg.userland_proxy)
                self._install_firewall()
                network.state = READY
                self._save()
            except BaseException:
                st.drop_network(network.id)
                self._undo_network(network)
                raise
            return copy.deepcopy(network)

    def _undo_network(self, network: Network) -> None:
        """Best effort: the firewall without ``network``, its bridge gone, the state saved."""
        try:
            if self._firewall.installed():
                self._install_firewall()
        except NetdError as exc:
            log.warning("cannot remove network %s from the firewall: %s", network.name, exc)
        bridge.delete_bridge(network.bridge)
        self._save()

    def remove_network(self, ref: str | Network) -> None:
        """Remove a user-defined network; refused while a container is connected to it."""
        with self._lock:
            self._require_ready()
            network = self._resolve(ref, removing=True)
            if network.default:
                raise Forbidden(f"{network.name} is a pre-defined network and cannot be removed")
            endpoints = self._st.network_endpoints(network.id)
            if endpoints:
                raise Conflict(
                    f"network {network.name} has active endpoints "
                    f"({', '.join(ep.container_id[:12] for ep in endpoints)})"
                )
            previous = network.state
            network.state = REMOVING
            self._save()
            try:
                self._install_firewall()
            except BaseException:
                network.state = previous
                self._save()
                raise
            # From here on the removal is carried through, now or by the next setup().
            bridge.delete_bridge(network.bridge)
            self._st.drop_network(network.id)
            self._save()

    # -- endpoints --------------------------------------------------------------------------

    @property
    def _hairpin(self) -> bool:
        # Only DNAT mode sends a container's packets back out of its own bridge port (a
        # container reaching its own published port); the proxy connects from the host.
        return not self.cfg.userland_proxy

    def _plumb(self, ep: Endpoint, net: Network) -> None:
        sandbox.connect_netns_to_bridge(
            ep.netns_name,
            ep.host_veth,
            ep.ifname,
            net.bridge,
            IPv4Interface(f"{ep.ip}/{ep.prefixlen}"),
            ep.mac,
            self._hairpin,
            not net.enable_icc,
            net.mtu,
            IPv6Interface(f"{ep.ipv6}/{ep.ipv6_prefixlen}") if ep.ipv6 else None,
        )

    def _sync_default_route(self, container_id: str) -> None:
        """Default route via the first endpoint (eth0 first) on a non-internal network."""
        sb = self._st.sandboxes.get(container_id)
        if sb is None or not sandbox.netns_exists(sb.netns_name):
            return
        via: tuple[str, IPv4Address] | None = None
        via6: tuple[str, IPv6Address] | None = None
        for ep in self._st.container_endpoints(container_id):
            net = self._st.networks.get(ep.network_id)
            if ep.state != REMOVING and net is not None and not net.internal:
                if via is None:
                    via = (ep.ifname, IPv4Address(ep.gateway))
                if via6 is None and ep.ipv6:
                    via6 = (ep.ifname, IPv6Address(ep.ipv6_gateway))
        sandbox.set_default_route(sb.netns_name, via)
        if via6 is not None or any(ep.ipv6 for ep in self._st.container_endpoints(container_id)):
            sandbox.set_default_route(sb.netns_name, via6, socket.AF_INET6)

    def _check_container_id(self, container_id: str) -> None:
        if not isinstance(container_id, str) or not _CONTAINER_ID.fullmatch(container_id):
            raise NetdError(f'invalid container id "{container_id}"')

    def connect(
        self,
        container_id: str,
        network: str | Network,
        ip: str | None = None,
        aliases: Sequence[str] = (),
        ip6: str | None = None,
    ) -> Endpoint:
        """Connect the container to ``network``: its namespace is created on the first
        connection (``eth0``); later ones add ``eth1``, ``eth2``... to the same namespace, also
        while the container runs. ``ip`` / ``ip6`` ask for a given IPv4 / IPv6 address
        (networks with a configured subnet of that family only, as Docker); ``aliases`` are
        recorded for name resolution. On an IPv6 network the endpoint gets an address of each
        family."""
        with self._lock:
            self._require_ready()
            self._check_container_id(container_id)
            net = self._resolve(network)
            return copy.deepcopy(self._connect(container_id, net, ip, list(aliases), ip6))

    def _connect(
        self,
        container_id: str,
        net: Network,
        ip: str | None,
        aliases: list[str],
        ip6: str | None = None,
    ) -> Endpoint:
        st = self._st
        short = container_id[:12]
        if endpoint_key(container_id, net.id) in st.endpoints:
            raise Conflict(f"container {short} is already connected to network {net.name}")
        if ip and not net.configured_subnet:
            if net.default:
                raise NetdError(
                    "user specified IP address is supported on user defined networks only"
                )
            raise NetdError(
                "user specified IP address is supported only when connecting to networks "
                "with user configured subnets"
            )
        if ip6 and not net.subnet6:
            raise NetdError(f"invalid IPv6 address {ip6}: network {net.name} has no IPv6")
        if ip6 and not net.configured_subnet6:
            raise NetdError(
                "user specified IP address is supported only when connecting to networks "
                "with user configured subnets"
            )
        for alias in aliases:
            if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
                raise NetdError(f'invalid alias "{alias}"')

        sb = st.sandboxes.get(container_id)
        new_sandbox = sb is None
        if sb is None:
            name = netns_name(self.cfg.netns_prefix, container_id)
            for other in st.sandboxes.values():
                if other.netns_name == name:
                    raise Conflict(f"container id {short} clashes with {other.container_id[:12]}")
            sb = Sandbox(container_id, name, sandbox.netns_path(name), state=CREATING)
        elif sb.state != READY:
            raise NetdError(f"the network namespace of container {short} is being {sb.state}")
        used = {ep.index for ep in st.container_endpoints(container_id)}
        index = next(i for i in range(len(used) + 1) if i not in used)
        veth = host_veth_name(container_id, index)
        for holder in st.endpoints.values():
            if holder.host_veth == veth:
                raise Conflict(f"container id {short} clashes with {holder.container_id[:12]}")
        if sandbox.link_exists(veth):
            raise Conflict(f"interface {veth} already exists")

        ipam = st.ipams[net.id]
        addr = ipam.allocate(container_id, ip)
        addr6 = None
        ipam6 = st.ipams6.get(net.id)
        if ipam6 is not None:
            try:
                addr6 = ipam6.allocate(container_id, ip6)
            except BaseException:
                ipam.release(str(addr))
                raise
        ep = Endpoint(
            container_id=container_id,
            netns_name=sb.netns_name,
            netns_path=sb.netns_path,
            host_veth=veth,
            ip=str(addr),
            prefixlen=IPv4Network(net.subnet).prefixlen,
            gateway=net.gateway,
            mac=mac_for_ip(IPv4Address(addr)),
            network_id=net.id,
            network_name=net.name,
            ifname=container_ifname(index),
            aliases=aliases,
            id=secrets.token_hex(32),
            state=CREATING,
            ipv6=str(addr6) if addr6 is not None else "",
            ipv6_prefixlen=ipam6.subnet.prefixlen if ipam6 is not None else 0,
            ipv6_gateway=net.gateway6 if addr6 is not None else "",
        )
        st.sandboxes[container_id] = sb
        st.endpoints[ep.key] = ep
        created_netns = False
        try:
            self._save()  # the intent, before any kernel object exists
            if new_sandbox:
                sandbox.create_netns(sb.netns_name)
                created_netns = True
            self._plumb(ep, net)
            self._sync_default_route(container_id)
            ep.state = READY
            sb.state = READY
            self._save()
        except BaseException:
            sandbox.delete_link(ep.host_veth)
            if created_netns:
                sandbox.delete_netns(sb.netns_name)
            st.release_addresses(ep)
            st.endpoints.pop(ep.key, None)
            if new_sandbox:
                st.sandboxes.pop(container_id, None)
            try:
                self._save()
                if not new_sandbox:
                    self._sync_default_route(container_id)
            except NetdError as exc:
                log.warning("cannot undo the connection of %s: %s", short, exc)
            raise
        return ep

    def create_endpoint(self, container_id: str) -> Endpoint:
        """Connect the container to the default network (its first endpoint)."""
        with self._lock:
            self._require_ready()
            self._check_container_id(container_id)
            if self._st.container_endpoints(container_id):
                raise Conflict(f"container {container_id[:12]} already has an endpoint")
            return copy.deepcopy(self._connect(container_id, self.default_network, None, []))

    def disconnect(self, container_id: str, network: str | Network) -> None:
        """Remove the container's endpoint on ``network`` (and the ports published for it);
        its namespace stays, with its other endpoints or only ``lo``."""
        with self._lock:
            self._require_ready()
            net = self._resolve(network, removing=True)
            ep = self._st.endpoints.get(endpoint_key(container_id, net.id))
            if ep is None:
                raise NotFound(
                    f"container {container_id[:12]} is not connected to network {net.name}"
                )
            self._remove_endpoint(ep)

    def _remove_endpoint(self, ep: Endpoint) -> None:
        st = self._st
        ports = st.ports.get(ep.container_id, [])
        on_endpoint = [p for p in ports if p.network_id == ep.network_id]
        previous = ep.state
        ep.state = REMOVING
        if on_endpoint:
            st.ports[ep.container_id] = [p for p in ports if p not in on_endpoint]
        self._save()
        try:
            self._firewall.remove_mappings(firewall_mappings(on_endpoint))
        except BaseException:
            ep.state = previous
            st.ports[ep.container_id] = ports
            self._save()
            raise
        close_ports(on_endpoint)
        # From here on the removal is carried through, now or by the next setup().
        sandbox.delete_link(ep.host_veth)
        st.release_addresses(ep)
        del st.endpoints[ep.key]
        if not st.ports.get(ep.container_id):
            st.ports.pop(ep.container_id, None)
        self._save()
        self._sync_default_route(ep.container_id)

    def delete_endpoint(self, container_id: str) -> None:
        """Release everything of the container: its ports, every endpoint, its namespace.
        Idempotent."""
        with self._lock:
            st = self._st
            endpoints = st.container_endpoints(container_id)
            sb = st.sandboxes.get(container_id)
            ports = st.ports.get(container_id, [])
            if not endpoints and sb is None and not ports:
                return
            previous = [(ep, ep.state) for ep in endpoints] + ([(sb, sb.state)] if sb else [])
            # One intent for the whole release: from this write on, a crash is finished by
            # the next setup().
            for record, _state in previous:
                record.state = REMOVING
            st.ports.pop(container_id, None)
            self._save()
            try:
                self._firewall.remove_mappings(firewall_mappings(ports))
            except BaseException:
                for record, state in previous:
                    record.state = state
                if ports:
                    st.ports[container_id] = ports
                self._save()
                raise
            close_ports(ports)
            for ep in endpoints:
                sandbox.delete_link(ep.host_veth)
                st.release_addresses(ep)
                del st.endpoints[ep.key]
            if sb is not None:
                sandbox.delete_netns(sb.netns_name)
                del st.sandboxes[container_id]
            self._save()

    def endpoints(self) -> dict[str, Endpoint]:
        """Each container's first endpoint (``eth0`` unless that one was disconnected)."""
        with self._lock:
            first: dict[str, Endpoint] = {}
            for ep in sorted(self._st.endpoints.values(), key=lambda e: e.index):
                first.setdefault(ep.container_id, copy.deepcopy(ep))
            return first

    def container_endpoints(self, container_id: str) -> list[Endpoint]:
        """The container's endpoints, ``eth0`` first."""
        with self._lock:
            return copy.deepcopy(self._st.container_endpoints(container_id))

    def network_endpoints(self, network: str | Network) -> list[Endpoint]:
        with self._lock:
            return copy.deepcopy(self._st.network_endpoints(self._resolve(network).id))

    def sandboxes(self) -> dict[str, Sandbox]:
        """Every container's namespace, by container id (with or without endpoints)."""
        with self._lock:
            return copy.deepcopy(self._st.sandboxes)

    def sandbox(self, container_id: str) -> Sandbox | None:
        """The container's namespace (it outlives its endpoints until ``delete_endpoint``)."""
        with self._lock:
            return copy.deepcopy(self._st.sandboxes.get(container_id))

    # -- published ports --------------------------------------------------------------------

    def _is_taken(
        self, proto: str, host_ip: str, port: int, skip: PublishedPort | None = None
    ) -> bool:
        """Whether this engine already holds ``port`` on ``host_ip``, or on an address that
        clashes with it (the same family's unspecified address; IPv4 and IPv6 never clash)."""
        for ports in self._st.ports.values():
            for p in ports:
                if p is skip or p.proto != proto or p.host_port != port:
                    continue
                if host_addresses_overlap(p.host_ip, host_ip):
                    return True
        return False

    def _after_reserve(self, port: PublishedPort) -> None:
        """With the proxy, UDP datagrams must now reach the socket the proxy will read."""
        if self.cfg.userland_proxy and port.proto == "udp" and port.sock is not None:
            detach_drop_filter(port.sock)

    def publish(
        self, container_id: str, endpoint: Endpoint, bindings: list[PortBinding]
    ) -> list[PublishedPort]:
        """Reserve every host port, then map them all to ``endpoint``'s address in one
        firewall transaction. A binding without a host address is published on 0.0.0.0 and
        :: (see ``_publish_addresses``): one PublishedPort per address, the same host port on
        both. Ports on IPv6 addresses are left to the proxy (``PublishedPort.in_firewall``).
        Internal networks publish nothing."""
        with self._lock:
            self._require_ready()
            key = endpoint_key(container_id, endpoint.network_id or self.default_network.id)
            current = self._st.endpoints.get(key)
            if current is None or current.state != READY or current.ip != endpoint.ip:
                raise NotFound(f"container {container_id[:12]} has no such endpoint")
            net = self._st.networks[current.network_id]
            if net.internal and bindings:
                raise NetdError(
                    f"cannot publish ports of container {container_id[:12]}: "
                    f"network {net.name} is internal"
                )
            for b in bindings:
                if b.proto not in PROTOCOLS:
                    raise NetdError(f'unsupported protocol "{b.proto}"')
            proxy = self.cfg.userland_proxy
            has_ipv6 = bool(current.ipv6)
            requests = [
                (b, _publish_addresses(b.host_ip, net.host_binding_ipv4, proxy, has_ipv6))
                for b in bindings
            ]
            new: list[PublishedPort] = []

            def taken(proto: str, host_ip: str, port: int) -> bool:
                if self._is_taken(proto, host_ip, port):
                    return True
                return any(
                    p.proto == proto
                    and p.host_port == port
                    and host_addresses_overlap(p.host_ip, host_ip)
                    for p in new
                )

            try:
                for b, addresses in requests:
                    reserved: list[PortReservation] = (
                        reserve_dual_stack_port(b.proto, b.host_port, b.host_port_end, taken)
                        if addresses == [ANY_IPV4, ANY_IPV6]
                        else [
                            reserve_host_port(
                                b.proto, addresses[0], b.host_port, b.host_port_end, taken
                            )
                        ]
                    )
                    new += [
                        PublishedPort(
                            b.proto,
                            res.host_ip,
                            res.host_port,
                            # An IPv6 host address goes to the container's IPv6 address when it
                            # has one (DNAT or proxy), else through the proxy to its IPv4 one.
                            current.ipv6 if has_ipv6 and is_ipv6(res.host_ip) else current.ip,
                            b.container_port,
                            net.id,
                            res.sock,
                        )
                        for res in reserved
                    ]
                self._firewall.add_mappings(firewall_mappings(new))
            except BaseException:
                close_ports(new)
                raise
            # A crash before this save leaves mappings the state does not know: the next
            # setup() rebuilds the firewall from the state, without them.
            try:
                self._st.ports.setdefault(container_id, []).extend(new)
                self._save()
            except BaseException:
                self._st.ports[container_id] = [
                    p for p in self._st.ports[container_id] if all(p is not n for n in new)
                ]
                self._firewall.remove_mappings(firewall_mappings(new))
                close_ports(new)
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
            return list(self._st.ports.get(container_id, []))

    def unpublish(self, container_id: str) -> None:
        """Remove all of the container's mappings in one transaction and close their sockets."""
        with self._lock:
            ports = self._st.ports.pop(container_id, [])
            if not ports:
                return
            # The state first: a crash after this write leaves mappings the next setup() drops.
            self._save()
            try:
                self._firewall.remove_mappings(firewall_mappings(ports))
            except BaseException:
                self._st.ports[container_id] = ports
                self._save()
                raise
            close_ports(ports)
