"""What a container gets of DNS, by Docker's rules, for the engine to ask in one place:

* its names (name, aliases, short id) answer on the user-defined networks it is on, never on the
  default bridge (Docker's embedded DNS serves user-defined networks only);
* when its first network is user-defined it asks the embedded responder (127.0.0.11) inside its
  own namespace, and its resolv.conf says so;
* otherwise its resolv.conf is the daemon's ``--dns`` servers, or the host's without loopback
  nameservers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from netd.dns.resolvconf import HOST_RESOLV_CONF, bridge_resolv_conf, container_resolv_conf
from netd.dns.service import EmbeddedDns
from netd.errors import NetdError
from netd.state import Endpoint

log = logging.getLogger(__name__)

NamesOn = Callable[[str], list[str]]
"""A container's names on one network (by network id): its name, aliases and short id."""


class ContainerDns:
    def __init__(
        self,
        server: EmbeddedDns | None,
        default_network_id: str,
        dns_servers: Sequence[str] = (),
        host_resolv_conf: Path = HOST_RESOLV_CONF,
    ) -> None:
        """``server``: the embedded DNS (None: containers use the host's resolvers only)."""
        self.server = server
        self.default_network_id = default_network_id
        self.dns_servers = list(dns_servers)
        self.host_resolv_conf = host_resolv_conf

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
    ) -> str:
        """Register the container's names on every network and start its responder when it
        uses one. Returns its resolv.conf."""
        for ep in endpoints:
            self.register(container_id, ep, names_on(ep.network_id))
        embedded = self.uses_embedded(first_network_id)
        if embedded:
            assert self.server is not None
            await self.server.attach(container_id, endpoints[0].netns_path)
        return await asyncio.to_thread(self.resolv_conf, embedded)

    async def restore(
        self,
        container_id: str,
        endpoints: Sequence[Endpoint],
        first_network_id: str,
        names_on: NamesOn,
    ) -> None:
        """A running container adopted after a daemon restart: its names, and its responder
        (it lived in the previous daemon's process). A responder that cannot start is logged:
        the container runs on."""
        if self.server is None or not endpoints:
            return
        for ep in endpoints:
            self.register(container_id, ep, names_on(ep.network_id))
        if self.uses_embedded(first_network_id):
            try:
                await self.server.attach(container_id, endpoints[0].netns_path)
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

    def resolv_conf(self, embedded: bool) -> str:
        """The container's resolv.conf (reads the host's; call it off the event loop)."""
        if not embedded and self.dns_servers:
            return "".join(f"nameserver {server}\n" for server in self.dns_servers)
        try:
            host = self.host_resolv_conf.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            host = ""
        return container_resolv_conf(host) if embedded else bridge_resolv_conf(host)
