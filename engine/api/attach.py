"""Attach with stdin or a TTY, and resize: ``POST /containers/{id}/attach`` and
``POST /containers/{id}/resize``.

An attach to a container without a TTY that does not send stdin is the output-only attach of
engine.api.containers. Otherwise the output (read from the json log as there) goes raw with a
TTY and multiplexed without; the client's bytes go to the container's monitor over the attach
channel (engine.lifecycle.stdio), once the container runs (the docker CLI attaches before it
starts the container). The detach keys end the attach and leave the container running; with
``StdinOnce`` (and no TTY) the container's stdin is closed when the attach's input ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from common import errors
from engine.api.common import (
    BadParameter,
    HijackedResponse,
    flag,
    int_query,
    stream_frame,
)
from engine.api.hijack import (
    DEFAULT_DETACH_KEYS,
    DetachScanner,
    StdinHijackedResponse,
    parse_detach_keys,
)
from engine.lifecycle.containers import Container
from engine.lifecycle.engine import Engine
from engine.lifecycle.stdio import AttachChannel

log = logging.getLogger("pyengined.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DISCONNECT_POLL = 0.2
STDIN_READ = 32 * 1024


class AttachApi:
    def __init__(self, engine: Engine, output_only: Handler) -> None:
        self.engine = engine
        self.output_only = output_only

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/containers/{id}/attach", self.attach),
            ("POST", "/containers/{id}/resize", self.resize),
        ]

    async def resize(self, request: web.Request) -> web.Response:
        c = self.engine.containers.get(request.match_info["id"])
        height = int_query(request, "h", 0) or 0
        width = int_query(request, "w", 0) or 0
        if not (0 <= height < 65536 and 0 <= width < 65536):
            raise BadParameter("invalid size: h and w must be between 0 and 65535")
        if not c.state.running:
            raise errors.Conflict(f"Container {c.id} is not running")
        if c.config.get("Tty"):
            channel = await AttachChannel.open(self.engine.containers.dir(c))
            try:
                await channel.resize(height, width)
            finally:
                await channel.close()
        return web.Response(status=200)

    async def attach(self, request: web.Request) -> web.StreamResponse:
        c = self.engine.containers.get(request.match_info["id"])
        tty = bool(c.config.get("Tty"))
        with_stdin = flag(request, "stdin") and bool(c.config.get("OpenStdin"))
        if not (tty or with_stdin):
            return await self.output_only(request)
        want = {s for s in ("stdout", "stderr") if flag(request, s)}
        if not want and not flag(request, "stdin"):
            raise BadParameter("Bad parameters: you must choose at least one stream")
        replay, follow = flag(request, "logs"), flag(request, "stream")
        if not (replay or follow):
            raise BadParameter("Bad parameters: at least one of logs or stream must be set")
        keys = parse_detach_keys(request.query.get("detachKeys") or DEFAULT_DETACH_KEYS)
        upgrade = "Upgrade" in request.headers
        resp = StdinHijackedResponse(upgrade) if with_stdin else HijackedResponse(upgrade)
        entries = self.engine.attach(c.id, replay=replay, follow=follow)
        await resp.prepare(request)
        out_task = asyncio.ensure_future(_copy_output(resp, entries, want, tty))
        tasks: set[asyncio.Future[Any]] = {out_task}
        stdin_task = None
        if isinstance(resp, StdinHijackedResponse):
            stdin_task = asyncio.ensure_future(
                self._copy_stdin(c, resp.stdin, DetachScanner(keys), out_task)
            )
            tasks.add(stdin_task)
        try:
            while True:
                done, _ = await asyncio.wait(
                    tasks, timeout=DISCONNECT_POLL, return_when=asyncio.FIRST_COMPLETED
                )
                if out_task in done:
                    break
                if stdin_task is not None and stdin_task in done:
                    tasks.discard(stdin_task)
                    if not stdin_task.cancelled() and stdin_task.exception() is None:
                        if stdin_task.result():
                            break  # detached
                    else:
                        with contextlib.suppress(Exception, asyncio.CancelledError):
                            stdin_task.result()
                transport = request.transport
                if transport is None or transport.is_closing() or self.engine._closing:
                    break
        finally:
            for task in (out_task, stdin_task):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        with contextlib.suppress(Exception):
            await resp.write_eof()
        return resp

    async def _copy_stdin(
        self,
        c: Container,
        stdin: asyncio.StreamReader,
        scanner: DetachScanner,
        out_task: asyncio.Future[None],
    ) -> bool:
        """Client bytes to the container until EOF or the detach keys (then True)."""
        lifecycle = self.engine._lifecycle(c.id)
        await lifecycle.until(lambda: _running(self.engine, c.id) or lifecycle.removed)
        if lifecycle.removed:
            return False
        channel = await AttachChannel.open(self.engine.containers.dir(c))
        close_stdin = bool(c.config.get("StdinOnce")) and not c.config.get("Tty")
        try:
            while data := await stdin.read(STDIN_READ):
                passed = scanner.feed(data)
                if passed:
                    await channel.send_stdin(passed)
                if scanner.detached:
                    return True
            return False
        finally:
            if close_stdin:
                with contextlib.suppress(OSError):
                    await channel.close_stdin()
            await channel.close()


def _running(engine: Engine, container_id: str) -> bool:
    try:
        return engine.containers.get(container_id).state.running
    except errors.NotFound:
        return False


async def _copy_output(resp: web.StreamResponse, entries: Any, want: set[str], tty: bool) -> None:
    try:
        async for entry in entries:
            if entry.stream not in want:
                continue
            data = entry.text.encode()
            await resp.write(data if tty else stream_frame(entry.stream, data))
    except ConnectionError as e:
        log.debug("attach stream ended: %s", e)
    finally:
        await entries.aclose()
