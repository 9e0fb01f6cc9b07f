"""The lifecycle's network side: endpoints on every network, published ports and their proxies,
the embedded DNS's names."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import errors
from common.ports import PortBinding, PortKey
from engine.lifecycle.base import InvalidParameter
from engine.lifecycle.containers import (
    Container,
    ContainerConflict,
    ContainerNotFound,
    NetworkAttachment,
    NetworkRecord,
)
from engine.lifecycle.netmodes import (
    BRIDGE,
    CONFLICT_HOST_NETWORK,
    CONFLICT_NO_NETWORK,
    CONFLICT_SHARED,
    CONTAINER,
    CONTAINER_PREFIX,
    HOST,
    MODE_NETWORKS,
    NONE,
    NetworkMode,
    is_mode_network,
    mode_network,
    mode_of,
)
from engine.lifecycle.networking import (
    NetworkNotFound,
    NetworkRequestError,
    attachment_for,
    dns_names,
)
from engine.lifecycle.proxymode import (
    transparent_keys,
)
from engine.lifecycle.proxyops import ProxyOps
from engine.lifecycle.proxyplan import proxy_keys
from engine.runtime import bundle
from netd import (
    ContainerFiles,
    DnsRequest,
    Endpoint,
    NetdError,
    Network,
    PublishedPort,
)

log = logging.getLogger("pyengined.engine")


def network_record(endpoint: Endpoint, published: list[PublishedPort]) -> NetworkRecord:
    """What a container's record keeps of its first endpoint and its published ports."""
    return NetworkRecord(
        ip=endpoint.ip,
        prefixlen=endpoint.prefixlen,
        gateway=endpoint.gateway,
        mac=endpoint.mac,
        netns_path=endpoint.netns_path,
        ports=[p.mapping() for p in published],
    )


@dataclass
class StartNetwork:
    """What a starting container's runtime spec gets of its network."""

    netns_path: str | None  # the namespace to join; None: its own (runc makes it) or the host's
    host: bool  # no network namespace: the host's
    files: dict[str, Path]  # /etc/hosts, /etc/hostname, /etc/resolv.conf -> the file bound there
    # The published ports' proxies, starting while runc starts the container (they need its
    # address only): awaited before the start is reported, a failure undoes the start.
    proxies: asyncio.Future[Any] | None = None


HOST_HOSTS = Path("/etc/hosts")
NETWORK_FILES = ("hosts", "hostname", "resolv.conf")


def _read_host_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _mode_endpoint(c: Container, network: Network) -> Endpoint:
    """A ``none``/``host`` container's place on its predefined network (no link, no address;
    a stable EndpointID derived from the two ids)."""
    endpoint_id = hashlib.sha256(f"{network.id}/{c.id}".encode()).hexdigest()
    return Endpoint(
        container_id=c.id,
        netns_name="",
        netns_path="",
        host_veth="",
        ip="",
        prefixlen=0,
        gateway="",
        mac="",
        network_id=network.id,
        network_name=network.name,
        id=endpoint_id,
    )


def exposed_ports(container: Container, image_config: dict[str, Any]) -> list[PortKey]:
    """The image's ExposedPorts, the container's, and every published one."""
    keys = {PortKey.parse(k) for k in image_config.get("ExposedPorts") or {} if _port_key(k)}
    keys |= {PortKey.parse(k) for k in container.config.get("ExposedPorts") or {}}
    keys |= {b.key for b in container.port_bindings}
    return sorted(keys)


def _port_key(text: str) -> bool:
    """Whether an image's ExposedPorts key is one pyengine understands (images are not checked
    at load: a key such as ``"53/sctp"`` is left out rather than failing the container)."""
    try:
        PortKey.parse(text)
    except ValueError:
        return False
    return True


class NetworkOps(ProxyOps):
    """Networks, endpoints, published ports and the embedded DNS's names, for the lifecycle."""

    def _publish_all_bindings(self, container: Container) -> list[PortBinding]:
        bindings = list(container.port_bindings)
        if container.host_config.get("PublishAllPorts"):
            image = self.images.get(container.image_id)
            bound = {b.key for b in bindings}
            for key in exposed_ports(container, image.config.get("config") or {}):
                if key not in bound:
                    bindings.append(PortBinding(key.port, key.proto))
        return bindings

    # ---- networks --------------------------------------------------------------------------

    def attachments(self, c: Container) -> list[NetworkAttachment]:
        """The networks ``c`` joins when it starts, its ``eth0`` first (a record written before
        networks existed has none: the default network). ``none`` and ``host`` are one
        attachment each (to show in inspect); ``container:`` mode has none."""
        if mode_of(c.host_config).kind == CONTAINER:
            return []
        if c.networks or c.detached:
            return c.networks
        default = self.network.default_network
        return [NetworkAttachment(default.id, default.name)]

    def endpoints(self, c: Container) -> list[Endpoint]:
        """The running container's endpoints, ``eth0`` first ([] when it is not running)."""
        if not c.state.running:
            return []
        return self.network.container_endpoints(c.id)

    def networks(self) -> list[Network]:
        return [*self.network.networks(), *MODE_NETWORKS.values()]

    def find_network(self, ref: str) -> Network:
        try:
            return self.network.network(ref)
        except errors.NotFound:
            found = mode_network(ref)
            if found is None:
                raise
            return found

    def network_files_dir(self, c: Container) -> Path:
        """Where ``c``'s hostname, hosts and resolv.conf are: a ``container:`` joiner uses
        its target's (moby initializeNetworking), every other container its own."""
        mode = mode_of(c.host_config)
        if mode.kind == CONTAINER:
            try:
                return self.containers.dir(self.containers.get(mode.ref))
            except ContainerNotFound:
                pass
        return self.containers.dir(c)

    def network_endpoints(self, network: Network) -> list[tuple[Container | None, Endpoint]]:
        out: list[tuple[Container | None, Endpoint]] = []
        if is_mode_network(network.id):
            # Docker lists the running containers of the mode, with an endpoint id and no
            # addresses (the sandbox joins the predefined network).
            for c in self.containers.all():
                if c.state.running and mode_of(c.host_config).kind == network.name:
                    out.append((c, _mode_endpoint(c, network)))
            return out
        for ep in self.network.network_endpoints(network.id):
            try:
                out.append((self.containers.get(ep.container_id), ep))
            except ContainerNotFound:
                out.append((None, ep))
        return out

    async def create_network(self, **request: Any) -> Network:
        """A user-defined bridge network (netd's ``create_network`` arguments)."""
        network: Network = await self._netd(lambda: self.network.create_network(**request))
        self._network_event(network, "create")
        return network

    async def remove_network(self, ref: str) -> None:
        network = self.find_network(ref)
        await self._netd(self.network.remove_network, network.id)
        self._network_event(network, "destroy")

    def _attachment_events(self, c: Container, action: str) -> None:
        """``connect`` when ``c`` starts and ``disconnect`` when it ends, per network, as
        Docker reports a container's endpoints coming and going."""
        for a in self.attachments(c):
            kind = {HOST: "host", NONE: "null"}.get(a.name, "bridge")
            attributes = {"container": c.id, "name": a.name, "type": kind}
            self.events.emit("network", action, a.network_id, attributes)

    def _network_event(self, network: Network, action: str, container_id: str = "") -> None:
        attributes = {"name": network.name, "type": "bridge"}
        if container_id:
            attributes["container"] = container_id
        self.events.emit("network", action, network.id, attributes)

    async def _start_network(self, c: Container, cdir: Path, undo: list[Any]) -> StartNetwork:
        """The starting container's network by its mode: endpoints, names, published ports and
        proxies on bridge networks; only the files and the namespace to use otherwise."""
        mode = mode_of(c.host_config)
        if mode.kind == BRIDGE and self.attachments(c):
            return await self._start_bridge(c, cdir, undo)
        if mode.kind in (NONE, BRIDGE):  # bridge: disconnected from all, loopback only
            request = self._dns_request(c.config, c.host_config)
            resolv_conf = await asyncio.to_thread(self.dns.resolv_conf, False, request.overrides)
            hosts = self.dns.hosts(request, [])
            files = bundle.write_network_files(cdir, c.config["Hostname"], hosts, resolv_conf)
            return StartNetwork(None, False, files)
        if mode.kind == HOST:
            # libnetwork gives a host-mode container copies of the host's own files; with
            # --add-host, a hosts file of its own; --dns* replace the host's lists
            # (sandbox_dns_unix.go buildHostsFile, setupDNS).
            request = self._dns_request(c.config, c.host_config)
            if request.extra_hosts:
                hosts = self.dns.hosts(request, [])
            else:
                hosts = await asyncio.to_thread(_read_host_file, HOST_HOSTS)
            resolv_conf = await asyncio.to_thread(self.dns.host_mode_resolv_conf, request.overrides)
            files = bundle.write_network_files(cdir, c.config["Hostname"], hosts, resolv_conf)
            return StartNetwork(None, True, files)
        target = self._network_target(c, mode.ref)
        # The joiner shares the target's hostname and its very files (moby
        # initializeNetworking: HostnamePath, HostsPath, ResolvConfPath are the target's).
        c.config["Hostname"] = target.config.get("Hostname") or target.id[:12]
        target_dir = self.containers.dir(target)
        files = {f"/etc/{name}": target_dir / name for name in NETWORK_FILES}
        path = target.network.netns_path or f"/proc/{target.state.pid}/ns/net"
        c.network = NetworkRecord(netns_path=path)
        return StartNetwork(path, False, files)

    def _mode_attachments(self, mode: NetworkMode) -> tuple[list[NetworkAttachment], str]:
        """At create, for a non-bridge mode: the attachments (``none`` or ``host``, to show in
        inspect; none in ``container:`` mode) and the NetworkMode to record (the target's full
        id, as Docker shows it)."""
        if mode.kind in (NONE, HOST):
            net = MODE_NETWORKS[mode.kind]
            return [NetworkAttachment(net.id, net.name)], mode.kind
        try:
            target = self.containers.get(mode.ref)
        except ContainerNotFound:
            # A 400, not a 404: the docker CLI takes a 404 from create for a missing image.
            raise NetworkRequestError(f"No such container: {mode.ref}") from None
        return [], f"{CONTAINER_PREFIX}{target.id}"

    def _network_target(self, c: Container, ref: str) -> Container:
        """The running container whose namespace ``c`` joins (moby getNetworkedContainer)."""
        try:
            target = self.containers.get(ref)
        except ContainerNotFound:
            raise errors.NotFound(
                f"joining network namespace of container: No such container: {ref}"
            ) from None
        if target.id == c.id:
            raise InvalidParameter("cannot join own network namespace")
        if not target.state.running:
            raise ContainerConflict(
                "cannot join network namespace of a non running container: "
                f"container {target.name} is {target.state.status}"
            )
        return target

    def _network_started(self, c: Container, pid: int) -> None:
        """After runc made the namespace of a ``none`` container: where it is."""
        kind = mode_of(c.host_config).kind
        if kind == NONE or (kind == BRIDGE and not self.attachments(c)):
            c.network = NetworkRecord(netns_path=f"/proc/{pid}/ns/net")

    async def _start_bridge(self, c: Container, cdir: Path, undo: list[Any]) -> StartNetwork:
        endpoints = await self._connect_all(c, undo)
        endpoint = endpoints[0]
        net_files = await self._start_dns(c, endpoints, undo)
        bindings = self._publish_all_bindings(c)
        proxy_only = transparent_keys(c.config.get("Labels") or {}, bindings, self.cfg)
        publish = functools.partial(self.network.publish, proxy_only=proxy_only)
        published = await self._netd(publish, c.id, endpoint, bindings)
        proxies = None
        if self.cfg.userland_proxy:
            batch = self._proxy_batch(c, published)
            proxies = asyncio.ensure_future(self.proxies.start_many(batch))
            undo.append(lambda: self._undo_proxies(proxies, [key for key, _, _ in batch]))
        c.network = network_record(endpoint, published)
        files = bundle.write_network_files(
            cdir, c.config["Hostname"], net_files.hosts, net_files.resolv_conf
        )
        return StartNetwork(endpoint.netns_path, False, files, proxies)

    async def _connect_all(self, c: Container, undo: list[Any]) -> list[Endpoint]:
        """Connect a starting container to each of its networks, ``eth0`` first."""
        endpoints: list[Endpoint] = []
        for a in self.attachments(c):
            try:
                ep = await self._netd(
                    self.network.connect,
                    c.id,
                    a.network_id,
                    a.ip or None,
                    a.aliases,
                    a.ip6 or None,
                    a.mac or None,
                )
            except errors.NotFound:
                raise NetworkNotFound(f"network {a.name} not found") from None
            if not endpoints:
                undo.append(lambda: self._netd(self.network.delete_endpoint, c.id))
            endpoints.append(ep)
        return endpoints

    def _names_on(self, c: Container, network_id: str) -> list[str]:
        for a in self.attachments(c):
            if a.network_id == network_id:
                return dns_names(c, a)
        return dns_names(c, NetworkAttachment(network_id, ""))

    def _register_names(self, c: Container, ep: Endpoint) -> None:
        """Make ``c`` resolvable on ``ep``'s network (user-defined networks only, as Docker)."""
        self.dns.register(c.id, ep, self._names_on(c, ep.network_id))

    @staticmethod
    def _dns_request(config: dict[str, Any], host_config: dict[str, Any]) -> DnsRequest:
        """The container's hostname, domainname, --dns* and --add-host, checked (a 400 with
        Docker's message at create)."""
        try:
            return DnsRequest.of(config, host_config)
        except ValueError as e:
            raise InvalidParameter(str(e)) from e

    async def _start_dns(
        self, c: Container, endpoints: list[Endpoint], undo: list[Any]
    ) -> ContainerFiles:
        """Names on every user-defined network, and the container's own DNS server when its
        first network is one. Returns its resolv.conf and hosts."""
        undo.append(lambda: self.dns.stop(c.id))
        first = self.attachments(c)[0].network_id
        request = self._dns_request(c.config, c.host_config)
        return await self.dns.start(
            c.id, endpoints, first, functools.partial(self._names_on, c), request
        )

    async def _rewrite_hosts(self, c: Container) -> None:
        """The running container's /etc/hosts names its addresses on the networks it is on now
        (Docker adds and deletes the lines on connect and disconnect). A file that cannot be
        rewritten is logged: the connect or disconnect itself happened."""
        try:
            hosts = self.dns.hosts(
                self._dns_request(c.config, c.host_config), self.network.container_endpoints(c.id)
            )
            await asyncio.to_thread(bundle.rewrite_hosts, self.containers.dir(c), hosts)
        except (OSError, NetdError, InvalidParameter) as e:
            log.warning("cannot update /etc/hosts of %s: %s", c.id[:12], e)

    async def restore_names(self) -> None:
        """After recover(): the running containers' names on their user-defined networks, and
        their DNS servers (they lived in the previous daemon's process)."""
        for c in self.containers.all():
            if mode_of(c.host_config).kind != BRIDGE:
                continue
            first = self.attachments(c)[0].network_id
            try:
                overrides = self._dns_request(c.config, c.host_config).overrides
            except InvalidParameter:
                overrides = None  # checked at create: only a hand-edited record gets here
            await self.dns.restore(
                c.id, self.endpoints(c), first, functools.partial(self._names_on, c), overrides
            )

    async def close_dns(self) -> None:
        await self.dns.close()

    async def connect(
        self,
        container_ref: str,
        network_ref: str,
        endpoint_config: dict[str, Any] | None = None,
    ) -> None:
        """Docker's ``network connect``: a running container gets a new interface now, a
        stopped one when it starts."""
        async with self._locked(container_ref) as c:
            network = self.find_network(network_ref)
            self._check_mode_allows(c, network, connect=True)
            try:
                attachment = attachment_for(network, endpoint_config)
            except NetworkRequestError as e:
                raise InvalidParameter(str(e)) from e
            current = self.attachments(c)
            if any(a.network_id == network.id for a in current):
                raise errors.Forbidden(
                    f"endpoint with name {c.name} already exists in network {network.name}"
                )
            if c.state.running and not current:
                raise errors.Conflict(
                    f"container {c.name} runs without a network: start it again to connect it"
                )
            c.detached = False
            if c.state.running:
                ep = await self._netd(
                    self.network.connect,
                    c.id,
                    network.id,
                    attachment.ip or None,
                    attachment.aliases,
                    attachment.ip6 or None,
                    attachment.mac or None,
                )
                c.networks = [*current, attachment]
                self._register_names(c, ep)
                await self._rewrite_hosts(c)
            else:
                c.networks = [*current, attachment]
            self.containers.save(c)
            self._network_event(network, "connect", c.id)

    async def disconnect(self, container_ref: str, network_ref: str, force: bool = False) -> None:
        """Docker's ``network disconnect``: the interface goes now (and the ports published
        through it); a stopped container forgets the network."""
        async with self._locked(container_ref) as c:
            try:
                network = self.find_network(network_ref)
            except errors.NotFound:
                if not force:
                    raise
                network_id = ""
            else:
                self._check_mode_allows(c, network, connect=False)
                network_id = network.id
            attachments = self.attachments(c)
            kept = [a for a in attachments if a.network_id != network_id]
            if len(kept) == len(attachments):
                raise NetworkNotFound(
                    f"container {c.name} is not connected to network {network_ref}"
                )
            if c.state.running:
                published = await self._netd(self.network.published, c.id)
                await self.proxies.stop_many(
                    proxy_keys(c.id, (p for p in published if p.network_id == network_id))
                )
                self.dns.unregister(network_id, c.id)
                await self._netd(self.network.disconnect, c.id, network_id)
                self._refresh_network_record(c)
                await self._rewrite_hosts(c)
            c.networks = kept
            c.detached = not kept
            self.containers.save(c)
            if network_id:
                self._network_event(network, "disconnect", c.id)

    def _check_mode_allows(self, c: Container, network: Network, connect: bool) -> None:
        """Docker's refusals of a connect or disconnect that involves a non-bridge mode (moby
        daemon/container_operations.go): only bridge networks connect to bridge-mode
        containers."""
        kind = mode_of(c.host_config).kind
        if network.name == HOST or kind == HOST:
            raise InvalidParameter(CONFLICT_HOST_NETWORK)
        if kind == CONTAINER:
            raise InvalidParameter(CONFLICT_SHARED)
        if network.name == NONE or kind == NONE:
            # none is the container's only network: nothing joins it, it is not left.
            if connect or kind != NONE:
                raise InvalidParameter(CONFLICT_NO_NETWORK)
            raise InvalidParameter(
                "a container in network mode none cannot be disconnected from it: "
                "recreate it on another network"
            )

    def _refresh_network_record(self, c: Container) -> None:
        """``c.network`` after a disconnect: its first endpoint left, and the ports still
        published."""
        endpoints = self.network.container_endpoints(c.id)
        published = self.network.published(c.id)
        if not endpoints:
            c.network = NetworkRecord(netns_path=c.network.netns_path)
            return
        c.network = network_record(endpoints[0], published)

    async def rename(self, ref: str, new_name: str) -> None:
        """Docker's ``rename``; the embedded DNS answers the new name at once."""
        async with self._locked(ref) as c:
            if new_name.lstrip("/") == c.name:
                raise InvalidParameter(
                    "Renaming a container with the same name as its current name"
                )
            old_name = c.name
            try:
                c.name = self.containers.check_name(new_name)
            except ValueError as e:
                raise InvalidParameter(str(e)) from e
            self.containers.save(c)
            self._event(c, "rename", oldName=f"/{old_name}")
            for ep in self.endpoints(c):
                self._register_names(c, ep)
