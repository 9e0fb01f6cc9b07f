"""The embedded DNS service the engine drives: one NameTable per network, one responder per
container on 127.0.0.11:53 inside the container's network namespace (Docker's embedded DNS).

A container's responder answers from the tables of the networks the container has an endpoint
on, and from no other: names never leak across networks. The scope is looked up on every query,
so ``set_endpoint`` (connect, rename, new alias) and ``remove_endpoint`` (disconnect) change the
answers at once, without restarting the responder.

Names outside the container's networks are forwarded to the upstreams only for a container with
a way out: at least one of its networks is not internal (Docker 26's fix of CVE-2024-29018,
where the daemon's resolvers gave containers of ``--internal`` networks a channel to the
outside). Like the scope, this is decided on every query. A container whose first network is
internal and which is also on the default bridge (which has no embedded DNS records) gets no
forwarding either: stricter than Docker, never looser.

The responders run on the caller's event loop (the daemon's). The record methods
(``set_endpoint``, ``remove_endpoint``, ``forget``) are synchronous and may also be called from
a worker thread: the bookkeeping is guarded by a lock, and each NameTable has its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netd.dns.records import NameTable, ScopedNames
from netd.dns.resolvconf import DNS_PORT, EMBEDDED_DNS, load_host_upstreams
from netd.dns.server import DnsResponder
from netd.errors import NetdError


@dataclass(frozen=True)
class NamespaceIdentity:
    """A network namespace as the kernel identifies it: the device and inode of its nsfs file
    (namespaces(7): two namespaces are the same one exactly when both match). A namespace
    re-created at the same /run/netns path is a different namespace."""

    device: int
    inode: int

    @classmethod
    def of(cls, netns_path: str) -> NamespaceIdentity:
        try:
            st = os.stat(netns_path)
        except OSError as exc:
            raise NetdError(f"network namespace {netns_path} does not exist: {exc}") from None
        return cls(st.st_dev, st.st_ino)


@dataclass
class AttachedResponder:
    """A container's running responder and the namespace it listens in."""

    netns_path: str
    namespace: NamespaceIdentity
    responder: DnsResponder


class EmbeddedDns:
    """Names of every network's containers, and the per-container responders answering them."""

    def __init__(
        self,
        upstreams: list[tuple[str, int]] | None = None,
        domain: str = "",
        listen: tuple[str, int] = (EMBEDDED_DNS, DNS_PORT),
        timeout: float = 2.0,
        is_internal: Callable[[str], bool] | None = None,
    ) -> None:
        """``is_internal(network_id)``: whether that network has no way out (the network
        controller's answer; it must not block, it is asked on the event loop)."""
        self.upstreams = list(load_host_upstreams() if upstreams is None else upstreams)
        self.domain = domain
        self.listen = listen
        self.timeout = timeout
        self.is_internal = is_internal or (lambda _network_id: False)
        self._lock = threading.Lock()  # guards _tables and _networks
        self._tables: dict[str, NameTable] = {}  # network id -> its names
        self._networks: dict[str, list[str]] = {}  # container id -> network ids, joining order
        self._attached: dict[str, AttachedResponder] = {}  # container id -> its responder
        self._attach_lock = asyncio.Lock()  # one attach/detach/close at a time

    # -- records ----------------------------------------------------------------------------

    def set_endpoint(
        self,
        network_id: str,
        container_id: str,
        names: list[str],
        ipv4: Sequence[str],
        ipv6: Sequence[str] = (),
    ) -> None:
        """Add or replace the container's record on the network (its name, aliases and short id,
        and its addresses there). Raises NetdError, changing nothing, on an invalid record."""
        if not network_id:
            raise NetdError("a DNS record needs a network id")
        with self._lock:
            table = self._tables.get(network_id)
            if table is None:
                table = NameTable()
            table.set(container_id, names, list(ipv4), list(ipv6))
            self._tables[network_id] = table
            joined = self._networks.setdefault(container_id, [])
            if network_id not in joined:
                joined.append(network_id)

    def remove_endpoint(self, network_id: str, container_id: str) -> None:
        """The container left the network: its names there go, and it no longer resolves the
        network's names. A no-op when it had no record there."""
        with self._lock:
            self._remove(network_id, container_id)

    def forget(self, container_id: str) -> None:
        """Remove the container's records on every network (it is being removed)."""
        with self._lock:
            for network_id in list(self._networks.get(container_id, ())):
                self._remove(network_id, container_id)

    def _remove(self, network_id: str, container_id: str) -> None:
        table = self._tables.get(network_id)
        if table is not None:
            table.remove(container_id)
            if not len(table):
                del self._tables[network_id]
        joined = self._networks.get(container_id)
        if joined is not None and network_id in joined:
            joined.remove(network_id)
            if not joined:
                del self._networks[container_id]

    def networks_of(self, container_id: str) -> list[str]:
        """The networks whose names the container resolves, in the order it joined them."""
        with self._lock:
            return list(self._networks.get(container_id, ()))

    def forwards_for(self, container_id: str) -> bool:
        """Whether the container's queries for other names go to the upstreams: it is on at
        least one network that is not internal."""
        with self._lock:
            joined = list(self._networks.get(container_id, ()))
        return any(not self.is_internal(n) for n in joined)

    def _tables_of(self, container_id: str) -> list[NameTable]:
        with self._lock:
            return [self._tables[n] for n in self._networks.get(container_id, ())]

    # -- responders -------------------------------------------------------------------------

    async def attach(
        self,
        container_id: str,
        netns_path: str,
        upstreams: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        """Answer the container's queries on ``listen`` inside its network namespace,
        forwarding the others to ``upstreams`` (the container's own ``--dns``; None: the
        service's).

        A no-op when it already has a responder in that same namespace; a responder in another
        namespace (the container was restarted) is replaced once the new one listens. Raises
        NetdError, with nothing new left open and the previous responder kept, on failure."""
        if not container_id:
            raise NetdError("attaching DNS needs a container id")
        async with self._attach_lock:
            namespace = NamespaceIdentity.of(netns_path)
            current = self._attached.get(container_id)
            if current is not None and current.namespace == namespace:
                return
            responder = DnsResponder(
                ScopedNames(lambda: self._tables_of(container_id)),
                self.listen,
                list(self.upstreams if upstreams is None else upstreams),
                self.domain,
                netns_path,
                self.timeout,
                forwarding=lambda: self.forwards_for(container_id),
            )
            await responder.start()
            self._attached[container_id] = AttachedResponder(netns_path, namespace, responder)
            if current is not None:
                await current.responder.close()

    async def detach(self, container_id: str) -> None:
        """Close the container's responder; a no-op when it has none."""
        async with self._attach_lock:
            attached = self._attached.pop(container_id, None)
            if attached is not None:
                await attached.responder.close()

    async def close(self) -> None:
        """Close every responder (the records stay)."""
        async with self._attach_lock:
            attached, self._attached = self._attached, {}
            await asyncio.gather(*(a.responder.close() for a in attached.values()))

    def responders(self) -> dict[str, DnsResponder]:
        """Container id -> its running responder (for status output and tests)."""
        return {cid: a.responder for cid, a in self._attached.items()}
