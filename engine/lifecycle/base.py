"""The engine's shared parts: configuration, errors, the container store and locks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import errors
from engine.events import EventBus
from engine.images.store import ImageStore
from engine.lifecycle.containers import (
    Container,
    ContainerNotFound,
    ContainerStore,
)
from engine.lifecycle.restartpolicy import Backoff
from engine.runtime.runc import Runtime
from netd import (
    NetworkController,
)
from proxy.supervisor import ProxySupervisor

if TYPE_CHECKING:
    from netd import ContainerDns

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
class LifecycleEvents:
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
    userland_proxy_mode: str = "gateway"  # or "transparent" (engine/lifecycle/proxymode.py)
    runc: str = "runc"
    # Docker's --live-restore: containers keep running across a daemon restart.
    live_restore: bool = True


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


class EngineBase:
    """What every part of the engine shares: its components, the container store, the
    per-container locks and lifecycle events, and the one way to call netd."""

    def __init__(
        self,
        cfg: EngineConfig,
        images: ImageStore,
        network: NetworkController,
        proxies: ProxySupervisor,
        runtime: Runtime,
        dns: ContainerDns,
        events: EventBus | None = None,
    ) -> None:
        self.cfg = cfg
        self.images = images
        self.network = network
        self.proxies = proxies
        self.runtime = runtime
        self.dns = dns  # names on user-defined networks, responders, resolv.conf
        self.events = events or EventBus()  # what GET /events streams
        self.containers = ContainerStore(cfg.data_root / "containers")
        self._lifecycles: dict[str, LifecycleEvents] = {}
        self._closing = False  # the API is shutting down: streams and waits end now
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._net_lock = asyncio.Lock()
        # One lock per container id, held by every lifecycle operation (see _locked()).
        self._locks: dict[str, asyncio.Lock] = {}
        self._auto_removals: set[asyncio.Task[None]] = set()
        # Restart policies (restarts.py) and healthchecks (health.py), per container id.
        self._backoffs: dict[str, Backoff] = {}
        self._restart_tasks: dict[str, asyncio.Task[None]] = {}
        self._health_tasks: dict[str, asyncio.Task[None]] = {}
        self._recovering = False  # recover() decides what to start by policy itself

    def _event(self, c: Container, action: str, **extra: str) -> None:
        """A container event with Docker's attributes: its labels, image and name (moby
        daemon/events.go LogContainerEventWithAttributes), then ``extra``."""
        labels = c.config.get("Labels") or {}
        attributes = {str(k): str(v) for k, v in labels.items()}
        attributes.update(image=c.image, name=c.name, **extra)
        self.events.emit("container", action, c.id, attributes)

    def _lifecycle(self, container_id: str) -> LifecycleEvents:
        return self._lifecycles.setdefault(container_id, LifecycleEvents())

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

    async def _kill_started(self, c: Container, monitor_pid: int) -> None:
        """Undo a runc start that a later step of the start failed: SIGKILL, wait for the
        monitor to record the exit, and remove runc's record."""
        await self.runtime.stop(c.id, monitor_pid, self._exit_path(c), "SIGKILL", 0)
        await self.runtime.delete(c.id)

    def _exit_path(self, c: Container) -> Path:
        return self.containers.dir(c) / "exit.json"

    async def _netd(self, fn: Any, *args: Any) -> Any:
        # pyroute2 and libnftables calls block: run them off the loop, one at a time.
        async with self._net_lock:
            return await asyncio.to_thread(fn, *args)
