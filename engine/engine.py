"""The engine: composes images, netd, the proxy supervisor and the runtime into a lifecycle.

Data flows one way: the API calls the engine; the engine calls netd, the proxy supervisor and the
runtime; they talk to the kernel and runc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import bundle, rootfs
from engine.containers import (
    Container,
    ContainerConflict,
    ContainerState,
    ContainerStore,
    NetworkRecord,
    PublishedPortRecord,
    now_rfc3339,
)
from engine.images import ImageStore
from engine.runtime import ExitStatus, Runtime
from netd.controller import NetdError, NetworkController
from netd.jsonstate import write_json_atomic
from netd.portspec import PortBinding, from_docker_port_bindings
from proxy.supervisor import ProxySpec, ProxySupervisor

log = logging.getLogger("pyengined.engine")


class InvalidParameter(Exception):
    """Bad input from a client: the API answers 400."""


class NotRunning(Exception):
    """An operation that needs a running container: the API answers 409."""


@dataclass
class EngineConfig:
    data_root: Path
    userland_proxy: bool = True
    runc: str = "runc"


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
    ) -> None:
        self.cfg = cfg
        self.images = images
        self.network = network
        self.proxies = proxies
        self.runtime = runtime
        self.containers = ContainerStore(cfg.data_root / "containers")
        self._exited: dict[str, asyncio.Event] = {}
        self._removed: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._net_lock = asyncio.Lock()

    # ---- daemon start and stop -------------------------------------------------------------

    async def recover(self) -> None:
        """After a start: containers left 'running' by a daemon that died are cleaned up."""
        for c in self.containers.all():
            if c.state.status in ("running", "removing"):
                log.info(
                    "container %s was left running by a previous daemon; stopping it", c.id[:12]
                )
                await self.runtime.kill(c.id, "SIGKILL")
                status = await self.runtime.wait(c.state.monitor_pid, self._exit_path(c))
                await self._release(c)
                self._mark_exited(c, status)
        for container_id in list(self.network.endpoints()):
            if container_id not in {c.id for c in self.containers.all() if c.state.running}:
                await self._netd(self.network.delete_endpoint, container_id)

    async def shutdown(self) -> None:
        """Stop every running container (the daemon has no live restore yet), then the proxies."""
        running = [c for c in self.containers.all() if c.state.running]
        await asyncio.gather(
            *(self.stop(c.id, timeout=10) for c in running), return_exceptions=True
        )
        await self.proxies.stop_all()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def create(
        self, name: str | None, config: dict[str, Any], host_config: dict[str, Any]
    ) -> Container:
        image_ref = config.get("Image") or ""
        if not image_ref:
            raise InvalidParameter("No image specified")
        image = self.images.get(image_ref)
        bindings = self._bindings(host_config)  # validates the publish specs before anything exists
        del bindings
        cmd = config.get("Cmd") or None
        entrypoint = config.get("Entrypoint")
        if isinstance(cmd, str):
            cmd = [cmd]
        if isinstance(entrypoint, str):
            entrypoint = [entrypoint]
        try:
            args, env, cwd, user = bundle.image_process(
                image.config.get("config") or {}, cmd, entrypoint, config.get("Env") or []
            )
        except ValueError as e:
            raise InvalidParameter(str(e)) from e
        name = self.containers.check_name(name) if name else self.containers.generate_name()
        container_id = self.containers.new_id()
        merged = dict(config)
        merged.update(
            Image=image_ref,
            Env=env,
            Cmd=cmd if cmd is not None else (image.config.get("config") or {}).get("Cmd"),
            Entrypoint=entrypoint
            if entrypoint is not None
            else (image.config.get("config") or {}).get("Entrypoint"),
            WorkingDir=cwd,
            User=config.get("User") or user,
            Hostname=config.get("Hostname") or container_id[:12],
            StopSignal=config.get("StopSignal")
            or (image.config.get("config") or {}).get("StopSignal")
            or "SIGTERM",
        )
        container = Container(
            id=container_id,
            name=name,
            created=now_rfc3339(),
            image=image_ref,
            image_id=image.id,
            config=merged,
            host_config=dict(host_config),
            args=args,
        )
        self.containers.add(container)
        self._exited[container.id] = asyncio.Event()
        self._removed[container.id] = asyncio.Event()
        return container

    def _bindings(self, host_config: dict[str, Any]) -> list[PortBinding]:
        try:
            return from_docker_port_bindings(host_config.get("PortBindings") or {})
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
        c = self.containers.get(ref)
        if c.state.running:
            return c
        if c.state.status == "removing":
            raise ContainerConflict(f"container {c.id[:12]} is marked for removal")
        cdir = self.containers.dir(c)
        bundle_dir = cdir / "bundle"
        rootfs_dir = bundle_dir / "rootfs"
        image = self.images.get(c.image_id)
        self._exited[c.id] = asyncio.Event()
        self._removed.setdefault(c.id, asyncio.Event())
        undo: list[Any] = []
        try:
            endpoint = await self._netd(self.network.create_endpoint, c.id)
            undo.append(lambda: self._netd(self.network.delete_endpoint, c.id))
            published = await self._netd(
                self.network.publish, c.id, endpoint, self._publish_all_bindings(c)
            )
            if self.cfg.userland_proxy:
                for p in published:
                    key = _proxy_key(c.id, p.proto, p.host_ip, p.host_port)
                    undo.append(lambda key=key: self.proxies.stop(key))
                    await self.proxies.start(
                        key,
                        ProxySpec(
                            p.proto, p.host_ip, p.host_port, p.container_ip, p.container_port
                        ),
                        p.sock,
                    )
            c.network = NetworkRecord(
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
                user = bundle.resolve_user(rootfs_dir, c.config.get("User") or "")
            except ValueError as e:
                raise InvalidParameter(str(e)) from e
            files = bundle.write_network_files(cdir, c.config["Hostname"], endpoint.ip)
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
            )
            write_json_atomic(bundle_dir / "config.json", spec)
            self._exit_path(c).unlink(missing_ok=True)
            monitor_pid, pid = await self.runtime.start(
                c.id, bundle_dir, cdir / "container.log", self._exit_path(c)
            )
        except BaseException as e:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    await step()
            c.network = NetworkRecord()
            c.state.error = str(e)
            self.containers.save(c)
            if isinstance(e, NetdError):
                raise InvalidParameter(str(e)) from e
            raise
        c.state = ContainerState(
            status="running", pid=pid, monitor_pid=monitor_pid, started_at=now_rfc3339()
        )
        self.containers.save(c)
        self._watchers[c.id] = asyncio.create_task(self._watch(c))
        return c

    async def _watch(self, c: Container) -> None:
        status = await self.runtime.wait(c.state.monitor_pid, self._exit_path(c))
        await self._release(c)
        self._mark_exited(c, status)
        self._watchers.pop(c.id, None)
        if c.host_config.get("AutoRemove"):
            await self.remove(c.id, force=True)

    async def _release(self, c: Container) -> None:
        """Give back what a running container held: proxies, ports, veth, netns, rootfs mount."""
        for p in c.network.ports:
            await self.proxies.stop(_proxy_key(c.id, p.proto, p.host_ip, p.host_port))
        await self._netd(self.network.delete_endpoint, c.id)
        await asyncio.to_thread(rootfs.unmount, self.containers.dir(c) / "bundle" / "rootfs")

    def _mark_exited(self, c: Container, status: ExitStatus) -> None:
        c.state.status = "exited"
        c.state.exit_code = status.exit_code
        c.state.finished_at = status.finished_at or now_rfc3339()
        c.state.error = status.error
        c.state.pid = 0
        c.network = NetworkRecord()
        self.containers.save(c)
        self._exited.setdefault(c.id, asyncio.Event()).set()

    async def stop(self, ref: str, timeout: float | None = None) -> bool:
        """Stop signal, then SIGKILL after ``timeout`` seconds. False when it was not running."""
        c = self.containers.get(ref)
        if not c.state.running:
            return False
        await self.runtime.stop(
            c.id,
            c.state.monitor_pid,
            self._exit_path(c),
            stop_signal=c.config.get("StopSignal") or "SIGTERM",
            timeout=10 if timeout is None else timeout,
        )
        await self._exited[c.id].wait()
        return True

    async def kill(self, ref: str, sig: str = "SIGKILL") -> None:
        c = self.containers.get(ref)
        if not c.state.running:
            raise NotRunning(f"Container {c.id} is not running")
        await self.runtime.kill(c.id, parse_signal(sig))

    async def remove(self, ref: str, force: bool = False) -> None:
        c = self.containers.get(ref)
        if c.state.running:
            if not force:
                raise ContainerConflict(
                    f"You cannot remove a running container {c.id}. Stop the container before "
                    "attempting removal or force remove"
                )
            await self.runtime.kill(c.id, "SIGKILL")
            await self._exited[c.id].wait()
        if c.id not in {x.id for x in self.containers.all()}:
            return  # AutoRemove got there first
        watcher = self._watchers.get(c.id)
        if watcher is not None:
            await watcher
        c.state.status = "removing"
        await asyncio.to_thread(rootfs.unmount, self.containers.dir(c) / "bundle" / "rootfs")
        self.containers.remove(c)
        self._removed.setdefault(c.id, asyncio.Event()).set()

    async def wait(self, ref: str, condition: str = "not-running") -> int:
        c = self.containers.get(ref)
        if condition not in ("not-running", "next-exit", "removed"):
            raise InvalidParameter(f"invalid condition: {condition}")
        if condition == "removed":
            await self._removed.setdefault(c.id, asyncio.Event()).wait()
        elif condition == "next-exit" or c.state.running:
            event = self._exited.setdefault(c.id, asyncio.Event())
            if condition == "next-exit" and event.is_set():
                event = self._exited[c.id] = asyncio.Event()
            await event.wait()
        return c.state.exit_code

    def is_running(self, c: Container) -> bool:
        return c.state.running

    async def logs(
        self, ref: str, follow: bool, tail: int | None
    ) -> AsyncIterator[tuple[str, str, str]]:
        """(stream, time, text) entries of the container's json-file log."""
        c = self.containers.get(ref)
        path = self.containers.dir(c) / "container.log"
        async for entry in _read_json_log(path, follow, tail, lambda: self._still_running(c)):
            yield entry

    def _still_running(self, c: Container) -> bool:
        event = self._exited.get(c.id)
        return c.state.running and not (event and event.is_set())

    def _exit_path(self, c: Container) -> Path:
        return self.containers.dir(c) / "exit.json"

    async def _netd(self, fn: Any, *args: Any) -> Any:
        # pyroute2 and libnftables calls block: run them off the loop, one at a time.
        async with self._net_lock:
            return await asyncio.to_thread(fn, *args)

    def remove_all_state(self) -> None:
        shutil.rmtree(self.cfg.data_root / "containers", ignore_errors=True)


async def _read_json_log(
    path: Path, follow: bool, tail: int | None, running: Any
) -> AsyncIterator[tuple[str, str, str]]:
    import json

    if not path.exists():
        if not follow:
            return
        while not path.exists() and running():
            await asyncio.sleep(0.05)
        if not path.exists():
            return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        for line in lines:
            entry = json.loads(line)
            yield entry["stream"], entry["time"], entry["log"]
        if not follow:
            return
        pending = ""
        while True:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    entry = json.loads(pending)
                    pending = ""
                    yield entry["stream"], entry["time"], entry["log"]
                continue
            if not running():
                rest = f.read()
                for line in (pending + rest).splitlines():
                    if line:
                        entry = json.loads(line)
                        yield entry["stream"], entry["time"], entry["log"]
                return
            await asyncio.sleep(0.05)
