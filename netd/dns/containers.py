"""What a container gets of DNS, by Docker's rules, for the engine to ask in one place:

* its names (name, aliases, short id) answer on the user-defined networks it is on, never on the
  default bridge (Docker's embedded DNS serves user-defined networks only);
* when its first network is user-defined it asks the embedded responder (127.0.0.11) inside its
  own namespace, and its resolv.conf says so;
* otherwise its resolv.conf is the daemon's ``--dns`` servers, or the host's without loopback
  nameservers;
* its own ``--dns``/``--dns-search``/``--dns-option`` replace those lists: on the default bridge
  in its resolv.conf, on a user-defined network its resolv.conf keeps 127.0.0.11 (with its search
  domains and options) and its responder forwards to its own servers;
* its /etc/hosts: its hostname on each of its addresses, and its ``--add-host`` entries, with
  ``host-gateway`` standing for the daemon's ``--host-gateway-ip``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from netd.dns.hosts import HOST_GATEWAY, ExtraHost, check_uts_name, hosts_file
from netd.dns.resolvconf import (
    HOST_RESOLV_CONF,
    DnsOverrides,
    bridge_resolv_conf,
    container_resolv_conf,
    host_mode_resolv_conf,
)
from netd.dns.service import EmbeddedDns
from netd.errors import NetdError
from netd.state import Endpoint

log = logging.getLogger(__name__)

NamesOn = Callable[[str], list[str]]
"""A container's names on one network (by network id): its name, aliases and short id."""


@dataclass(frozen=True)
class DnsRequest:
    """What a container asks of DNS and names (Docker's Config.Hostname/Domainname and
    HostConfig.Dns/DnsSearch/DnsOptions/ExtraHosts), checked."""

    hostname: str = ""
    domainname: str = ""
    overrides: DnsOverrides = field(default_factory=DnsOverrides)
    extra_hosts: tuple[ExtraHost, ...] = ()

    @classmethod
    def of(cls, config: dict[str, object], host_config: dict[str, object]) -> DnsRequest:
        """From a container's create body (its types already checked). Raises ValueError with
        Docker's message for an invalid entry."""

        def strings(value: object) -> list[str]:
            return [str(v) for v in value] if isinstance(value, list) else []

        hostname = str(config.get("Hostname") or "")
        domainname = str(config.get("Domainname") or "")
        check_uts_name(hostname, "hostname")
        check_uts_name(domainname, "domainname")
        overrides = DnsOverrides.parse(
            strings(host_config.get("Dns")),
            strings(host_config.get("DnsSearch")),
            strings(host_config.get("DnsOptions")),
        )
        extra = tuple(ExtraHost.parse(e) for e in strings(host_config.get("ExtraHosts")))
        return cls(hostname, domainname, overrides, extra)


@dataclass(frozen=True)
class ContainerFiles:
    """The texts of a container's /etc/resolv.conf and /etc/hosts."""

    resolv_conf: str
    hosts: str


class ContainerDns:
    def __init__(
        self,
        server: EmbeddedDns | None,
        default_network_id: str,
        dns_servers: Sequence[str] = (),
        host_resolv_conf: Path = HOST_RESOLV_CONF,
        host_gateway: Sequence[str] = (),
    ) -> None:
        """``server``: the embedded DNS (None: containers use the host's resolvers only);
        ``host_gateway``: what ``--add-host NAME:host-gateway`` names (at most one IPv4 and one
        IPv6 address; Docker's ``--host-gateway-ip``)."""
        self.server = server
        self.default_network_id = default_network_id
        self.dns_servers = list(dns_servers)
        self.host_resolv_conf = host_resolv_conf
        self.host_gateway = list(host_gateway)

    def register(self, container_id: str, ep: Endpoint, names: list[str]) -> None:
        """Make the container resolvable by ``names`` on ``ep``'s network."""
        if self.server is None or ep.network_id == self.default_network_id:
            return
        ipv6 = [ep.ipv6] if ep.ipv6 else []
        self.server.set_endpoint(ep.network_id, container_id, names, [ep.ip], ipv6)

    def unregister(self, network_id: str, container_id: str) -> None:
        """The container left the network: its names there go."""
        if self.server is not None:
            self.server.remove_endpoint(network_id, container_id)

    def uses_embedded(self, first_network_id: str) -> bool:
        return self.server is not None and first_network_id != self.default_network_id

    async def start(
        self,
        container_id: str,
        endpoints: Sequence[Endpoint],
        first_network_id: str,
        names_on: NamesOn,
        request: DnsRequest | None = None,
    ) -> ContainerFiles:
        """Register the container's names on every network and start its responder when it
        uses one. Returns its resolv.conf and hosts."""
        request = request or DnsRequest()
        hosts = self.hosts(request, endpoints)  # a missing host gateway fails before anything
        for ep in endpoints:
            self.register(container_id, ep, names_on(ep.network_id))
        embedded = self.uses_embedded(first_network_id)
        if embedded:
            assert self.server is not None
            await self.server.attach(
                container_id, endpoints[0].netns_path, request.overrides.upstreams()
            )
        resolv_conf = await asyncio.to_thread(self.resolv_conf, embedded, request.overrides)
        return ContainerFiles(resolv_conf, hosts)

    def hosts(self, request: DnsRequest, endpoints: Sequence[Endpoint]) -> str:
        """The container's /etc/hosts. Raises NetdError when an entry names host-gateway and
        the daemon has no host gateway address."""
        extra: list[ExtraHost] = []
        for entry in request.extra_hosts:
            if entry.ip != HOST_GATEWAY:
                extra.append(entry)
                continue
            if not self.host_gateway:
                raise NetdError("unable to derive the IP value for host-gateway")
            extra += [ExtraHost(entry.name, ip) for ip in self.host_gateway]
        addresses = [ip for ep in endpoints for ip in (ep.ip, ep.ipv6) if ip]
        return hosts_file(request.hostname, request.domainname, addresses, extra)

    async def restore(
        self,
        container_id: str,
        endpoints: Sequence[Endpoint],
        first_network_id: str,
        names_on: NamesOn,
        overrides: DnsOverrides | None = None,
    ) -> None:
        """A running container adopted after a daemon restart: its names, and its responder
        (it lived in the previous daemon's process), forwarding to its own ``--dns`` servers
        when it has some. A responder that cannot start is logged: the container runs on."""
        if self.server is None or not endpoints:
            return
        for ep in endpoints:
            self.register(container_id, ep, names_on(ep.network_id))
        if self.uses_embedded(first_network_id):
            try:
                upstreams = overrides.upstreams() if overrides else None
                await self.server.attach(container_id, endpoints[0].netns_path, upstreams)
            except NetdError as e:
                log.warning("cannot restore the DNS server of %s: %s", container_id[:12], e)

    async def stop(self, container_id: str) -> None:
        """The container stopped: its names on every network, and its responder, go."""
        if self.server is None:
            return
        self.server.forget(container_id)
        await self.server.detach(container_id)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def host_mode_resolv_conf(self, overrides: DnsOverrides) -> str:
        """A host-network container's resolv.conf (reads the host's; off the event loop)."""
        try:
            host = self.host_resolv_conf.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            host = ""
        return host_mode_resolv_conf(host, overrides)

    def resolv_conf(self, embedded: bool, overrides: DnsOverrides | None = None) -> str:
        """The container's resolv.conf (reads the host's; call it off the event loop)."""
        try:
            host = self.host_resolv_conf.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            host = ""
        if embedded:
            return container_resolv_conf(host, overrides=overrides)
        return bridge_resolv_conf(host, self.dns_servers, overrides)
