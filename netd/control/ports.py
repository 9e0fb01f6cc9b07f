"""Published ports: reserve every host port, record them, then one firewall transaction;
undone in reverse when a step fails (Docker 28's order: the port is bound before any NAT rule)."""

from __future__ import annotations

import ipaddress
import logging

from common.ports import PROTOCOLS, PortBinding
from netd import conntrack
from netd.control.networks import Networks
from netd.errors import NetdError, NotFound
from netd.firewall import ANY_IPV4, GW_ROUTED
from netd.network import (
    READY,
    Network,
)
from netd.portmap import (
    ANY_IPV6,
    PortReservation,
    detach_drop_filter,
    host_addresses_overlap,
    host_has_ipv6,
    is_ipv6,
    reserve_dual_stack_port,
    reserve_host_port,
)
from netd.state import (
    Endpoint,
    PublishedPort,
    close_ports,
    endpoint_key,
    firewall_mappings,
)

log = logging.getLogger(__name__)


def _normalise_host_ip(host_ip: str) -> str:
    try:
        addr = ipaddress.ip_address(host_ip)
    except ValueError:
        raise NetdError(f'invalid host IP "{host_ip}"') from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # An IPV6_V6ONLY socket cannot bind it (ipv6(7)); the IPv4 address says the same.
        raise NetdError(f'invalid host IP "{host_ip}": use the IPv4 address {addr.ipv4_mapped}')
    return str(addr)


def publish_addresses(
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


def routed_ports(
    container_id: str,
    net: Network,
    endpoint: Endpoint,
    requests: list[tuple[PortBinding, list[str]]],
) -> tuple[list[PublishedPort], list[tuple[PortBinding, list[str]]]]:
    """Split ``requests`` (bindings and their host addresses) by the network's gateway mode
    in the family of the container address each would reach (an IPv6 host address reaches
    the IPv4 one, through the proxy, when the container has no IPv6 address): the routed ones
    become PublishedPorts without a host port (``host_port`` 0: no socket, no DNAT, no proxy;
    once per container port and family), the rest is returned to be reserved as usual. A
    host address or port given for a routed family has no effect and is logged, as Docker
    does (docs: "Gateway modes")."""
    routed: dict[tuple[str, str, int], PublishedPort] = {}
    rest: list[tuple[PortBinding, list[str]]] = []
    for b, addresses in requests:
        kept = []
        for address in addresses:
            v6 = is_ipv6(address) and bool(endpoint.ipv6)
            if (net.gateway_mode6 if v6 else net.gateway_mode4) != GW_ROUTED:
                kept.append(address)
                continue
            if b.host_port or address not in (ANY_IPV4, ANY_IPV6):
                log.warning(
                    "container %s: network %s is routed in IPv%d: host address and port of "
                    "%s/%s are not used",
                    container_id[:12], net.name, 6 if v6 else 4, b.container_port, b.proto,
                )  # fmt: skip
            any_address, target = (ANY_IPV6, endpoint.ipv6) if v6 else (ANY_IPV4, endpoint.ip)
            routed.setdefault(
                (any_address, b.proto, b.container_port),
                PublishedPort(b.proto, any_address, 0, target, b.container_port, net.id),
            )
        if kept:
            rest.append((b, kept))
    return list(routed.values()), rest


class Ports(Networks):
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
        self,
        container_id: str,
        endpoint: Endpoint,
        bindings: list[PortBinding],
        proxy_only: frozenset[tuple[int, str]] = frozenset(),
    ) -> list[PublishedPort]:
        """Reserve every host port, then map them all to ``endpoint``'s address in one
        firewall transaction. A binding without a host address is published on 0.0.0.0 and
        :: (see ``publish_addresses``): one PublishedPort per address, the same host port on
        both. Ports on IPv6 addresses are left to the proxy (``PublishedPort.in_firewall``).
        Internal networks publish nothing; nor do macvlan/ipvlan ones, silently, as Docker
        ignores ``-p`` there (the container's own address on the LAN serves its ports).
        ``proxy_only``: the (container port, proto) in transparent proxy mode, served by the
        userland proxy alone (no DNAT; the return path is installed while any exists)."""
        with self._lock:
            self._require_ready()
            key = endpoint_key(container_id, endpoint.network_id or self.default_network.id)
            current = self._st.endpoints.get(key)
            if current is None or current.state != READY or current.ip != endpoint.ip:
                raise NotFound(f"container {container_id[:12]} has no such endpoint")
            net = self._st.networks[current.network_id]
            if not net.is_bridge:
                if bindings:
                    log.info("%s network %s: ports not published", net.driver, net.name)
                return []
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
                (b, publish_addresses(b.host_ip, net.host_binding_ipv4, proxy, has_ipv6))
                for b in bindings
            ]
            # Docker 28's routed mode: a family routed on this network opens the container's
            # port to direct routing and uses no host port (docs: "Gateway modes").
            routed, requests = routed_ports(container_id, net, current, requests)
            new: list[PublishedPort] = []
            # The host addresses this engine holds, by (proto, port): one look-up per candidate
            # port, not a scan of every published port (1,000 ports: 1,000² comparisons).
            held: dict[tuple[str, int], list[str]] = {}
            for ports in self._st.ports.values():
                for p in ports:
                    held.setdefault((p.proto, p.host_port), []).append(p.host_ip)

            def taken(proto: str, host_ip: str, port: int) -> bool:
                return any(host_addresses_overlap(h, host_ip) for h in held.get((proto, port), ()))

            ipv6: bool | None = None
            try:
                for b, addresses in requests:
                    if ipv6 is None and addresses == [ANY_IPV4, ANY_IPV6]:
                        ipv6 = host_has_ipv6()  # once per publish, not once per port
                    reserved: list[PortReservation] = (
                        reserve_dual_stack_port(b.proto, b.host_port, b.host_port_end, taken, ipv6)
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
                            (b.container_port, b.proto) in proxy_only,
                            res.sock,
                        )
                        for res in reserved
                    ]
                    for res in reserved:
                        held.setdefault((b.proto, res.host_port), []).append(res.host_ip)
                new += routed
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
            if any(p.proxy_only for p in new):
                try:
                    self._sync_return_path()
                except BaseException:  # nothing half-applied: the ports go again
                    kept = self._st.ports[container_id]
                    self._st.ports[container_id] = [p for p in kept if all(p is not n for n in new)]
                    self._save()
                    self._firewall.remove_mappings(firewall_mappings(new))
                    close_ports(new)
                    raise
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
            if any(p.proxy_only for p in ports):
                self._sync_return_path()
