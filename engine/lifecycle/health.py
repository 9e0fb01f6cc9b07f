"""Healthchecks of running containers (moby daemon/health.go): one task per container runs
its probe every interval (runtime/probe.py, off the event loop) and keeps ``State.Health``:
``starting`` until the first success, ``healthy`` after a success, ``unhealthy`` after
``retries`` failures in a row (failures within the start period do not count while it is
still starting); the last five results are kept. A change of status is a
``health_status: <status>`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from common.timefmt import unix_time, utc_rfc3339
from engine.lifecycle.base import EngineBase
from engine.lifecycle.containers import Container
from engine.lifecycle.healthcheck import Healthcheck
from engine.runtime.probe import ProbeResult, process_spec, run_in_container

log = logging.getLogger("pyengined.engine")

MAX_LOG_ENTRIES = 5  # Docker's maxLogEntries
STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"


def _rfc3339(seconds: float) -> str:
    return utc_rfc3339(int(seconds * 1e9))


class Health(EngineBase):
    def _start_health(self, c: Container, resume: bool = False) -> None:
        """Start probing ``c`` (just started, or adopted again with ``resume``)."""
        self._stop_health(c.id)
        check = Healthcheck.of(c.config)
        if check is None:
            if c.state.health:
                c.state.health = {}
                self.containers.save(c)
            return
        if not resume or not c.state.health:
            c.state.health = {"Status": STARTING, "FailingStreak": 0, "Log": []}
            self.containers.save(c)
        self._health_tasks[c.id] = asyncio.create_task(self._probe_loop(c, check))

    def _stop_health(self, container_id: str) -> None:
        task = self._health_tasks.pop(container_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _stop_all_health(self) -> None:
        for container_id in list(self._health_tasks):
            self._stop_health(container_id)

    async def _probe_loop(self, c: Container, check: Healthcheck) -> None:
        try:
            started = unix_time(c.state.started_at)
        except ValueError:
            started = 0.0
        bundle = self.containers.dir(c) / "bundle"
        while c.state.running:
            starting = c.state.health.get("Status") == STARTING
            in_start_period = time.time() - started < check.start_period
            await asyncio.sleep(
                check.start_interval if starting and in_start_period else check.interval
            )
            if not c.state.running:
                return
            try:
                spec = await asyncio.to_thread(_read_process, bundle / "config.json")
                result = await run_in_container(
                    self.runtime.runc,
                    self.runtime.state_root,
                    c.id,
                    process_spec(spec, check.argv),
                    check.timeout,
                    self.containers.dir(c),
                )
            except (OSError, ValueError) as e:
                result = ProbeResult(
                    -1, f"cannot run the healthcheck: {e}", time.time(), time.time()
                )
            if not c.state.running:
                return
            self._record_probe(c, check, result, started)

    def _record_probe(
        self, c: Container, check: Healthcheck, result: ProbeResult, started: float
    ) -> None:
        health = c.state.health
        before = health.get("Status", STARTING)
        if result.exit_code == 0:
            health["FailingStreak"] = 0
            health["Status"] = HEALTHY
        elif not (before == STARTING and result.started - started < check.start_period):
            health["FailingStreak"] = int(health.get("FailingStreak", 0)) + 1
            if health["FailingStreak"] >= check.retries:
                health["Status"] = UNHEALTHY
        entries: list[Any] = list(health.get("Log") or [])
        entries.append(
            {
                "Start": _rfc3339(result.started),
                "End": _rfc3339(result.ended),
                "ExitCode": result.exit_code,
                "Output": result.output,
            }
        )
        health["Log"] = entries[-MAX_LOG_ENTRIES:]
        self.containers.save(c)
        if health["Status"] != before:
            self._event(c, f"health_status: {health['Status']}")


def _read_process(path: Any) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = json.loads(f.read(1 << 20))
    if not isinstance(data, dict):
        raise ValueError("not an OCI config")
    return data
