"""Docker's json-file log format: the options, the writer and the reader, in one place.

One JSON object per line, ``{"log": ..., "stream": "stdout"|"stderr", "time": RFC 3339 nano}``,
in ``container.log``; with ``--log-opt max-size=10m --log-opt max-file=3`` the file rotates as
Docker's json-file driver does: ``container.log`` becomes ``container.log.1``, ``.1`` becomes
``.2`` and so on, and at most ``max-file`` files are kept, the current one included.

The writer (JsonFileLog) runs in the container's monitor (engine.runtime.monitor), a process of
its own: this module stays importable with the standard library and common/ alone.

A log can be as large as the container cares to make it (no max-size: Docker's default), so no
read here holds more than a block of it at a time: ``read_batch`` reads forward at most
``READ_LIMIT`` bytes per call, and ``tail`` reads backwards from the end of the newest file in
blocks, keeping only the entries it returns. Both block on the file system: the engine runs
them in a thread (asyncio.to_thread), never on the event loop.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from common.timefmt import utc_rfc3339

# Docker's json-file driver splits lines longer than this into several entries.
MAX_LOG_LINE = 16 * 1024
LOG_OPTIONS = ("max-size", "max-file")
# Docker reads max-size with go-units' RAMInBytes: binary multiples, "10m" = 10 MiB.
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE | re.ASCII)
# Sizes are int64 in Docker; the file count bounds the rotation's rename loop.
MAX_LOG_SIZE = (1 << 63) - 1
MAX_LOG_FILES = 1024
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
READ_LIMIT = 1 << 20  # bytes per forward read
TAIL_BLOCK = 64 << 10  # bytes per backward read
# A json-file line holds at most 16 KiB of output (MAX_LOG_LINE), ~100 KiB once escaped; a
# longer one is no line the monitor wrote and is skipped rather than buffered without end.
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class LogOptions:
    """The json-file driver's rotation: ``max_size`` bytes per file (0: no rotation) and at
    most ``max_files`` files, the current one included."""

    max_size: int = 0
    max_files: int = 1


def parse_log_size(text: str) -> int:
    """'10m' → 10485760, '512k', '1g', '100' (bytes); ValueError when it is not a size."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size: {text!r}")
    size = float(match[1]) * _SIZE_UNITS[match[2].lower()]
    if not size <= MAX_LOG_SIZE:  # also inf, from a number of hundreds of digits
        raise ValueError(f"invalid size: {text!r} (too large)")
    return int(size)


def parse_log_config(log_config: dict[str, Any] | None) -> LogOptions:
    """HostConfig.LogConfig → LogOptions; ValueError with Docker's wording when it is not a
    json-file configuration this monitor can honour."""
    log_config = log_config or {}
    driver = log_config.get("Type") or "json-file"
    if driver != "json-file":
        raise ValueError(f"log driver {driver!r} is not supported (json-file only)")
    options = log_config.get("Config") or {}
    if not isinstance(options, dict):
        raise ValueError("LogConfig.Config must be an object")
    for key in options:
        if key not in LOG_OPTIONS:
            raise ValueError(f"unknown log opt '{key}' for json-file log driver")
    max_size = 0
    if options.get("max-size"):
        max_size = parse_log_size(str(options["max-size"]))
        if max_size <= 0:
            raise ValueError("max-size must be a positive size")
    max_files = 1
    if options.get("max-file"):
        text = str(options["max-file"])
        if not (text.isascii() and text.isdigit() and len(text) <= 6):
            raise ValueError(f"invalid max-file: {text!r}")
        max_files = int(text)
        if max_files < 1:
            raise ValueError("max-file cannot be less than 1")
        if max_files > MAX_LOG_FILES:
            raise ValueError(f"max-file cannot be more than {MAX_LOG_FILES}")
    return LogOptions(max_size=max_size, max_files=max_files)


def rotated_log_path(path: Path, index: int) -> Path:
    """``container.log`` for 0, ``container.log.N`` for the N-th newest rotated file."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


# --- writing ---------------------------------------------------------------------------------


@dataclass
class JsonFileLog:
    """Writes container output as Docker's json-file driver does: one JSON object per line,
    ``{"log": ..., "stream": "stdout"|"stderr", "time": RFC 3339 nano}``."""

    path: Path
    options: LogOptions = field(default_factory=LogOptions)
    fd: int = -1
    size: int = 0  # bytes in the current file
    decoders: dict[str, codecs.IncrementalDecoder] = field(default_factory=dict)
    write_failed: bool = False

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self.fd).st_size

    def _rotate(self) -> None:
        """Shift ``.1`` → ``.2`` ... (the oldest beyond max-file goes), the current file to
        ``.1``, and start an empty one. Readers that hold the old file open finish reading it
        (rename(2) keeps the inode) and then move on to the next newer file."""
        os.close(self.fd)
        self.fd = -1
        keep = self.options.max_files - 1  # rotated files kept besides the current one
        try:
            if keep == 0:
                self.path.unlink(missing_ok=True)
            else:
                rotated_log_path(self.path, keep).unlink(missing_ok=True)
                for index in range(keep - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(
                            rotated_log_path(self.path, index),
                            rotated_log_path(self.path, index + 1),
                        )
                os.rename(self.path, rotated_log_path(self.path, 1))
        finally:
            self.open()  # even after a failed rename: keep logging, to the old file if need be

    def _decoder(self, stream: str) -> codecs.IncrementalDecoder:
        if stream not in self.decoders:
            self.decoders[stream] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return self.decoders[stream]

    def _emit(self, stream: str, chunk: bytes, final: bool = False) -> None:
        # The decoder keeps an incomplete UTF-8 sequence for the next chunk.
        text = self._decoder(stream).decode(chunk, final=final)
        if not text:
            return
        entry = {"log": text, "stream": stream, "time": utc_rfc3339()}
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8", errors="replace")
        try:
            # Rotate before a line that would push the file past max-size, so that every file
            # stays within it (a single line longer than max-size still gets a file of its own).
            max_size = self.options.max_size
            if max_size and self.size and self.size + len(data) > max_size:
                self._rotate()
            os.write(self.fd, data)
            self.size += len(data)
        except OSError as exc:
            # A full disk must not take the container down with it (Docker drops the line too).
            if not self.write_failed:
                print(f"monitor: cannot write to {self.path}: {exc}", file=sys.stderr)
            self.write_failed = True

    def write(self, stream: str, data: bytes) -> None:
        """One entry per line; a line over 16 KiB is cut; a trailing partial line is written
        as it is, without its newline."""
        while data:
            newline = data.find(b"\n", 0, MAX_LOG_LINE)
            cut = newline + 1 if newline >= 0 else min(len(data), MAX_LOG_LINE)
            self._emit(stream, data[:cut])
            data = data[cut:]

    def finish(self, stream: str) -> None:
        self._emit(stream, b"", final=True)

    def close(self) -> None:
        for stream in list(self.decoders):
            self.finish(stream)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- reading ---------------------------------------------------------------------------------


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
