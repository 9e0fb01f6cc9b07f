"""Container endpoints: a sandbox (network namespace) per container, a veth per bridge network
it is connected to (a macvlan/ipvlan child per network of those drivers), its addresses, routes
and default route."""

from __future__ import annotations

import copy
import logging
import re
import secrets
import socket
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface

from common.macaddr import parse_mac
from netd import sandbox
from netd.control.ports import Ports
from netd.errors import Conflict, NetdError, NotFound
from netd.macvlan import IPVLAN
from netd.naming import (
    container_ifname,
    host_veth_name,
    mac_for_ip,
    netns_name,
)
from netd.network import (
    CREATING,
    READY,
    REMOVING,
    Network,
)
from netd.state import (
    Endpoint,
    Sandbox,
    close_ports,
    endpoint_key,
    firewall_mappings,
)

log = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")


class Endpoints(Ports):
    # -- endpoints --------------------------------------------------------------------------

    @property
    def _hairpin(self) -> bool:
        # Only DNAT mode sends a container's packets back out of its own bridge port (a
        # container reaching its own published port); the proxy connects from the host.
        return not self.cfg.userland_proxy

    def _plumb(self, ep: Endpoint, net: Network) -> None:
        address6 = IPv6Interface(f"{ep.ipv6}/{ep.ipv6_prefixlen}") if ep.ipv6 else None
        if not net.is_bridge:
            sandbox.connect_netns_to_parent(
                ep.netns_name,
                net.child_spec,
                ep.ifname,
                IPv4Interface(f"{ep.ip}/{ep.prefixlen}"),
                ep.mac,
                address6,
            )
            return
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
            address6,
        )

    def _unplumb(self, ep: Endpoint) -> None:
        """Remove the endpoint's link: the host veth (its peer goes with it), or the child
        inside the namespace (an endpoint without a host veth is a macvlan/ipvlan one)."""
        if ep.host_veth:
            sandbox.delete_link(ep.host_veth)
        else:
            sandbox.delete_link_inside(ep.netns_name, ep.ifname)

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
        mac: str | None = None,
    ) -> Endpoint:
        """Connect the container to ``network``: its namespace is created on the first
        connection (``eth0``); later ones add ``eth1``, ``eth2``... to the same namespace, also
        while the container runs. ``ip`` / ``ip6`` ask for a given IPv4 / IPv6 address
        (networks with a configured subnet of that family only, as Docker); ``aliases`` are
        recorded for name resolution. On an IPv6 network the endpoint gets an address of each
        family. ``mac`` sets the interface's MAC (``--mac-address``; else one made of its
        IPv4 address)."""
        with self._lock:
            self._require_ready()
            self._check_container_id(container_id)
            net = self._resolve(network)
            return copy.deepcopy(self._connect(container_id, net, ip, list(aliases), ip6, mac))

    def _connect(
        self,
        container_id: str,
        net: Network,
        ip: str | None,
        aliases: list[str],
        ip6: str | None = None,
        mac: str | None = None,
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
        if mac:
            if net.driver == IPVLAN:
                raise NetdError("an ipvlan interface has its parent's MAC: no --mac-address")
            try:
                mac = parse_mac(mac)
            except ValueError as e:
                raise NetdError(str(e)) from None

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
        # A macvlan/ipvlan endpoint has no host end: its link lives in the namespace alone.
        veth = host_veth_name(container_id, index) if net.is_bridge else ""
        for holder in st.endpoints.values():
            if veth and holder.host_veth == veth:
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
            # ipvlan children carry their parent's MAC (shown as none, as Docker does)
            mac="" if net.driver == IPVLAN else (mac or mac_for_ip(IPv4Address(addr))),
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
            self._unplumb(ep)
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
        self._unplumb(ep)
        st.release_addresses(ep)
        del st.endpoints[ep.key]
        if not st.ports.get(ep.container_id):
            st.ports.pop(ep.container_id, None)
        self._save()
        self._sync_default_route(ep.container_id)
        if any(p.proxy_only for p in on_endpoint):
            self._sync_return_path()

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
                self._unplumb(ep)
                st.release_addresses(ep)
                del st.endpoints[ep.key]
            if sb is not None:
                sandbox.delete_netns(sb.netns_name)
                del st.sandboxes[container_id]
            self._save()
            if any(p.proxy_only for p in ports):
                self._sync_return_path()

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
