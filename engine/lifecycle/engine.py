"""The engine: composes images, netd, the proxy supervisor and the runtime into a lifecycle.

Data flows one way: the API calls the engine; the engine calls netd, the proxy supervisor and the
runtime; they talk to the kernel and runc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from common import errors
from common.jsonstate import write_json_atomic
from common.ports import PortBinding
from common.reference import normalize
from common.timefmt import unix_time, utc_rfc3339
from engine.images.store import ImageConflict
from engine.lifecycle.archive import Archive
from engine.lifecycle.base import (
    ATTACH_DRAIN_TIMEOUT,
    WAIT_CONDITIONS,
    DaemonShuttingDown,
    EngineBase,
    EngineConfig,
    InvalidParameter,
    LifecycleEvents,
    NotRunning,
    parse_signal,
)
from engine.lifecycle.containers import (
    Container,
    ContainerConflict,
    ContainerNotFound,
    ContainerState,
    NetworkRecord,
)
from engine.lifecycle.health import Health
from engine.lifecycle.healthcheck import merge as merge_healthcheck
from engine.lifecycle.limits import Limits, limits_of
from engine.lifecycle.netmodes import BRIDGE, HOST, check_mode_conflicts, mode_of
from engine.lifecycle.netops import NetworkOps, exposed_ports
from engine.lifecycle.networking import (
    NetworkRequestError,
    plan_attachments,
)
from engine.lifecycle.output import Output
from engine.lifecycle.proxyplan import proxy_keys
from engine.lifecycle.restarts import Restarts
from engine.lifecycle.stdio import stdio_options, tty_env
from engine.lifecycle.volumeops import VolumeOps
from engine.runtime import bundle, cgroups, rootfs, seccomp, userdb
from engine.runtime.jsonlog import LogEntry, LogOptions, parse_log_config
from engine.runtime.runc import ExitStatus, RuncError
from engine.volumes.parse import MountRequests, image_volume_paths
from netd import (
    NetdError,
)

log = logging.getLogger("pyengined.engine")

__all__ = [
    "DaemonShuttingDown",
    "Engine",
    "EngineBase",
    "EngineConfig",
    "InvalidParameter",
    "LogEntry",
    "NotRunning",
    "exposed_ports",
    "parse_signal",
]


class Engine(NetworkOps, Output, VolumeOps, Restarts, Health, Limits, Archive):
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
        await asyncio.to_thread(lambda: self.volume_store)  # loaded (and tidied) off the loop
        self._recovering = True
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
        self._recovering = False
        await self._start_by_policy()

    async def _adopt(self, c: Container) -> None:
        """Take a container a previous daemon left running under this daemon's care again."""
        log.info(
            "live restore: adopting container %s (monitor pid %d)", c.id[:12], c.state.monitor_pid
        )
        bridged = mode_of(c.host_config).kind == BRIDGE
        if bridged and c.id not in self.network.endpoints():
            log.warning("live restore: container %s lost its network endpoint", c.id[:12])
        published = await self._netd(self.network.published, c.id)
        if self.cfg.userland_proxy:
            await self._adopt_proxies(c, published)
        # netd drops a mapping whose host port someone else took while no daemon held it.
        c.network.ports = [p.mapping() for p in published]
        self.containers.save(c)
        self._lifecycle(c.id)
        self._watchers[c.id] = asyncio.create_task(self._watch(c))
        self._start_health(c, resume=True)

    def end_streams(self) -> None:
        """The API server is stopping: end every log follow, attach and wait now, so that it
        does not wait for them (the containers are stopped afterwards, by shutdown())."""
        self._closing = True
        self.events.close()
        for lifecycle in self._lifecycles.values():
            lifecycle.pulse()

    async def shutdown(self) -> bool:
        """With live restore, leave running containers (and their monitors and proxies) alone
        and only stop watching them; otherwise stop them all, then their proxies. True when
        containers were left running: their network must stay up for them."""
        self._closing = True  # no restart by policy from here on
        self._cancel_all_restarts()
        self._stop_all_health()
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
        port_bindings: list[PortBinding] | None = None,
        mounts: MountRequests | None = None,
    ) -> Container:
        image_ref = config.get("Image") or ""
        if not image_ref:
            raise InvalidParameter("No image specified")
        image = self.images.get(image_ref)
        mode = host_config.get("NetworkMode") or ""
        try:
            kind = check_mode_conflicts(config, host_config, endpoints_config)
            if kind.kind == BRIDGE:
                networks = await self._netd(
                    plan_attachments, mode, endpoints_config, self.network.network
                )
            else:
                networks, mode = self._mode_attachments(kind)
        except NetworkRequestError as e:
            raise InvalidParameter(str(e)) from e
        self._check_proxy_protocol(config.get("Labels") or {})
        self._dns_request(config, host_config)
        image_config = image.config.get("config") or {}
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
        name = self.containers.check_name(name) if name else None
        container_id = self.containers.new_id()
        image_volumes = image_volume_paths(image_config)
        mount_points = await self._plan_mounts(mounts, list(image_volumes))
        try:  # again: other creates ran while the mounts were planned
            name = self.containers.check_name(name) if name else self.containers.generate_name()
        except BaseException:
            await self._remove_anonymous_volumes(mount_points)
            raise
        merged = dict(config)
        merged.update(
            Image=image_ref,
            Env=env,
            Cmd=cmd if cmd is not None else image_config.get("Cmd"),
            Entrypoint=entrypoint if entrypoint is not None else image_config.get("Entrypoint"),
            WorkingDir=config.get("WorkingDir") or cwd,
            User=config.get("User") or user,
            Hostname=config.get("Hostname")
            or (os.uname().nodename if mode == HOST else container_id[:12]),
            StopSignal=config.get("StopSignal") or image_config.get("StopSignal") or "SIGTERM",
            Labels={**(image_config.get("Labels") or {}), **(config.get("Labels") or {})},
            Volumes={**image_volumes, **(config.get("Volumes") or {})} or None,
            Healthcheck=merge_healthcheck(
                config.get("Healthcheck"), image_config.get("Healthcheck")
            ),
        )
        container = Container(
            id=container_id,
            name=name,
            created=utc_rfc3339(digits=6),
            image=image_ref,
            image_id=image.id,
            config=merged,
            host_config={**host_config, "NetworkMode": mode or "default"},
            port_bindings=list(port_bindings or []),
            args=args,
            networks=networks,
            mounts=mount_points,
        )
        self.containers.add(container)
        self._lifecycle(container.id)
        self._event(container, "create")
        return container

    @staticmethod
    def _log_options(host_config: dict[str, Any]) -> LogOptions:
        try:
            return parse_log_config(host_config.get("LogConfig"))
        except ValueError as e:
            raise InvalidParameter(str(e)) from e

    async def start(self, ref: str) -> Container:
        async with self._locked(ref) as c:
            if not c.state.running:
                self._started_by_client(c)
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
                    await self._remove_locked(c, force=True, volumes=True)
            raise
        return c

    async def _start(self, c: Container) -> None:
        cdir = self.containers.dir(c)
        bundle_dir = cdir / "bundle"
        rootfs_dir = bundle_dir / "rootfs"
        image = self.images.get(c.image_id)
        undo: list[Any] = []
        try:
            net = await self._start_network(c, cdir, undo)
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
            spec = bundle.runtime_spec(
                rootfs=rootfs_dir,
                args=c.args,
                env=tty_env(c.config),
                cwd=c.config.get("WorkingDir") or "/",
                user=user,
                hostname=c.config["Hostname"],
                domainname=c.config.get("Domainname") or "",
                netns_path=net.netns_path,
                host_network=net.host,
                bind_files=net.files,
                cgroups_path=cgroups.cgroups_path(c.id),
                security=seccomp.parse_security_opts(c.host_config.get("SecurityOpt")),
                terminal=bool(c.config.get("Tty")),
                resources=limits_of(c),
            )
            await self._mount_volumes(c, rootfs_dir, spec)
            write_json_atomic(bundle_dir / "config.json", spec)
            self._exit_path(c).unlink(missing_ok=True)
            monitor_pid, pid = await self.runtime.start(
                c.id,
                bundle_dir,
                self.log_path(c),
                self._exit_path(c),
                self._log_options(c.host_config),
                stdio_options(c.config, cdir),
            )
            undo.append(lambda: self._kill_started(c, monitor_pid))
            await self._proxies_started(net.proxies)
        except BaseException as e:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    await step()
            c.network = NetworkRecord()
            c.state.error = str(e)
            self.containers.save(c)
            if isinstance(e, NetdError) and not isinstance(e, errors.NotFound):
                raise InvalidParameter(str(e)) from e
            raise
        self._network_started(c, pid)
        c.state = ContainerState(
            status="running",
            pid=pid,
            monitor_pid=monitor_pid,
            started_at=utc_rfc3339(digits=6),
            restart_count=c.state.restart_count,
            manually_stopped=c.state.manually_stopped,
        )
        self.containers.save(c)
        self._lifecycle(c.id).pulse()
        self._watchers[c.id] = asyncio.create_task(self._watch(c))
        self._attachment_events(c, "connect")
        self._event(c, "start")
        self._start_health(c)

    async def _watch(self, c: Container) -> None:
        status = await self.runtime.wait(c.state.monitor_pid, self._exit_path(c))
        await self._release(c)
        self._mark_exited(c, status)
        self._attachment_events(c, "disconnect")
        self._watchers.pop(c.id, None)
        self._after_exit(c)
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
                    # --rm takes the anonymous volumes along, as Docker's.
                    await self._remove_locked(c, force=True, volumes=True)

    async def _release(self, c: Container) -> None:
        """Give back what a running container held: proxies, ports, veth, netns, rootfs mount."""
        # The proxies' exits (the kernel's teardown of each) and netd's removal run side by side.
        stopping = asyncio.ensure_future(self.proxies.stop_many(proxy_keys(c.id, c.network.ports)))
        try:
            await self.dns.stop(c.id)
            await self._netd(self.network.delete_endpoint, c.id)
        finally:
            await stopping
        await asyncio.to_thread(rootfs.unmount, self.containers.dir(c) / "bundle" / "rootfs")
        await self._unmount_volumes(c)

    def _mark_exited(self, c: Container, status: ExitStatus) -> None:
        c.state.status = "exited"
        c.state.exit_code = status.exit_code
        c.state.finished_at = status.finished_at or utc_rfc3339(digits=6)
        c.state.error = status.error
        c.state.oom_killed = status.oom_killed
        c.state.pid = 0
        c.network = NetworkRecord()
        self.containers.save(c)
        self._stop_health(c.id)
        ran = 0.0
        with contextlib.suppress(ValueError):
            ran = unix_time(c.state.finished_at) - unix_time(c.state.started_at)
        if status.oom_killed:
            self._event(c, "oom")  # before "die", as moby's monitor sends them
        self._event(c, "die", exitCode=str(status.exit_code), execDuration=str(max(int(ran), 0)))
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
            if not c.state.restarting:
                return False
            self._stopped_by_client(c)  # the pending restart is cancelled
            self._event(c, "stop")
            return True
        self._stopped_by_client(c)
        stop_signal = c.config.get("StopSignal") or "SIGTERM"
        with contextlib.suppress(InvalidParameter):
            self._event(c, "kill", signal=_signal_number(stop_signal))
        await self.runtime.stop(
            c.id,
            c.state.monitor_pid,
            self._exit_path(c),
            stop_signal=c.config.get("StopSignal") or "SIGTERM",
            timeout=self.stop_timeout(c, timeout),
        )
        await self._lifecycle(c.id).until(lambda: not c.state.running)
        self._event(c, "stop")
        return True

    async def restart(self, ref: str, timeout: float | None = None) -> Container:
        """Stop (when running), then start again: Docker's ``restart``."""
        async with self._locked(ref) as c:
            await self._stop_locked(c, timeout)
            self._started_by_client(c)
            await self._start_locked(c)
            self._event(c, "restart")
            return c

    async def kill(self, ref: str, sig: str = "SIGKILL") -> None:
        c = self.containers.get(ref)
        if not c.state.running:
            raise NotRunning(f"Container {c.id} is not running")
        name = parse_signal(sig)
        stop_signal = c.config.get("StopSignal") or "SIGTERM"
        with contextlib.suppress(InvalidParameter):
            stop_signal = parse_signal(stop_signal)
        if name in ("SIGKILL", stop_signal):
            self._stopped_by_client(c)  # moby daemon/kill.go: no restart by the policy
            self.containers.save(c)
        self._event(c, "kill", signal=_signal_number(name))
        await self.runtime.kill(c.id, name)

    async def remove(self, ref: str, force: bool = False, volumes: bool = False) -> None:
        async with self._locked(ref) as c:
            await self._remove_locked(c, force, volumes)

    async def _remove_locked(self, c: Container, force: bool, volumes: bool = False) -> None:
        if (c.state.running or c.state.restarting) and not force:
            what = "running" if c.state.running else "restarting"
            raise ContainerConflict(
                f"You cannot remove a {what} container {c.id}. Stop the container before "
                "attempting removal or force remove"
            )
        self._stopped_by_client(c)  # a forced removal's kill restarts nothing
        if c.state.running:
            # The proxies exit while runc kills the container (_release awaits them).
            self.proxies.begin_stop(proxy_keys(c.id, c.network.ports))
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
        if volumes:
            await self._remove_anonymous_volumes(c.mounts)
        self._event(c, "destroy")
        self._backoffs.pop(c.id, None)
        self._locks.pop(c.id, None)  # a waiter still holding it finds the container gone
        lifecycle = self._lifecycles.pop(c.id, None) or LifecycleEvents()
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


def _signal_number(name: str) -> str:
    """Docker's ``signal`` attribute: the number."""
    return str(int(signal.Signals[parse_signal(name)]))
