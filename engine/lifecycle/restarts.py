"""Restarting containers by their restart policy (moby daemon/monitor.go handleContainerExit).

When a container's process ends on its own (or is killed from outside the daemon), its
policy, read from the record at that moment so that an update takes effect, decides whether
it runs again after Docker's back-off. A stop or kill through the API marks the container
manually stopped: no restart then. While the delay runs the container is ``restarting``; a
stop, kill or removal cancels the pending restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from common.timefmt import unix_time
from engine.lifecycle.base import EngineBase
from engine.lifecycle.containers import Container, ContainerNotFound
from engine.lifecycle.restartpolicy import Backoff, RestartPolicy

log = logging.getLogger("pyengined.engine")


class Restarts(EngineBase):
    async def _start_locked(self, c: Container) -> Container:
        raise NotImplementedError  # the engine's

    def _backoff(self, container_id: str) -> Backoff:
        return self._backoffs.setdefault(container_id, Backoff())

    def _started_by_client(self, c: Container) -> None:
        """A start through the API: the policy applies again, its count from zero."""
        c.state.manually_stopped = False
        self._backoff(c.id).restarts = 0
        self._cancel_restart(c)

    def _stopped_by_client(self, c: Container) -> None:
        """A stop or kill through the API (not the daemon's own shutdown): no restart."""
        if not self._closing:
            c.state.manually_stopped = True
        self._cancel_restart(c)

    def _cancel_restart(self, c: Container) -> None:
        task = self._restart_tasks.pop(c.id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if c.state.restarting:
            c.state.restarting = False
            self.containers.save(c)

    def _after_exit(self, c: Container) -> None:
        """The run of ``c`` ended (its exit is recorded): restart it if its policy says so."""
        if self._closing or self._recovering:
            return
        policy = RestartPolicy.of(c.host_config)
        backoff = self._backoff(c.id)
        if not policy.should_restart(c.state.exit_code, c.state.manually_stopped, backoff.restarts):
            return
        try:
            ran_for = time.time() - unix_time(c.state.started_at)
        except ValueError:
            ran_for = 0.0
        delay = backoff.next_delay(ran_for)
        c.state.restarting = True
        self.containers.save(c)
        self._restart_tasks[c.id] = asyncio.create_task(self._restart_after(c.id, delay))

    async def _restart_after(self, container_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(ContainerNotFound):
            async with self._locked(container_id) as c:
                if self._restart_tasks.get(c.id) is not asyncio.current_task():
                    return  # cancelled meanwhile
                del self._restart_tasks[c.id]
                if not c.state.restarting or c.state.running or self._closing:
                    return
                c.state.restarting = False
                self._backoff(c.id).restarts += 1
                c.state.restart_count += 1
                try:
                    await self._start_locked(c)
                except Exception as e:  # recorded in the container's State.Error
                    log.warning("restart of container %s failed: %s", c.id[:12], e)
                    c.state.error = str(e)
                    self.containers.save(c)

    async def _start_by_policy(self) -> None:
        """At daemon start: containers whose policy wants them running and that do not run
        (because they ended while no daemon ran, or this daemon stopped them without live
        restore) are started (moby daemon.restore's restartContainers)."""
        for c in self.containers.all():
            if c.state.running or c.id in self._restart_tasks:
                continue
            if c.state.status != "exited":
                continue  # never started: not by the daemon either (moby HasBeenStartedBefore)
            restarting, c.state.restarting = c.state.restarting, False
            policy = RestartPolicy.of(c.host_config)
            if policy.none or not (
                restarting or policy.on_daemon_start(c.state.manually_stopped, c.state.exit_code)
            ):
                continue
            try:
                async with self._locked(c.id) as locked:
                    await self._start_locked(locked)
            except Exception as e:
                log.warning("container %s could not be started: %s", c.id[:12], e)

    def _cancel_all_restarts(self) -> None:
        for task in self._restart_tasks.values():
            task.cancel()
        self._restart_tasks.clear()
