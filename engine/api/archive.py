"""``/containers/{id}/archive``: ``docker cp`` (swagger ContainerArchive, ContainerArchiveInfo,
PutContainerArchive). The tar goes through a pipe between the HTTP stream and a thread that
walks the container's tree (engine.runtime.containerfs): neither side holds it in memory."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web

from common.errors import NotFound
from engine.api.common import BadParameter, flag
from engine.lifecycle.containers import Container
from engine.lifecycle.engine import Engine
from engine.runtime import containerfs
from engine.runtime.containerfs import CopyError, ExtractOptions, PathNotFound

CHUNK = 1 << 16
STAT_HEADER = "X-Docker-Container-Path-Stat"


def _path(request: web.Request) -> str:
    path = request.query.get("path") or ""
    if not path:
        raise BadParameter("path is required")
    if "\0" in path or len(path) > 4096:
        raise BadParameter("invalid path")
    return path


def _not_found(path: str, c: Container) -> NotFound:
    return NotFound(f"Could not find the file {path} in container {c.name}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ArchiveApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def _stat(self, c: Container, root_fd: int, path: str) -> str:
        try:
            st = await asyncio.to_thread(containerfs.stat_path, root_fd, path)
        except PathNotFound:
            raise _not_found(path, c) from None
        except CopyError as e:
            raise BadParameter(str(e)) from None
        return base64.b64encode(json.dumps(st.json()).encode()).decode()

    async def head(self, request: web.Request) -> web.Response:
        path = _path(request)
        async with self.engine.container_root(request.match_info["id"]) as (c, root_fd):
            header = await self._stat(c, root_fd, path)
        return web.Response(status=200, headers={STAT_HEADER: header})

    async def get(self, request: web.Request) -> web.StreamResponse:
        path = _path(request)
        async with self.engine.container_root(request.match_info["id"]) as (c, root_fd):
            header = await self._stat(c, root_fd, path)
            resp = web.StreamResponse(
                headers={STAT_HEADER: header, "Content-Type": "application/x-tar"}
            )
            await resp.prepare(request)
            r, w = os.pipe2(os.O_CLOEXEC)

            def produce() -> None:
                with os.fdopen(w, "wb", buffering=CHUNK) as out:
                    containerfs.write_tar(root_fd, path, out)

            await self._pump_out(resp, r, produce)
            await resp.write_eof()
        return resp

    async def _pump_out(
        self, resp: web.StreamResponse, r: int, produce: Callable[[], None]
    ) -> None:
        """Run ``produce`` (it writes the pipe) in a thread and stream the pipe to ``resp``.
        A client that goes away closes the pipe: the producer ends with EPIPE."""
        task = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            while data := await asyncio.to_thread(os.read, r, CHUNK):
                await resp.write(data)
        finally:
            os.close(r)
            with contextlib.suppress(Exception):
                await task  # the tar is cut short; the client sees it end early

    async def put(self, request: web.Request) -> web.Response:
        path = _path(request)
        options = ExtractOptions(
            no_overwrite_dir_non_dir=flag(request, "noOverwriteDirNonDir"),
            copy_uid_gid=flag(request, "copyUIDGID"),
        )
        async with self.engine.container_root(request.match_info["id"]) as (c, root_fd):
            r, w = os.pipe2(os.O_CLOEXEC)

            def consume() -> None:
                with os.fdopen(r, "rb", buffering=CHUNK) as src:
                    containerfs.extract_tar(root_fd, path, src, options)
                    # Read to the end, so that the writer never blocks on a full pipe.
                    while src.read(CHUNK):
                        pass

            task = asyncio.ensure_future(asyncio.to_thread(consume))
            try:
                async for chunk in request.content.iter_chunked(CHUNK):
                    if task.done():
                        break
                    try:
                        await asyncio.to_thread(_write_all, w, chunk)
                    except BrokenPipeError:
                        break
            finally:
                os.close(w)
                error = await _result(task)
        if isinstance(error, PathNotFound):
            raise _not_found(path, c)
        if isinstance(error, CopyError):
            raise BadParameter(str(error))
        if isinstance(error, OSError):
            raise BadParameter(f"extracting into {path}: {os.strerror(error.errno or 0)}")
        if error is not None:
            raise error
        return web.Response(status=200)

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("HEAD", "/containers/{id}/archive", self.head),
            ("GET", "/containers/{id}/archive", self.get),
            ("PUT", "/containers/{id}/archive", self.put),
        ]


async def _result(task: asyncio.Future[None]) -> BaseException | None:
    try:
        await task
    except Exception as e:
        return e
    return None
