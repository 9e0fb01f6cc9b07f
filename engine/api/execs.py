"""The exec calls of the Docker Engine API: create, start (hijacked), resize, inspect.

``POST /exec/{id}/start`` without ``Detach`` answers like an attach (101 with ``Upgrade: tcp``,
else 200) and then carries the process's output: multiplexed frames without a TTY, raw bytes
with one; with ``AttachStdin`` the client's bytes are the process's stdin and its half-close
is end of input. The stream ends when the output does, after the exit code is recorded (the
docker CLI reads it with ``exec inspect`` right after). A client that stops reading stops the
process at a full pipe: output is only read when the client took the last piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from engine.api.common import (
    BadParameter,
    HijackedResponse,
    int_query,
    json_body,
    json_response,
    stream_frame,
)
from engine.api.hijack import (
    DEFAULT_DETACH_KEYS,
    DetachScanner,
    StdinHijackedResponse,
    parse_detach_keys,
)
from engine.lifecycle.engine import Engine
from engine.lifecycle.execs import ExecConfig, ExecRecord, Execs
from engine.runtime.execproc import ExecProcess

log = logging.getLogger("pyengined.api")

MAX_ARGS = 4096
MAX_ENV = 4096
DISCONNECT_POLL = 0.2


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadParameter(f"invalid {key}: want a boolean")
    return value


def _str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadParameter(f"invalid {key}: want a string")
    return value


def _strings(body: dict[str, Any], key: str, limit: int) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if key == "Cmd" and isinstance(value, str):  # a StrSlice: a string is a one-item list
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadParameter(f"invalid {key}: want a list of strings")
    if len(value) > limit:
        raise BadParameter(f"invalid {key}: more than {limit} items")
    return list(value)


def console_size(body: dict[str, Any]) -> tuple[int, int] | None:
    value = body.get("ConsoleSize")
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 65536 for v in value)
    ):
        raise BadParameter("invalid ConsoleSize: want [height, width]")
    return (value[0], value[1]) if value[0] and value[1] else None


def parse_exec_config(body: dict[str, Any]) -> ExecConfig:
    """The exec create body (moby api/types ExecOptions), checked once here."""
    cmd = _strings(body, "Cmd", MAX_ARGS)
    if not cmd:
        raise BadParameter("No exec command specified")
    working_dir = _str(body, "WorkingDir")
    if working_dir and not working_dir.startswith("/"):
        raise BadParameter(
            f"the working directory '{working_dir}' is invalid, it needs to be an absolute path"
        )
    detach_keys = _str(body, "DetachKeys")
    if detach_keys:
        parse_detach_keys(detach_keys)
    if _bool(body, "Privileged"):
        raise BadParameter("privileged exec is not supported by pyengined")
    return ExecConfig(
        cmd=cmd,
        env=_strings(body, "Env", MAX_ENV),
        user=_str(body, "User"),
        working_dir=working_dir,
        tty=_bool(body, "Tty"),
        attach_stdin=_bool(body, "AttachStdin"),
        attach_stdout=_bool(body, "AttachStdout"),
        attach_stderr=_bool(body, "AttachStderr"),
        detach_keys=detach_keys,
        console_size=console_size(body),
    )


class ExecsApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.execs = Execs(engine)
        self._background: set[asyncio.Task[Any]] = set()

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/containers/{id}/exec", self.create),
            ("POST", "/exec/{id}/start", self.start),
            ("POST", "/exec/{id}/resize", self.resize),
            ("GET", "/exec/{id}/json", self.inspect),
        ]

    async def create(self, request: web.Request) -> web.Response:
        config = parse_exec_config(await json_body(request))
        rec = self.execs.create(request.match_info["id"], config)
        return json_response({"Id": rec.id}, status=201)

    async def inspect(self, request: web.Request) -> web.Response:
        rec = self.execs.get(request.match_info["id"])
        cfg = rec.config
        return json_response(
            {
                "ID": rec.id,
                "Running": rec.running,
                "ExitCode": rec.exit_code,
                "ProcessConfig": {
                    "tty": cfg.tty,
                    "entrypoint": cfg.cmd[0],
                    "arguments": cfg.cmd[1:],
                    "privileged": cfg.privileged,
                    "user": cfg.user,
                },
                "OpenStdin": cfg.attach_stdin,
                "OpenStderr": cfg.attach_stderr,
                "OpenStdout": cfg.attach_stdout,
                "CanRemove": False,
                "ContainerID": rec.container_id,
                "DetachKeys": cfg.detach_keys,
                "Pid": rec.pid,
            }
        )

    async def resize(self, request: web.Request) -> web.Response:
        height = int_query(request, "h", 0) or 0
        width = int_query(request, "w", 0) or 0
        if not (0 <= height < 65536 and 0 <= width < 65536):
            raise BadParameter("invalid size: h and w must be between 0 and 65535")
        self.execs.resize(request.match_info["id"], height, width)
        return web.Response(status=200)

    def _in_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        detach = _bool(body, "Detach")
        tty = _bool(body, "Tty") if "Tty" in body else None
        exec_id = request.match_info["id"]
        rec = self.execs.startable(exec_id)
        keys = parse_detach_keys(rec.config.detach_keys or DEFAULT_DETACH_KEYS)
        if detach:
            rec = await self.execs.start(exec_id, tty)
            assert rec.process is not None
            self._in_background(self._drain_and_finish(rec, rec.process))
            return web.Response(status=200)
        # As Docker: the connection is hijacked first, then the process starts (a client such
        # as docker-py reads the headers through a buffered reader and the rest from the raw
        # socket: output must not share the headers' segment); a failed start is told in the
        # stream.
        upgrade = "Upgrade" in request.headers
        resp: HijackedResponse
        resp = (
            StdinHijackedResponse(upgrade) if rec.config.attach_stdin else HijackedResponse(upgrade)
        )
        await resp.prepare(request)
        try:
            rec = await self.execs.start(exec_id, tty)
        except Exception as e:
            message = f"{e}\r\n".encode()
            raw = rec.config.tty if tty is None else tty
            with contextlib.suppress(Exception):
                await resp.write(message if raw else stream_frame("stderr", message))
                await resp.write_eof()
            return resp
        process = rec.process
        assert process is not None
        stdin_task = None
        if isinstance(resp, StdinHijackedResponse):
            stdin_task = asyncio.ensure_future(
                _copy_stdin(resp.stdin, process, DetachScanner(keys))
            )
        out_task = asyncio.ensure_future(self._copy_output(resp, rec, process))
        ended = await _until_done_or_gone(
            lambda: self.engine._closing, request, out_task, stdin_task
        )
        if stdin_task is not None:
            stdin_task.cancel()
        if ended:
            await self.execs.finish(rec)
            if rec.error:  # told in the stream, on stdout, as Docker does
                message = f"{rec.error}\r\n".encode()
                with contextlib.suppress(Exception):
                    await resp.write(
                        message if process.tty_fd is not None else stream_frame("stdout", message)
                    )
        else:
            # Detached or the client left: the process goes on, as Docker's exec does, with
            # its output read and dropped.
            out_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await out_task
            self._in_background(self._drain_and_finish(rec, process))
        with contextlib.suppress(Exception):
            await resp.write_eof()
        return resp

    async def _copy_output(
        self, resp: web.StreamResponse, rec: ExecRecord, process: ExecProcess
    ) -> None:
        cfg = rec.config
        wanted = {"stdout": cfg.attach_stdout, "stderr": cfg.attach_stderr}
        raw = process.tty_fd is not None
        lock = asyncio.Lock()

        async def pump(stream: str) -> None:
            sending = True
            while data := await process.read(stream):
                if not (sending and wanted[stream]):
                    continue
                try:
                    async with lock:
                        await resp.write(data if raw else stream_frame(stream, data))
                except ConnectionError:
                    sending = False  # the client left: the caller notices and takes over

        await asyncio.gather(*(pump(s) for s in list(process.outputs)))

    async def _drain_and_finish(self, rec: ExecRecord, process: ExecProcess) -> None:
        async def drain(stream: str) -> None:
            while await process.read(stream):
                pass

        with contextlib.suppress(Exception):
            process.close_stdin()
            await asyncio.gather(*(drain(s) for s in list(process.outputs)))
        await self.execs.finish(rec)


async def _copy_stdin(
    stdin: asyncio.StreamReader, process: ExecProcess, scanner: DetachScanner
) -> bool:
    """Client bytes to the process until EOF (then close its stdin) or the detach keys (True)."""
    while data := await stdin.read(32 * 1024):
        passed = scanner.feed(data)
        if passed:
            try:
                await process.write_stdin(passed)
            except OSError:
                return False  # the process closed its stdin
        if scanner.detached:
            return True
    process.close_stdin()
    return False


async def _until_done_or_gone(
    closing: Callable[[], bool],
    request: web.Request,
    out_task: asyncio.Task[None],
    stdin_task: asyncio.Task[bool] | None,
) -> bool:
    """True when the output ended; False when the client detached or went away."""
    waiting: set[asyncio.Future[Any]] = {out_task}
    if stdin_task is not None:
        waiting.add(stdin_task)
    while True:
        done, _ = await asyncio.wait(
            waiting, timeout=DISCONNECT_POLL, return_when="FIRST_COMPLETED"
        )
        if out_task in done:
            out_task.result()
            return True
        if stdin_task is not None and stdin_task in done:
            waiting.discard(stdin_task)
            if (
                not stdin_task.cancelled()
                and stdin_task.exception() is None
                and stdin_task.result()
            ):
                return False
        transport = request.transport
        if transport is None or transport.is_closing() or closing():
            return False
