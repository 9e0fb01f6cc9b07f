"""Exec instances (Docker's ``exec``): their records and running them in a container.

A record is made by ``create`` (the container must be running), started once, and kept after
its process ends so that ``exec inspect`` still shows the exit code: until the container is
removed, for at most ``KEEP_ENDED`` seconds, and at most ``MAX_PER_CONTAINER`` per container
(moby keeps them until the container stops and garbage-collects ended ones after 5 minutes,
daemon/exec.go). The processes are children of the daemon (``runc exec``), not of the
container's monitor: they end with the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import errors
from engine.lifecycle.engine import Engine
from engine.runtime import bundle, execproc, userdb
from engine.runtime.execproc import ExecProcess, ExecSpec

log = logging.getLogger("pyengined.engine")

KEEP_ENDED = 300.0
MAX_PER_CONTAINER = 64
MAX_TOTAL = 4096


class ExecNotFound(errors.NotFound):
    pass


class ExecConflict(errors.Conflict):
    pass


@dataclass(frozen=True)
class ExecConfig:
    """The body of ``POST /containers/{id}/exec``, checked at the API boundary."""

    cmd: list[str]
    env: list[str] = field(default_factory=list)
    user: str = ""
    working_dir: str = ""
    tty: bool = False
    attach_stdin: bool = False
    attach_stdout: bool = False
    attach_stderr: bool = False
    detach_keys: str = ""
    privileged: bool = False
    console_size: tuple[int, int] | None = None


@dataclass
class ExecRecord:
    id: str
    container_id: str
    config: ExecConfig
    running: bool = False
    started: bool = False
    exit_code: int | None = None
    pid: int = 0
    ended_at: float = 0.0
    process: ExecProcess | None = None
    error: str = ""  # why runc could not start the process (Docker's "OCI runtime exec failed")


class Execs:
    """Exec instances of the engine's containers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._records: dict[str, ExecRecord] = {}

    def _collect(self) -> None:
        """Forget ended records past KEEP_ENDED and those of removed containers."""
        now = time.monotonic()
        live = {c.id for c in self.engine.containers.all()}
        for rec in list(self._records.values()):
            ended = not rec.running and (rec.started or rec.ended_at)
            if rec.container_id not in live or (ended and now - rec.ended_at > KEEP_ENDED):
                del self._records[rec.id]

    def _bound(self, container_id: str) -> None:
        mine = [r for r in self._records.values() if r.container_id == container_id]
        if len(mine) < MAX_PER_CONTAINER and len(self._records) < MAX_TOTAL:
            return
        # Drop the oldest record not running; with none to drop, refuse.
        for rec in sorted(mine, key=lambda r: r.ended_at):
            if not rec.running:
                del self._records[rec.id]
                return
        raise ExecConflict(f"too many exec instances for container {container_id}")

    def create(self, ref: str, config: ExecConfig) -> ExecRecord:
        c = self.engine.containers.get(ref)
        if not c.state.running:
            raise ExecConflict(f"container {c.id} is not running")
        self._collect()
        self._bound(c.id)
        rec = ExecRecord(id=secrets.token_hex(32), container_id=c.id, config=config)
        rec.ended_at = time.monotonic()
        self._records[rec.id] = rec
        self.engine.events.emit(
            "container",
            f"exec_create: {_cmd_text(config)}",
            c.id,
            {"execID": rec.id, **self._attributes(c.id)},
        )
        return rec

    def get(self, exec_id: str) -> ExecRecord:
        self._collect()
        rec = self._records.get(exec_id)
        if rec is None:
            raise ExecNotFound(f"No such exec instance: {exec_id}")
        return rec

    def _attributes(self, container_id: str) -> dict[str, str]:
        try:
            c = self.engine.containers.get(container_id)
        except errors.NotFound:
            return {}
        return {"image": str(c.config.get("Image") or ""), "name": c.name}

    def startable(self, exec_id: str) -> ExecRecord:
        """The exec ``exec_id`` if it can start now; else NotFound or Conflict."""
        rec = self.get(exec_id)
        if rec.running:
            raise ExecConflict(f"Error: Exec command {rec.id} is already running")
        if rec.started:
            raise ExecConflict(f"Error: Exec command {rec.id} has already run")
        c = self.engine.containers.get(rec.container_id)
        if not c.state.running:
            raise ExecConflict(f"container {c.id} is not running")
        return rec

    async def start(self, exec_id: str, tty: bool | None = None) -> ExecRecord:
        """Run the exec's process; ``rec.process`` is its I/O until ``finish`` is called."""
        rec = self.startable(exec_id)
        c = self.engine.containers.get(rec.container_id)
        rec.started = rec.running = True
        cfg = rec.config
        bundle_dir = self.engine.containers.dir(c) / "bundle"
        try:
            process = await self._spawn(c.id, c.config, bundle_dir, rec, tty)
        except BaseException:
            rec.running = False
            rec.exit_code = 126
            rec.ended_at = time.monotonic()
            raise
        rec.process, rec.pid = process, process.pid
        self.engine.events.emit(
            "container",
            f"exec_start: {_cmd_text(cfg)}",
            c.id,
            {"execID": rec.id, **self._attributes(c.id)},
        )
        return rec

    async def _spawn(
        self,
        container_id: str,
        config: dict,
        bundle_dir: Path,
        rec: ExecRecord,
        tty: bool | None,
    ) -> ExecProcess:
        cfg = rec.config
        try:
            base = await asyncio.to_thread(execproc.load_base_process, bundle_dir / "config.json")
            user = await asyncio.to_thread(
                userdb.resolve_user, bundle_dir / "rootfs", cfg.user or config.get("User") or ""
            )
        except ValueError as e:
            raise errors.InvalidParameter(str(e)) from e
        use_tty = cfg.tty if tty is None else tty
        env = list(base.get("env") or [])
        if use_tty:
            env = bundle.merge_env(env, ["TERM=xterm"])
        spec = ExecSpec(
            args=list(cfg.cmd),
            env=bundle.merge_env(env, cfg.env),
            cwd=cfg.working_dir or str(base.get("cwd") or "/"),
            user=user,
            tty=use_tty,
            stdin=cfg.attach_stdin,
        )
        return await ExecProcess.start(
            runc=self.engine.runtime.runc,
            state_root=self.engine.runtime.state_root,
            container_id=container_id,
            base_process=base,
            spec=spec,
            work_dir=self.engine.containers.dir(self.engine.containers.get(container_id))
            / "execs"
            / rec.id[:16],
            console_size=cfg.console_size,
        )

    async def finish(self, rec: ExecRecord) -> int:
        """Wait for the exec's process to end, record its exit code, emit ``exec_die``."""
        process = rec.process
        assert process is not None
        try:
            code = await process.wait()
        finally:
            process.close()
        if code != 0 and (error := await asyncio.to_thread(process.runc_error)):
            # moby translateContainerdStartErr: 127 for a command not found, else 126.
            missing = "executable file not found" in error or "no such file or directory" in error
            code = 127 if missing else 126
            rec.error = f"OCI runtime exec failed: {error}: unknown"
        rec.exit_code, rec.running, rec.ended_at = code, False, time.monotonic()
        self.engine.events.emit(
            "container",
            "exec_die",
            rec.container_id,
            {"execID": rec.id, "exitCode": str(code), **self._attributes(rec.container_id)},
        )
        with contextlib.suppress(OSError, errors.NotFound):
            c = self.engine.containers.get(rec.container_id)
            work = self.engine.containers.dir(c) / "execs" / rec.id[:16]
            await asyncio.to_thread(execproc.remove_work_dir, work)
        return code

    def resize(self, exec_id: str, height: int, width: int) -> None:
        rec = self.get(exec_id)
        if rec.process is None or not rec.running:
            raise ExecConflict(f"Exec {exec_id} is not running")
        try:
            rec.process.resize(height, width)
        except ValueError as e:
            raise errors.InvalidParameter(f"cannot resize exec {exec_id}: {e}") from e


def _cmd_text(config: ExecConfig) -> str:
    return " ".join(config.cmd)
