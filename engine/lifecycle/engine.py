"""The engine: composes images, netd, the proxy supervisor and the runtime into a lifecycle.

Data flows one way: the API calls the engine; the engine calls netd, the proxy supervisor and the
runtime; they talk to the kernel and runc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import errors
from common.jsonstate import write_json_atomic
from common.reference import normalize
from common.timefmt import unix_time, utc_rfc3339
from engine.images.store import ImageConflict, ImageStore
from engine.lifecycle.containers import (
    Container,
    ContainerConflict,
    ContainerNotFound,
    ContainerState,
    ContainerStore,
    NetworkAttachment,
    NetworkRecord,
    PublishedPortRecord,
)
from engine.lifecycle.networking import (
    NetworkRequestError,
    attachment_for,
    dns_names,
    plan_attachments,
    proxy_protocol_for,
    proxy_protocol_labels,
)
from engine.runtime import bundle, rootfs, seccomp, userdb
from engine.runtime.jsonlog import JsonLogReader, LogEntry, LogOptions, parse_log_config
from engine.runtime.runc import ExitStatus, RuncError, Runtime
from netd.controller import Endpoint, NetdError, Network, NetworkController, PublishedPort
from netd.dns.resolvconf import HOST_RESOLV_CONF, container_resolv_conf
from netd.errors import Forbidden
from netd.errors import NotFound as NetworkNotFound
from netd.portspec import PortBinding, from_docker_port_bindings
from proxy.supervisor import ProxyError, ProxySpec, ProxySupervisor

if TYPE_CHECKING:
    from netd.dns.service import EmbeddedDns

log = logging.getLogger("pyengined.engine")


class InvalidParameter(errors.InvalidParameter):
    """Bad input from a client: the API answers 400."""


class NotRunning(errors.Conflict):
    """An operation that needs a running container: the API answers 409."""


class DaemonShuttingDown(Exception):
    """A wait the daemon's shutdown cut short."""


# How long an auto-removal waits for attached clients to read a container's last output.
ATTACH_DRAIN_TIMEOUT = 10.0
LOG_POLL_INTERVAL = 0.05
WAIT_CONDITIONS = ("not-running", "next-exit", "removed")


@dataclass
class _Lifecycle:
    """What waiters of one container wait on. Every change pulses ``changed``; a waiter
    re-checks its own condition after each pulse, so no change is missed between checks."""

    exits: int = 0  # runs that ended since this daemon started
    removed: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    attached: set[asyncio.Event] = field(default_factory=set)  # open attach streams

    def pulse(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.changed.wait()


@dataclass
class EngineConfig:
    data_root: Path
    userland_proxy: bool = True
    runc: str = "runc"
    # Docker's --live-restore: containers keep running across a daemon restart.
    live_restore: bool = True
    # Docker's --dns: nameservers for containers (default bridge: in their resolv.conf; user-
    # defined networks: the embedded DNS server's upstreams). Empty: the host's.
    dns_servers: list[str] = field(default_factory=list)


def parse_signal(sig: str) -> str:
    """'KILL', 'SIGKILL' or '9' → 'SIGKILL'; anything else is a 400."""
    try:
        if sig.isdigit():
            return signal.Signals(int(sig)).name
        return signal.Signals[
            sig.upper() if sig.upper().startswith("SIG") else f"SIG{sig.upper()}"
        ].name
    except (KeyError, ValueError) as e:
        raise InvalidParameter(f"Invalid signal: {sig}") from e


def _network_record(endpoint: Endpoint, published: list[PublishedPort]) -> NetworkRecord:
    """What a container's record keeps of its first endpoint and its published ports."""
    return NetworkRecord(
        ip=endpoint.ip,
        prefixlen=endpoint.prefixlen,
        gateway=endpoint.gateway,
        mac=endpoint.mac,
        netns_path=endpoint.netns_path,
        ports=[
            PublishedPortRecord(p.proto, p.host_ip, p.host_port, p.container_port)
            for p in published
        ],
    )


def _proxy_key(container_id: str, proto: str, host_ip: str, host_port: int) -> str:
    return f"{container_id}/{proto}/{host_ip}/{host_port}"


def exposed_ports(container: Container, image_config: dict[str, Any]) -> list[str]:
    """'80/tcp' keys: the image's ExposedPorts, the container's, and every published one."""
    keys = set(image_config.get("ExposedPorts") or {})
    keys |= set(container.config.get("ExposedPorts") or {})
    keys |= set(container.host_config.get("PortBindings") or {})
    return sorted(keys, key=lambda k: (int(k.split("/")[0]), k))


class Engine:
    def __init__(
        self,
        cfg: EngineConfig,
        images: ImageStore,
        network: NetworkController,
        proxies: ProxySupervisor,
        runtime: Runtime,
        dns: EmbeddedDns | None = None,
    ) -> None:
        self.cfg = cfg
        self.images = images
        self.network = network
        self.proxies = proxies
        self.runtime = runtime
        self.dns = dns  # the embedded DNS server of user-defined networks (None: host resolvers)
        self.containers = ContainerStore(cfg.data_root / "containers")
        self._lifecycles: dict[str, _Lifecycle] = {}
        self._closing = False  # the API is shutting down: streams and waits end now
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._net_lock = asyncio.Lock()
        # One lock per container id, held by every lifecycle operation (see _locked()).
        self._locks: dict[str, asyncio.Lock] = {}
        self._auto_removals: set[asyncio.Task[None]] = set()

    def _lifecycle(self, container_id: str) -> _Lifecycle:
        return self._lifecycles.setdefault(container_id, _Lifecycle())

    @contextlib.asynccontextmanager
    async def _locked(self, ref: str) -> AsyncIterator[Container]:
        """The container ``ref`` names, under its lock: lifecycle operations on one container
        run one after the other (moby: container.Lock()), so a start and a removal at the
        same moment cannot leave a running container without a record. It is looked up again
        under the lock: removed meanwhile, it is not found."""
        c = self.containers.get(ref)
        lock = self._locks.setdefault(c.id, asyncio.Lock())
        async with lock:
            try:
                c = self.containers.get(c.id)
            except ContainerNotFound:
                raise ContainerNotFound(ref) from None
            yield c

    # ---- daemon start and stop -------------------------------------------------------------

    async def recover(self) -> None:
        """After a start (netd's setup() has run: it kept the endpoints of live sandboxes and
        re-reserved their host ports). Containers a previous daemon left 'running':

        * with live restore, those whose monitor is still alive are adopted again: watched
          through a pidfd; in proxy mode their proxies, which kept serving while no daemon
          ran, are adopted too (the daemon's take_over() found them and handed their
          listening sockets to netd's setup()), and a port whose proxy is gone gets a new one;
        * those whose monitor ended while no daemon ran get the exit status it recorded;
        * without live restore (or when it was being removed), a live one is killed, as
          Docker does with containers it will not restore.
        """
        for c in self.containers.all():
            if c.state.status not in ("running", "removing"):
                continue
            alive = self.runtime.is_running(c.state.monitor_pid, self._exit_path(c))
            removing = c.state.status == "removing"
            adopt = alive and self.cfg.live_restore and not removing
            if adopt and (problem := self._proxy_protocol_problem(c)) is not None:
                log.warning("container %s cannot be restored: %s", c.id[:12], problem)
                adopt = False
            if adopt:
                await self._adopt(c)
                continue
            if alive:
                log.info("container %s was left running; stopping it", c.id[:12])
                with contextlib.suppress(RuncError):
                    await self.runtime.kill(c.id, "SIGKILL")
            else:
                log.info("container %s exited while the daemon was down", c.id[:12])
            c.state.status = "running"  # what _watch() ends
            await self._watch(c)
            if removing:
                with contextlib.suppress(ContainerNotFound):
                    await self.remove(c.id, force=True)
        # Proxies of containers that were not adopted (ended meanwhile, or removed).
        await self.proxies.stop_survivors()
        live = {c.id for c in self.containers.all() if c.state.running}
        for container_id in list(self.network.endpoints()):
            if container_id not in live:
                await self._netd(self.network.delete_endpoint, container_id)

    async def _adopt(self, c: Container) -> None:
        """Take a container a previous daemon left running under this daemon's care again."""
        log.info(
            "live restore: adopting container %s (monitor pid %d)", c.id[:12], c.state.monitor_pid
        )
        if c.id not in self.network.endpoints():
            log.warning("live restore: container %s lost its network endpoint", c.id[:12])
        published = await self._netd(self.network.published, c.id)
        if self.cfg.userland_proxy:
            for p in published:
                if p.sock is None:
                    continue
                key = _proxy_key(c.id, p.proto, p.host_ip, p.host_port)
                spec = self._proxy_spec(c, p)
                try:
                    # The proxy that kept serving while no daemon ran, or else a new one.
                    if await self.proxies.adopt_survivor(key, spec, p.sock) is None:
                        await self.proxies.start(key, spec, p.sock)
                except ProxyError as e:  # the container runs on; this one port is not served
                    log.warning("live restore: %s", e)
        # netd drops a mapping whose host port someone else took while no daemon held it.
        c.network.ports = [
            PublishedPortRecord(p.proto, p.host_ip, p.host_port, p.container_port)
            for p in published
        ]
        self.containers.save(c)
        self._lifecycle(c.id)
        self._watchers[c.id] = asyncio.create_task(self._watch(c))

    def end_streams(self) -> None:
        """The API server is stopping: end every log follow, attach and wait now, so that it
        does not wait for them (the containers are stopped afterwards, by shutdown())."""
        self._closing = True
        for lifecycle in self._lifecycles.values():
            lifecycle.pulse()

    async def shutdown(self) -> bool:
        """With live restore, leave running containers (and their monitors and proxies) alone
        and only stop watching them; otherwise stop them all, then their proxies. True when
        containers were left running: their network must stay up for them."""
        running = [c for c in self.containers.all() if c.state.running]
        if self.cfg.live_restore and running:
            log.info("live restore: leaving %d container(s) running", len(running))
            watchers = list(self._watchers.values())
            self._watchers.clear()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            # The proxies keep serving the published ports; the next daemon adopts them.
            await self.proxies.detach()
            return True
        await asyncio.gather(
            *(self.stop(c.id, timeout=10) for c in running), return_exceptions=True
        )
        await self.proxies.stop_all()
        return False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def create(
        self,
        name: str | None,
        config: dict[str, Any],
        host_config: dict[str, Any],
        endpoints_config: dict[str, Any] | None = None,
    ) -> Container:
        image_ref = config.get("Image") or ""
        if not image_ref:
            raise InvalidParameter("No image specified")
        image = self.images.get(image_ref)
        mode = host_config.get("NetworkMode") or ""
        try:
            networks = await self._netd(
                plan_attachments, mode, endpoints_config, self.network.network
            )
        except NetworkRequestError as e:
            raise InvalidParameter(str(e)) from e
        self._check_proxy_protocol(config.get("Labels") or {})
        image_config = image.config.get("config") or {}
        bindings = self._bindings(host_config)  # validates the publish specs before anything exists
        del bindings
        self._log_options(host_config)
        cmd = config.get("Cmd") or None
        entrypoint = config.get("Entrypoint")
        if isinstance(cmd, str):
            cmd = [cmd]
        if isinstance(entrypoint, str):
            entrypoint = [entrypoint]
        try:
            args, env, cwd, user = bundle.image_process(
                image_config, cmd, entrypoint, config.get("Env") or []
            )
        except ValueError as e:
            raise InvalidParameter(str(e)) from e
        name = self.containers.check_name(name) if name else self.containers.generate_name()
        container_id = self.containers.new_id()
        merged = dict(config)
        merged.update(
            Image=image_ref,
            Env=env,
            Cmd=cmd if cmd is not None else image_config.get("Cmd"),
            Entrypoint=entrypoint if entrypoint is not None else image_config.get("Entrypoint"),
            WorkingDir=config.get("WorkingDir") or cwd,
            User=config.get("User") or user,
            Hostname=config.get("Hostname") or container_id[:12],
            StopSignal=config.get("StopSignal") or image_config.get("StopSignal") or "SIGTERM",
            Labels={**(image_config.get("Labels") or {}), **(config.get("Labels") or {})},
        )
        container = Container(
            id=container_id,
            name=name,
            created=utc_rfc3339(digits=6),
            image=image_ref,
            image_id=image.id,
            config=merged,
            host_config={**host_config, "NetworkMode": mode or "default"},
            args=args,
            networks=networks,
        )
        self.containers.add(container)
        self._lifecycle(container.id)
        return container

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

    def _proxy_spec(self, c: Container, p: PublishedPort) -> ProxySpec:
        labels = c.config.get("Labels") or {}
        return ProxySpec(
            p.proto,
            p.host_ip,
            p.host_port,
            p.container_ip,
            p.container_port,
            proxy_protocol=proxy_protocol_for(labels, p.container_port, p.proto) or None,
        )

    def _bindings(self, host_config: dict[str, Any]) -> list[PortBinding]:
        try:
            return from_docker_port_bindings(host_config.get("PortBindings") or {})
        except ValueError as e:
            raise InvalidParameter(str(e)) from e

    @staticmethod
    def _log_options(host_config: dict[str, Any]) -> LogOptions:
        try:
            return parse_log_config(host_config.get("LogConfig"))
        except ValueError as e:
            raise InvalidParameter(str(e)) from e

    def _publish_all_bindings(self, container: Container) -> list[PortBinding]:
        bindings = self._bindings(container.host_config)
        if container.host_config.get("PublishAllPorts"):
            image = self.images.get(container.image_id)
            bound = {(b.container_port, b.proto) for b in bindings}
            for key in exposed_ports(container, image.config.get("config") or {}):
                port, _, proto = key.partition("/")
                if (int(port), proto or "tcp") not in bound:
                    bindings.append(PortBinding(container_port=int(port), proto=proto or "tcp"))
        return bindings

    async def start(self, ref: str) -> Container:
        async with self._locked(ref) as c:
            return await self._start_locked(c)

    async def _start_locked(self, c: Container) -> Container:
        if c.state.running:
            return c
        if c.state.status == "removing":
            raise ContainerConflict(f"container {c.id[:12]} is marked for removal")
        try:
            self._check_proxy_protocol(c.config.get("Labels") or {})
            await self._start(c)
        except BaseException:
            if c.host_config.get("AutoRemove"):
                # As Docker: a container that was to be removed when it ends goes when its
                # start fails, too.
                with contextlib.suppress(Exception):
                    await self._remove_locked(c, force=True)
            raise
        return c

    async def _start(self, c: Container) -> None:
        cdir = self.containers.dir(c)
        bundle_dir = cdir / "bundle"
        rootfs_dir = bundle_dir / "rootfs"
        image = self.images.get(c.image_id)
        undo: list[Any] = []
        try:
            endpoints = await self._connect_all(c, undo)
            endpoint = endpoints[0]
            embedded_dns = await self._start_dns(c, endpoints, undo)
            published = await self._netd(
                self.network.publish, c.id, endpoint, self._publish_all_bindings(c)
            )
            if self.cfg.userland_proxy:
                for p in published:
                    key = _proxy_key(c.id, p.proto, p.host_ip, p.host_port)
                    undo.append(lambda key=key: self.proxies.stop(key))
                    await self.proxies.start(key, self._proxy_spec(c, p), p.sock)
            c.network = _network_record(endpoint, published)
            layers = self.images.layer_dirs(image)
            for sub in ("upper", "work"):
                (cdir / "overlay" / sub).mkdir(parents=True, exist_ok=True)
            rootfs_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(
                rootfs.mount_overlay,
                layers,
                cdir / "overlay" / "upper",
                cdir / "overlay" / "work",
                rootfs_dir,
            )
            undo.append(lambda: asyncio.to_thread(rootfs.unmount, rootfs_dir))
            try:
                # The image's files are untrusted: read off the loop, bounded (userdb).
                user = await asyncio.to_thread(
                    userdb.resolve_user, rootfs_dir, c.config.get("User") or ""
                )
            except ValueError as e:
                raise InvalidParameter(str(e)) from e
            files = bundle.write_network_files(
                cdir,
                c.config["Hostname"],
                endpoint.ip,
                resolv_conf=self._embedded_resolv_conf() if embedded_dns else self._resolv_conf(),
            )
            spec = bundle.runtime_spec(
                rootfs=rootfs_dir,
                args=c.args,
                env=c.config.get("Env") or [],
                cwd=c.config.get("WorkingDir") or "/",
                user=user,
                hostname=c.config["Hostname"],
                netns_path=endpoint.netns_path,
                bind_files=files,
                cgroups_path=f"/pyengine/{c.id}",
                security=seccomp.parse_security_opts(c.host_config.get("SecurityOpt")),
            )
            write_json_atomic(bundle_dir / "config.json", spec)
            self._exit_path(c).unlink(missing_ok=True)
            monitor_pid, pid = await self.runtime.start(
                c.id,
                bundle_dir,
                self.log_path(c),
                self._exit_path(c),
                self._log_options(c.host_config),
            )
        except BaseException as e:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    await step()
            c.network = NetworkRecord()
            c.state.error = str(e)
            self.containers.save(c)
            if isinstance(e, NetdError) and not isinstance(e, NetworkNotFound):
                raise InvalidParameter(str(e)) from e
            raise
        c.state = ContainerState(
            status="running", pid=pid, monitor_pid=monitor_pid, started_at=utc_rfc3339(digits=6)
        )
        self.containers.save(c)
        self._lifecycle(c.id).pulse()
        self._watchers[c.id] = asyncio.create_task(self._watch(c))

    async def _watch(self, c: Container) -> None:
        status = await self.runtime.wait(c.state.monitor_pid, self._exit_path(c))
        await self._release(c)
        self._mark_exited(c, status)
        self._watchers.pop(c.id, None)
        if c.host_config.get("AutoRemove"):
            # A task of its own: the removal takes the container's lock, whose holder (an
            # rm -f, say) may be waiting for this watcher to end.
            task = asyncio.create_task(self._auto_remove(c.id))
            self._auto_removals.add(task)
            task.add_done_callback(self._auto_removals.discard)

    async def _auto_remove(self, container_id: str) -> None:
        attached = list(self._lifecycle(container_id).attached)
        if attached:
            # Attached clients read the container's last output from its log file, which
            # the removal deletes: let them finish first.
            await asyncio.wait(
                [asyncio.ensure_future(done.wait()) for done in attached],
                timeout=ATTACH_DRAIN_TIMEOUT,
            )
        with contextlib.suppress(ContainerNotFound):
            async with self._locked(container_id) as c:
                if not c.state.running:  # not started again meanwhile
                    await self._remove_locked(c, force=True)

    async def _release(self, c: Container) -> None:
        """Give back what a running container held: proxies, ports, veth, netns, rootfs mount."""
        for p in c.network.ports:
            await self.proxies.stop(_proxy_key(c.id, p.proto, p.host_ip, p.host_port))
        await self._stop_dns(c)
        await self._netd(self.network.delete_endpoint, c.id)
        await asyncio.to_thread(rootfs.unmount, self.containers.dir(c) / "bundle" / "rootfs")

    def _mark_exited(self, c: Container, status: ExitStatus) -> None:
        c.state.status = "exited"
        c.state.exit_code = status.exit_code
        c.state.finished_at = status.finished_at or utc_rfc3339(digits=6)
        c.state.error = status.error
        c.state.pid = 0
        c.network = NetworkRecord()
        self.containers.save(c)
        lifecycle = self._lifecycle(c.id)
        lifecycle.exits += 1
        lifecycle.pulse()

    def stop_timeout(self, c: Container, timeout: float | None) -> float:
        """The seconds a stop waits before SIGKILL: the request's, the container's, or 10."""
        if timeout is not None and timeout >= 0:
            return timeout
        configured = c.config.get("StopTimeout")
        return float(configured) if isinstance(configured, int) and configured >= 0 else 10.0

    async def stop(self, ref: str, timeout: float | None = None) -> bool:
        """Stop signal, then SIGKILL after ``timeout`` seconds. False when it was not running."""
        async with self._locked(ref) as c:
            return await self._stop_locked(c, timeout)

    async def _stop_locked(self, c: Container, timeout: float | None) -> bool:
        if not c.state.running:
            return False
        await self.runtime.stop(
            c.id,
            c.state.monitor_pid,
            self._exit_path(c),
            stop_signal=c.config.get("StopSignal") or "SIGTERM",
            timeout=self.stop_timeout(c, timeout),
        )
        await self._lifecycle(c.id).until(lambda: not c.state.running)
        return True

    async def restart(self, ref: str, timeout: float | None = None) -> Container:
        """Stop (when running), then start again: Docker's ``restart``."""
        async with self._locked(ref) as c:
            await self._stop_locked(c, timeout)
            return await self._start_locked(c)

    async def kill(self, ref: str, sig: str = "SIGKILL") -> None:
        c = self.containers.get(ref)
        if not c.state.running:
            raise NotRunning(f"Container {c.id} is not running")
        await self.runtime.kill(c.id, parse_signal(sig))

    async def remove(self, ref: str, force: bool = False) -> None:
        async with self._locked(ref) as c:
            await self._remove_locked(c, force)

    async def _remove_locked(self, c: Container, force: bool) -> None:
        if c.state.running:
            if not force:
                raise ContainerConflict(
                    f"You cannot remove a running container {c.id}. Stop the container before "
                    "attempting removal or force remove"
                )
            try:
                await self.runtime.kill(c.id, "SIGKILL")
            except RuncError:
                # It may have ended by itself just now; its watcher records that.
                if self.runtime.is_running(c.state.monitor_pid, self._exit_path(c)):
                    raise
            await self._lifecycle(c.id).until(lambda: not c.state.running)
        watcher = self._watchers.get(c.id)
        if watcher is not None and watcher is not asyncio.current_task():
            await watcher
        if c.id not in {x.id for x in self.containers.all()}:
            return  # AutoRemove got there first
        c.state.status = "removing"
        await asyncio.to_thread(rootfs.unmount, self.containers.dir(c) / "bundle" / "rootfs")
        self.containers.remove(c)
        self._locks.pop(c.id, None)  # a waiter still holding it finds the container gone
        lifecycle = self._lifecycles.pop(c.id, None) or _Lifecycle()
        lifecycle.removed = True  # waiters and attached streams hold it: they see this
        lifecycle.pulse()

    async def wait(self, ref: str, condition: str = "not-running") -> Callable[[], Awaitable[int]]:
        """Register a wait now; the returned coroutine function waits and gives the exit code.

        Two steps, because Docker's clients send ``wait?condition=next-exit`` before ``start``
        and expect it anchored at the moment the daemon answered the status line.
        """
        c = self.containers.get(ref)
        if condition not in WAIT_CONDITIONS:
            raise InvalidParameter(f"invalid condition: {condition!r}")
        lifecycle = self._lifecycle(c.id)
        exits = lifecycle.exits

        def reached() -> bool:
            if lifecycle.removed:
                return True
            if condition == "removed":
                return False
            if condition == "next-exit":
                return lifecycle.exits > exits
            return not c.state.running

        async def result() -> int:
            await lifecycle.until(lambda: reached() or self._closing)
            if not reached():
                raise DaemonShuttingDown("the daemon is shutting down")
            return c.state.exit_code

        return result

    def image_users(self, image_id: str) -> list[Container]:
        return [c for c in self.containers.all() if c.image_id == image_id]

    async def remove_image(self, ref: str, force: bool = False) -> list[str]:
        """Docker's ``rmi``: untag, and delete the image unless a container needs it."""
        image = await asyncio.to_thread(self.images.get, ref)
        try:
            named_tag = normalize(ref) in image.repo_tags
        except ValueError:
            named_tag = False
        if not (named_tag and len(image.repo_tags) > 1):  # the image itself would go
            short = image.short_id
            users = self.image_users(image.id)
            running = [c for c in users if c.state.running]
            if running:
                raise ImageConflict(
                    f"conflict: unable to delete {short} (cannot be forced) - image is being "
                    f"used by running container {running[0].id[:12]}"
                )
            if users and not force:
                if named_tag:
                    raise ImageConflict(
                        f'conflict: unable to remove repository reference "{ref}" (must force) '
                        f"- container {users[0].id[:12]} is using its referenced image {short}"
                    )
                raise ImageConflict(
                    f"conflict: unable to delete {short} (must be forced) - image is being "
                    f"used by stopped container {users[0].id[:12]}"
                )
        return await asyncio.to_thread(self.images.remove, ref, force)

    # ---- networks --------------------------------------------------------------------------

    def attachments(self, c: Container) -> list[NetworkAttachment]:
        """The networks ``c`` joins when it starts, its ``eth0`` first (a record written before
        networks existed has none: the default network)."""
        if c.networks:
            return c.networks
        default = self.network.default_network
        return [NetworkAttachment(default.id, default.name)]

    def endpoints(self, c: Container) -> list[Endpoint]:
        """The running container's endpoints, ``eth0`` first ([] when it is not running)."""
        if not c.state.running:
            return []
        return self.network.container_endpoints(c.id)

    def networks(self) -> list[Network]:
        return self.network.networks()

    def find_network(self, ref: str) -> Network:
        return self.network.network(ref)

    def network_endpoints(self, network: Network) -> list[tuple[Container | None, Endpoint]]:
        out: list[tuple[Container | None, Endpoint]] = []
        for ep in self.network.network_endpoints(network.id):
            try:
                out.append((self.containers.get(ep.container_id), ep))
            except ContainerNotFound:
                out.append((None, ep))
        return out

    async def create_network(self, **request: Any) -> Network:
        """A user-defined bridge network (netd's ``create_network`` arguments)."""
        network: Network = await self._netd(lambda: self.network.create_network(**request))
        return network

    async def remove_network(self, ref: str) -> None:
        network = self.find_network(ref)
        await self._netd(self.network.remove_network, network.id)

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
                )
            except NetworkNotFound:
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
        if self.dns is None or ep.network_id == self.network.default_network.id:
            return
        self.dns.set_endpoint(
            ep.network_id,
            c.id,
            self._names_on(c, ep.network_id),
            [ep.ip],
            [ep.ipv6] if ep.ipv6 else [],
        )

    def _uses_embedded_dns(self, c: Container) -> bool:
        """Docker: a container whose first network is user-defined asks 127.0.0.11."""
        return self.dns is not None and (
            self.attachments(c)[0].network_id != self.network.default_network.id
        )

    async def _start_dns(self, c: Container, endpoints: list[Endpoint], undo: list[Any]) -> bool:
        """Names on every user-defined network, and the container's own DNS server when its
        first network is one. True when its resolv.conf must point at that server."""
        if self.dns is None:
            return False
        dns = self.dns
        for ep in endpoints:
            self._register_names(c, ep)
        undo.append(lambda: self._stop_dns(c))
        if not self._uses_embedded_dns(c):
            return False
        await dns.attach(c.id, endpoints[0].netns_path)
        return True

    async def _stop_dns(self, c: Container) -> None:
        if self.dns is None:
            return
        self.dns.forget(c.id)
        await self.dns.detach(c.id)

    def _resolv_conf(self) -> str | None:
        """A default-bridge container's resolv.conf when --dns is set (else the host's)."""
        if not self.cfg.dns_servers:
            return None
        return "".join(f"nameserver {server}\n" for server in self.cfg.dns_servers)

    @staticmethod
    def _embedded_resolv_conf() -> str:
        try:
            host = HOST_RESOLV_CONF.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            host = ""
        return container_resolv_conf(host)

    async def restore_names(self) -> None:
        """After recover(): the running containers' names on their user-defined networks, and
        their DNS servers (they lived in the previous daemon's process)."""
        if self.dns is None:
            return
        for c in self.containers.all():
            endpoints = self.endpoints(c)
            if not endpoints:
                continue
            for ep in endpoints:
                self._register_names(c, ep)
            if self._uses_embedded_dns(c):
                try:
                    await self.dns.attach(c.id, endpoints[0].netns_path)
                except NetdError as e:
                    log.warning("cannot restore the DNS server of %s: %s", c.id[:12], e)

    async def close_dns(self) -> None:
        if self.dns is not None:
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
            try:
                attachment = attachment_for(network, endpoint_config)
            except NetworkRequestError as e:
                raise InvalidParameter(str(e)) from e
            if any(a.network_id == network.id for a in self.attachments(c)):
                raise Forbidden(
                    f"endpoint with name {c.name} already exists in network {network.name}"
                )
            if c.state.running:
                ep = await self._netd(
                    self.network.connect,
                    c.id,
                    network.id,
                    attachment.ip or None,
                    attachment.aliases,
                    attachment.ip6 or None,
                )
                c.networks = [*self.attachments(c), attachment]
                self._register_names(c, ep)
            else:
                c.networks = [*self.attachments(c), attachment]
            self.containers.save(c)

    async def disconnect(self, container_ref: str, network_ref: str, force: bool = False) -> None:
        """Docker's ``network disconnect``: the interface goes now (and the ports published
        through it); a stopped container forgets the network."""
        async with self._locked(container_ref) as c:
            try:
                network_id = self.find_network(network_ref).id
            except NetworkNotFound:
                if not force:
                    raise
                network_id = ""
            attachments = self.attachments(c)
            kept = [a for a in attachments if a.network_id != network_id]
            if len(kept) == len(attachments):
                raise NetworkNotFound(
                    f"container {c.name} is not connected to network {network_ref}"
                )
            if c.state.running:
                published = await self._netd(self.network.published, c.id)
                for p in published:
                    if p.network_id == network_id:
                        await self.proxies.stop(_proxy_key(c.id, p.proto, p.host_ip, p.host_port))
                if self.dns is not None:
                    self.dns.remove_endpoint(network_id, c.id)
                await self._netd(self.network.disconnect, c.id, network_id)
                self._refresh_network_record(c)
            c.networks = kept
            self.containers.save(c)

    def _refresh_network_record(self, c: Container) -> None:
        """``c.network`` after a disconnect: its first endpoint left, and the ports still
        published."""
        endpoints = self.network.container_endpoints(c.id)
        published = self.network.published(c.id)
        if not endpoints:
            c.network = NetworkRecord(netns_path=c.network.netns_path)
            return
        c.network = _network_record(endpoints[0], published)

    async def rename(self, ref: str, new_name: str) -> None:
        """Docker's ``rename``; the embedded DNS answers the new name at once."""
        async with self._locked(ref) as c:
            if new_name.lstrip("/") == c.name:
                raise InvalidParameter(
                    "Renaming a container with the same name as its current name"
                )
            try:
                c.name = self.containers.check_name(new_name)
            except ValueError as e:
                raise InvalidParameter(str(e)) from e
            self.containers.save(c)
            for ep in self.endpoints(c):
                self._register_names(c, ep)

    # ---- output --------------------------------------------------------------------------

    def log_path(self, c: Container) -> Path:
        return self.containers.dir(c) / "container.log"

    async def logs(
        self,
        ref: str,
        follow: bool,
        tail: int | None,
        since: float = 0.0,
        until: float = 0.0,
    ) -> AsyncIterator[LogEntry]:
        """Entries of the container's json-file log: the last ``tail`` (all when None) of those
        written in [since, until) (0: unbounded), then with ``follow`` new ones until it exits."""
        c = self.containers.get(ref)
        reader = JsonLogReader(self.log_path(c))
        try:
            async for entry in self._logs(c, reader, follow, tail, since, until):
                yield entry
        finally:
            reader.close()

    async def _logs(
        self,
        c: Container,
        reader: JsonLogReader,
        follow: bool,
        tail: int | None,
        since: float,
        until: float,
    ) -> AsyncIterator[LogEntry]:
        def wanted(entry: LogEntry) -> bool:
            if not (since or until):
                return True
            t = unix_time(entry.time)
            return (not since or t >= since) and (not until or t < until)

        # A log has no size bound: read it in a thread, in bounded pieces (engine.runtime.jsonlog).
        if tail is not None:
            for entry in await asyncio.to_thread(reader.tail, tail, wanted):
                yield entry
        else:
            async for entry in _read_caught_up(reader):
                if wanted(entry):
                    yield entry
        if not follow:
            return
        while True:
            running = c.state.running
            got = False
            async for entry in _read_caught_up(reader):
                got = True
                if wanted(entry):
                    yield entry
            if not running or self._closing:
                return  # the monitor writes all output before the exit is recorded
            if not got:
                await asyncio.sleep(LOG_POLL_INTERVAL)

    async def attach(self, ref: str, replay: bool, follow: bool) -> AsyncIterator[LogEntry]:
        """Output for an attached client: with ``replay`` what was written before, with
        ``follow`` what the container writes until its current (or, when it is not running,
        its next) run ends. An auto-removal waits for attached clients to read it all."""
        c = self.containers.get(ref)
        lifecycle = self._lifecycle(c.id)
        exits = lifecycle.exits
        path = self.log_path(c)
        reader = JsonLogReader(path, start_at_end=not replay)
        done = asyncio.Event()
        lifecycle.attached.add(done)
        try:
            async for entry in _read_caught_up(reader):
                yield entry
            if not follow:
                return
            while True:
                ended = lifecycle.exits > exits or lifecycle.removed
                got = False
                async for entry in _read_caught_up(reader):
                    got = True
                    yield entry
                if ended or self._closing:
                    return
                if not got:
                    await asyncio.sleep(LOG_POLL_INTERVAL)
        finally:
            reader.close()
            lifecycle.attached.discard(done)
            done.set()

    def _exit_path(self, c: Container) -> Path:
        return self.containers.dir(c) / "exit.json"

    async def _netd(self, fn: Any, *args: Any) -> Any:
        # pyroute2 and libnftables calls block: run them off the loop, one at a time.
        async with self._net_lock:
            return await asyncio.to_thread(fn, *args)


async def _read_caught_up(reader: JsonLogReader) -> AsyncIterator[LogEntry]:
    """What the reader finds until it has caught up with the writer, a bounded batch at a
    time, each read in a thread."""
    caught_up = False
    while not caught_up:
        batch, caught_up = await asyncio.to_thread(reader.read_batch)
        for entry in batch:
            yield entry


_JsonLogReader = JsonLogReader  # the name tests/test_logs.py imports
