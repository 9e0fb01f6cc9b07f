"""Reading a container's json-file log (monitor.JsonFileLog writes it) in bounded pieces.

A log can be as large as the container cares to make it (no max-size: Docker's default), so no
read here holds more than a block of it at a time: ``read_batch`` reads forward at most
``READ_LIMIT`` bytes per call, and ``tail`` reads backwards from the end of the newest file in
blocks, keeping only the entries it returns. Both block on the file system: the engine runs
them in a thread (asyncio.to_thread), never on the event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from engine.runtime.monitor import rotated_log_path

READ_LIMIT = 1 << 20  # bytes per forward read
TAIL_BLOCK = 64 << 10  # bytes per backward read
# A json-file line holds at most 16 KiB of output (MAX_LOG_LINE), ~100 KiB once escaped; a
# longer one is no line the monitor wrote and is skipped rather than buffered without end.
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class LogEntry:
    """One line of a container's json-file log."""

    stream: str  # "stdout" | "stderr"
    time: str  # RFC 3339 with nanoseconds, as the monitor wrote it
    text: str


def parse_line(line: bytes) -> LogEntry | None:
    try:
        raw = json.loads(line)
        return LogEntry(raw["stream"], raw["time"], raw["log"])
    except (ValueError, KeyError, TypeError):
        return None  # an empty line, or one a crash cut short


class JsonLogReader:
    """Reads a json-file log incrementally, across its rotation: the rotated files oldest
    first (``.N`` ... ``.1``), then the current one, following the writer when it rotates.
    A line is returned only once it is complete."""

    def __init__(self, path: Path, start_at_end: bool = False) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._pending = b""
        self._skipping = False  # inside an over-long line: drop up to its newline
        self._from_current = start_at_end  # skip the rotated files (and, below, the backlog)
        if start_at_end:
            self._file = self._open(path)
            if self._file is not None:
                self._file.seek(0, os.SEEK_END)

    @staticmethod
    def _open(path: Path) -> BinaryIO | None:
        try:
            return open(path, "rb")  # noqa: SIM115 (closed by close())
        except FileNotFoundError:
            return None

    def _files(self) -> list[tuple[int, Path]]:
        """(inode, path) of the log's files as they are now, oldest first."""
        prefix = self.path.name + "."
        indexes = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.path.parent) as entries:
            for entry in entries:
                suffix = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
                if suffix.isdigit() and int(suffix) > 0:
                    indexes.append(int(suffix))
        files = []
        for index in [*sorted(indexes, reverse=True), 0]:
            path = rotated_log_path(self.path, index)
            with contextlib.suppress(FileNotFoundError):
                files.append((os.stat(path).st_ino, path))
        return files

    def _first(self) -> BinaryIO | None:
        if self._from_current:
            return self._open(self.path)
        for _, path in self._files():
            f = self._open(path)
            if f is not None:
                return f
        return None

    def _successor(self, current: BinaryIO) -> BinaryIO | None:
        """The next newer file once the writer has rotated past ``current``, else None. As
        ``current`` stays open its inode cannot be reused, so it identifies the file."""
        inode = os.fstat(current.fileno()).st_ino
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == inode:
                return None  # the common case, without listing the directory
        for _ in range(3):  # a rotation between listing and opening: list again
            files = self._files()
            inodes = [i for i, _ in files]
            if not files or inodes[-1] == inode:
                return None  # still the newest file
            # Not listed any more: it was the oldest and got deleted; all the rest is newer.
            newer = files[inodes.index(inode) + 1 :] if inode in inodes else files
            expected, path = newer[0]
            f = self._open(path)
            if f is not None and os.fstat(f.fileno()).st_ino == expected:
                return f
            if f is not None:
                f.close()
        return None

    def _parse(self, data: bytes) -> list[LogEntry]:
        if not data:
            return []
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        if self._skipping and lines:
            lines.pop(0)  # the end of the over-long line
            self._skipping = False
        if len(self._pending) > MAX_LINE:
            self._pending, self._skipping = b"", True
        entries = []
        for line in lines:
            entry = parse_line(line)
            if entry is not None:
                entries.append(entry)
        return entries

    def read_batch(self, limit: int = READ_LIMIT) -> tuple[list[LogEntry], bool]:
        """The entries in the next ``limit`` bytes (about), and whether the reader has caught
        up with the writer (False: call again at once)."""
        if self._file is None:
            self._file = self._first()
            if self._file is None:
                return [], True
        data = self._file.read(limit)
        entries = self._parse(data)
        if len(data) == limit:
            return entries, False
        following = self._successor(self._file)
        if following is None:
            return entries, True
        # What the writer put in the old file before it rotated, then the next file.
        while data := self._file.read(limit):
            entries += self._parse(data)
        self._file.close()
        self._file, self._pending, self._skipping = following, b"", False
        return entries, False

    def read_new(self) -> list[LogEntry]:
        """Everything written since the last read (for small logs and tests: unbounded)."""
        entries: list[LogEntry] = []
        done = False
        while not done:
            batch, done = self.read_batch()
            entries += batch
        return entries

    def tail(self, count: int, wanted: Callable[[LogEntry], bool] | None = None) -> list[LogEntry]:
        """The last ``count`` entries (that ``wanted`` accepts), oldest first, read backwards
        from the end of the newest file in blocks; the reader then continues after them (a
        line the writer has not finished yet is left for the next read)."""
        self.close()
        files = [path for _, path in self._files()]
        found: list[LogEntry] = []  # newest first
        resume_at = 0
        for index, path in enumerate(reversed(files)):
            f = self._open(path)
            if f is None:
                continue
            end = _last_newline_end(f)
            if index == 0:
                self._file, self._pending, self._skipping = f, b"", False
                self._from_current, resume_at = True, end
            try:
                if count > len(found):
                    _scan_backwards(f, end, count - len(found), wanted, found)
            finally:
                if index != 0:
                    f.close()
            if count <= len(found):
                break
        if self._file is not None:
            self._file.seek(resume_at)
        found.reverse()
        return found

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _last_newline_end(f: BinaryIO) -> int:
    """The offset just past the last newline of ``f`` (0 when it has none)."""
    position = f.seek(0, os.SEEK_END)
    while position > 0:
        start = max(0, position - TAIL_BLOCK)
        f.seek(start)
        newline = f.read(position - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _scan_backwards(
    f: BinaryIO,
    end: int,
    count: int,
    wanted: Callable[[LogEntry], bool] | None,
    found: list[LogEntry],
) -> None:
    """Append to ``found`` (newest first) up to ``count`` entries of ``f`` that end before
    ``end`` and that ``wanted`` accepts."""
    position = end
    carry = b""  # the start of the line the later block began in the middle of
    taken = 0
    while position > 0:
        start = max(0, position - TAIL_BLOCK)
        f.seek(start)
        lines = (f.read(position - start) + carry).split(b"\n")
        position = start
        carry = lines.pop(0) if position > 0 else b""
        if len(carry) > MAX_LINE:
            carry = b""  # no line the monitor wrote: skip it
        for line in reversed(lines):
            entry = parse_line(line)
            if entry is None or (wanted is not None and not wanted(entry)):
                continue
            found.append(entry)
            taken += 1
            if taken >= count:
                return
