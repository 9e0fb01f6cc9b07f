"""The record of the proxies that can outlive the daemon (live restore), and the survivors the
next daemon recognises from it.

The record is a directory with one small JSON file per proxy, named after its key and written
atomically when that proxy starts, restarts or stops: its key, its :class:`ProxySpec`, and the
identity of its process (pid, start time, name, command line), which tells it from a process
that later got the same pid. One file per proxy, so that a start or a stop writes or removes
one file whatever the number of proxies (one file rewritten in full after every start made
1,000 starts take 18 s instead of 3 s). A batch of starts or stops writes its files in one
pass (:meth:`RecordDirectory.update`), without fsync: a record only describes processes, and a
crash of the host that could lose the write ends them too; rename(2) alone makes each file
appear whole to the next daemon (an fsync per file cost ~1 ms, 2 s for 2,000 proxies). The
earlier form, a single file holding them all, is read once and replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.jsonstate import CorruptRecord, read_json, read_record, write_json_atomic
from proxy.handshake import LISTEN_FD
from proxy.listencheck import listener_problem
from proxy.pidfd import ProcessIdentity, open_pidfd, socket_of
from proxy.spec import ProxySpec

log = logging.getLogger("proxy.supervisor")

STATE_VERSION = 1


def record_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24] + ".json"


@dataclass(frozen=True)
class ProxyRecord:
    """One recorded proxy: the port it serves and the process that serves it."""

    key: str
    spec: ProxySpec
    identity: ProcessIdentity

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "key": self.key,
            "spec": self.spec.to_json(),
            "process": self.identity.to_json(),
        }

    @classmethod
    def from_json(cls, entry: Any) -> ProxyRecord:
        """Raises KeyError, TypeError or ValueError on a malformed record."""
        return cls(
            str(entry["key"]),
            ProxySpec.from_json(entry["spec"]),
            ProcessIdentity.from_json(entry["process"]),
        )


class RecordDirectory:
    """The record directory at ``path``. It remembers what it wrote there, so that
    :meth:`save` writes or removes only the files of the proxies that changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Record files on disk, by name: what each holds (None: to be replaced or removed).
        self._written: dict[str, ProxyRecord | None] = {}

    def save(self, records: Iterable[ProxyRecord]) -> None:
        """Bring the directory in line with ``records``, the proxies that can outlive this
        process (the last record of a key wins). Raises OSError."""
        wanted = {record_name(record.key): record for record in records}
        if self.path.is_file():
            self.path.unlink()  # the single-file form, read once by load()
        for name in [n for n in self._written if n not in wanted]:
            (self.path / name).unlink(missing_ok=True)
            del self._written[name]
        self._write(wanted)

    def update(self, changes: Mapping[str, ProxyRecord | None]) -> None:
        """Write the record of each changed key, or remove it (None): the cost of a batch is
        that of its own proxies, whatever the number of the others. Raises OSError."""
        if self.path.is_file():
            self.path.unlink()
        wanted: dict[str, ProxyRecord] = {}
        for key, record in changes.items():
            name = record_name(key)
            if record is not None:
                wanted[name] = record
            elif name in self._written:
                (self.path / name).unlink(missing_ok=True)
                del self._written[name]
        self._write(wanted)

    def _write(self, wanted: Mapping[str, ProxyRecord]) -> None:
        made = False
        for name, record in wanted.items():
            if self._written.get(name) == record:
                continue
            if not made:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                made = True
            write_json_atomic(self.path / name, record.to_json(), durable=False)
            self._written[name] = record
        if not self._written:
            try:
                self.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                pass  # not empty: files that are not ours

    def load(self) -> list[ProxyRecord]:
        """The records a previous daemon left: a directory of one file per proxy (or the
        earlier single file holding them all)."""
        path = self.path
        entries: list[tuple[str, Any]] = []  # (record file name, content)
        try:
            if path.is_file():
                data = read_json(path, {})
                found = data.get("proxies", []) if isinstance(data, dict) else []
                entries = [("", e) for e in (found if isinstance(found, list) else [])]
            elif path.is_dir():
                for f in sorted(path.glob("*.json")):
                    try:
                        entries.append((f.name, read_record(f, {})))
                    except CorruptRecord as err:
                        # One unreadable record must not cost the others their proxy.
                        log.warning("ignoring a corrupt proxy record: %s", err)
                        entries.append((f.name, {}))  # malformed: save() removes it
                # Temporary files of writes a SIGKILL cut short (write_json_atomic's names).
                for leftover in path.glob(".*.json.tmp*"):
                    leftover.unlink(missing_ok=True)
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: %s", path, err)
            return []
        loaded = []
        for name, entry in entries:
            if name:
                # On disk now: save() replaces or removes it (a malformed one too).
                self._written[name] = None
            try:
                record = ProxyRecord.from_json(entry)
            except (KeyError, TypeError, ValueError) as err:
                log.warning("ignoring a malformed proxy record in %s: %r", path, err)
                continue
            loaded.append(record)
            if name == record_name(record.key):
                self._written[name] = record
        return loaded


@dataclass(eq=False)
class Survivor:
    """A proxy a previous daemon left running: recognised and held, not supervised yet."""

    record: ProxyRecord
    pidfd: int
    listen_socket: socket.socket | None  # a copy of the proxy's fd 4
    problem: str | None = None  # why it cannot be kept, though it is the recorded proxy

    def close(self) -> None:
        """Let go of the process (it keeps running) and of the copy of its socket."""
        os.close(self.pidfd)
        if self.listen_socket is not None:
            self.listen_socket.close()


def recognise(record: ProxyRecord) -> Survivor | None:
    """The recorded proxy, held by a pidfd, with a copy of its listening socket (or the
    problem with it); None (and a log line) when it is gone or its pid names another process
    now."""
    pidfd = open_pidfd(record.identity)
    if pidfd is None:
        log.info(
            "proxy %s (pid %d) of the previous daemon is gone", record.key, record.identity.pid
        )
        return None
    try:
        sock = socket_of(pidfd, LISTEN_FD)
    except OSError as err:
        return Survivor(record, pidfd, None, f"its fd {LISTEN_FD} cannot be taken ({err})")
    return Survivor(record, pidfd, sock, listener_problem(sock, record.spec))
