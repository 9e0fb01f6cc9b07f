"""The lifecycle's side of the userland proxies: what each published port's proxy is asked to
serve (PROXY protocol, transparent mode, both families of a port), starting them as one batch
beside runc, and adopting the ones a previous daemon left running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from engine.lifecycle.base import EngineBase, InvalidParameter
from engine.lifecycle.containers import Container
from engine.lifecycle.networking import (
    NetworkRequestError,
    proxy_protocol_for,
    proxy_protocol_labels,
)
from engine.lifecycle.proxymode import (
    TRANSPARENT,
    check_proxy_mode_labels,
    own_subnets,
    proxy_mode_for,
)
from engine.lifecycle.proxyplan import proxy_groups
from netd import PublishedPort
from proxy.supervisor import HostLimitError, Listeners, ProxyError, ProxySpec

log = logging.getLogger(__name__)


class ProxyOps(EngineBase):
    def _check_proxy_protocol(self, labels: dict[str, Any]) -> None:
        """PROXY protocol labels must be well-formed, and need the userland proxy (only the
        proxy can add the header; kernel DNAT forwards packets as they are). Checked at
        create, and again at every start and live-restore adoption: the daemon may have been
        restarted with --userland-proxy=false since, and a backend that trusts PROXY headers
        must never get a client's raw bytes instead."""
        try:
            chosen = proxy_protocol_labels({str(k): str(v) for k, v in labels.items()})
        except NetworkRequestError as e:
            raise InvalidParameter(str(e)) from e
        check_proxy_mode_labels(labels, self.cfg.userland_proxy)
        if not self.cfg.userland_proxy and any(v != "off" for v in chosen.values()):
            raise InvalidParameter(
                "PROXY protocol (label pyengine.proxy-protocol) needs the userland proxy: "
                "this daemon runs with --userland-proxy=false"
            )

    def _proxy_protocol_problem(self, c: Container) -> str | None:
        try:
            self._check_proxy_protocol(c.config.get("Labels") or {})
        except InvalidParameter as e:
            return str(e)
        return None

    def _proxy_spec(self, c: Container, ports: Sequence[PublishedPort]) -> ProxySpec:
        """The spec of the proxy serving ``ports`` (one, or the 0.0.0.0 and :: pair of one
        port: engine/lifecycle/proxyplan.py)."""
        labels = c.config.get("Labels") or {}
        p = ports[0]
        mode = proxy_mode_for(labels, p.container_port, p.proto, self.cfg.userland_proxy_mode)
        return ProxySpec.of(
            p.mapping(),
            proxy_protocol_for(labels, p.container_port, p.proto) or None,
            ports[1].mapping() if len(ports) > 1 else None,
            transparent=mode == TRANSPARENT,
            transparent_skip=own_subnets(self.network.container_endpoints(c.id)),
        )

    def _proxy_batch(
        self, c: Container, published: Iterable[PublishedPort]
    ) -> list[tuple[str, ProxySpec, Listeners]]:
        """The proxies ``published`` needs (routed ports, without a host port, need none)."""
        return [
            (key, self._proxy_spec(c, ports), tuple(p.sock for p in ports if p.sock is not None))
            for key, ports in proxy_groups(c.id, published)
        ]

    @staticmethod
    async def _proxies_started(proxies: asyncio.Future[Any] | None) -> None:
        """Wait for the proxies a start began (netops.StartNetwork.proxies)."""
        if proxies is None:
            return
        try:
            await proxies
        except HostLimitError as e:  # nothing started: the request asks too much of the host
            raise InvalidParameter(str(e)) from None

    async def _undo_proxies(self, proxies: asyncio.Future[Any], keys: list[str]) -> None:
        if not proxies.done():
            proxies.cancel()
        await asyncio.gather(proxies, return_exceptions=True)
        await self.proxies.stop_many(keys)

    async def _adopt_proxies(self, c: Container, published: list[PublishedPort]) -> None:
        """Live restore: the proxies of ``c``'s ports that kept serving while no daemon ran are
        supervised again; a port whose proxy is gone (or serves something else) gets a new one."""
        for key, spec, sockets in self._proxy_batch(c, [p for p in published if p.sock]):
            try:
                if await self.proxies.adopt_survivor(key, spec, sockets) is None:
                    await self.proxies.start(key, spec, sockets)
            except ProxyError as e:  # the container runs on; this one port is not served
                log.warning("live restore: %s", e)
