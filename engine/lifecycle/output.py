"""A container's output, read back from its json-file log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from common.timefmt import unix_time
from engine.lifecycle.base import LOG_POLL_INTERVAL, EngineBase
from engine.lifecycle.containers import (
    Container,
)
from engine.runtime.jsonlog import JsonLogReader, LogEntry

log = logging.getLogger("pyengined.engine")


class Output(EngineBase):
    """A container's output: its json-file log, read and followed."""

    # ---- output --------------------------------------------------------------------------

    def log_path(self, c: Container) -> Path:
        return self.containers.dir(c) / "container.log"

    async def logs(
        self,
        ref: str,
        follow: bool,
        tail: int | None,
        since: float = 0.0,
        until: float = 0.0,
    ) -> AsyncIterator[LogEntry]:
        """Entries of the container's json-file log: the last ``tail`` (all when None) of those
        written in [since, until) (0: unbounded), then with ``follow`` new ones until it exits."""
        c = self.containers.get(ref)
        reader = JsonLogReader(self.log_path(c))
        try:
            async for entry in self._logs(c, reader, follow, tail, since, until):
                yield entry
        finally:
            reader.close()

    async def _logs(
        self,
        c: Container,
        reader: JsonLogReader,
        follow: bool,
        tail: int | None,
        since: float,
        until: float,
    ) -> AsyncIterator[LogEntry]:
        def wanted(entry: LogEntry) -> bool:
            if not (since or until):
                return True
            t = unix_time(entry.time)
            return (not since or t >= since) and (not until or t < until)

        # A log has no size bound: read it in a thread, in bounded pieces (engine.runtime.jsonlog).
        if tail is not None:
            for entry in await asyncio.to_thread(reader.tail, tail, wanted):
                yield entry
        else:
            async for entry in _read_caught_up(reader):
                if wanted(entry):
                    yield entry
        if not follow:
            return
        while True:
            running = c.state.running
            got = False
            async for entry in _read_caught_up(reader):
                got = True
                if wanted(entry):
                    yield entry
            if not running or self._closing:
                return  # the monitor writes all output before the exit is recorded
            if not got:
                await asyncio.sleep(LOG_POLL_INTERVAL)

    async def attach(self, ref: str, replay: bool, follow: bool) -> AsyncIterator[LogEntry]:
        """Output for an attached client: with ``replay`` what was written before, with
        ``follow`` what the container writes until its current (or, when it is not running,
        its next) run ends. An auto-removal waits for attached clients to read it all."""
        c = self.containers.get(ref)
        self._event(c, "attach")
        lifecycle = self._lifecycle(c.id)
        exits = lifecycle.exits
        path = self.log_path(c)
        reader = JsonLogReader(path, start_at_end=not replay)
        done = asyncio.Event()
        lifecycle.attached.add(done)
        try:
            async for entry in _read_caught_up(reader):
                yield entry
            if not follow:
                return
            while True:
                ended = lifecycle.exits > exits or lifecycle.removed
                got = False
                async for entry in _read_caught_up(reader):
                    got = True
                    yield entry
                if ended or self._closing:
                    return
                if not got:
                    await asyncio.sleep(LOG_POLL_INTERVAL)
        finally:
            reader.close()
            lifecycle.attached.discard(done)
            done.set()


async def _read_caught_up(reader: JsonLogReader) -> AsyncIterator[LogEntry]:
    """What the reader finds until it has caught up with the writer, a bounded batch at a
    time, each read in a thread."""
    caught_up = False
    while not caught_up:
        batch, caught_up = await asyncio.to_thread(reader.read_batch)
        for entry in batch:
            yield entry
