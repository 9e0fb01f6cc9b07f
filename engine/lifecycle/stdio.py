"""A container's stdin and terminal from the daemon's side: what the monitor is told at start,
and the attach channel to it (engine.runtime.attachproto) for stdin bytes and resizes."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from common import errors
from engine.runtime import attachproto
from engine.runtime.runc import StdioOptions

CONNECT_TIMEOUT = 5.0
CONNECT_RETRY = 0.02


def tty_env(config: dict[str, Any]) -> list[str]:
    """The container's env; with a TTY, ``TERM=xterm`` unless it sets TERM (moby's
    CreateDaemonEnvironment)."""
    env = list(config.get("Env") or [])
    if config.get("Tty") and not any(e.split("=", 1)[0] == "TERM" for e in env):
        env.append("TERM=xterm")
    return env


def stdio_options(config: dict[str, Any], container_dir: Path) -> StdioOptions:
    return StdioOptions(
        tty=bool(config.get("Tty")),
        open_stdin=bool(config.get("OpenStdin")),
        attach_dir=container_dir,
    )


class AttachChannel:
    """A connection to a running container's monitor."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    @classmethod
    async def open(cls, container_dir: Path) -> AttachChannel:
        """Connect, retrying briefly: the monitor listens a moment after it reported the
        start, and a stale socket of an earlier run refuses until then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        while True:
            try:
                with attachproto.socket_path(container_dir) as path:
                    _, writer = await asyncio.open_unix_connection(path)
                return cls(writer)
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() >= deadline:
                    raise errors.Conflict(
                        "the container's attach channel is not available"
                    ) from None
                await asyncio.sleep(CONNECT_RETRY)

    async def send_stdin(self, data: bytes) -> None:
        for frame in attachproto.encode_stdin(data):
            self.writer.write(frame)
            await self.writer.drain()  # the monitor stops reading while the process does

    async def close_stdin(self) -> None:
        self.writer.write(attachproto.encode(attachproto.CLOSE_STDIN))
        await self.writer.drain()

    async def resize(self, rows: int, cols: int) -> None:
        self.writer.write(attachproto.encode_resize(rows, cols))
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
