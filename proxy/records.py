"""The record of the proxies that can outlive the daemon (live restore), and the survivors the
next daemon recognises from it.

The record is a directory with one small JSON file per container — per group of keys that
share their first segment, ``<container id>/<proto>/<host ip>/<host port>`` — holding, for
each of its proxies, the key, the :class:`ProxySpec`, and the identity of its process (pid,
start time, name, command line), which tells it from a process that later got the same pid.
A container's proxies start and stop as one batch, so a batch writes or removes one file,
whatever the number of its ports and of the other containers' (a file per proxy cost 2,000
file creations to publish 1,000 ports dual-stack; one file rewritten in full after every start
made 1,000 starts take 18 s instead of 3 s). The files are replaced atomically without fsync
(common.jsonstate.replace_json): a record only describes running processes, which a crash of
the host that could lose the write ends too. The earlier forms — one file per proxy, or a
single file holding them all — are read once and replaced.
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

from common.jsonstate import CorruptRecord, read_json, read_record, replace_json
from proxy.handshake import LISTEN_FDS
from proxy.listencheck import listener_problem
from proxy.pidfd import ProcessIdentity, open_pidfd, socket_of
from proxy.spec import ProxySpec

log = logging.getLogger("proxy.supervisor")

STATE_VERSION = 2  # 1: one file per proxy, each a record itself


def record_name(key: str) -> str:
    """The file that holds the record of ``key``: that of its group (its container)."""
    group = key.partition("/")[0]
    return hashlib.sha256(group.encode()).hexdigest()[:24] + ".json"


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
    """The record directory at ``path``. It remembers what it wrote there, so that a save
    writes or removes only the files of the groups that changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Group files on disk, by name: the records each holds.
        self._written: dict[str, dict[str, ProxyRecord]] = {}
        # Files a previous daemon left (other forms, malformed): replaced or removed by save().
        self._stale: set[str] = set()

    def save(self, records: Iterable[ProxyRecord]) -> None:
        """Bring the directory in line with ``records``, the proxies that can outlive this
        process (the last record of a key wins). Raises OSError."""
        wanted: dict[str, dict[str, ProxyRecord]] = {}
        for record in records:
            wanted.setdefault(record_name(record.key), {})[record.key] = record
        if self.path.is_file():
            self.path.unlink()  # the single-file form, read once by load()
        for name in [n for n in [*self._written, *self._stale] if n not in wanted]:
            (self.path / name).unlink(missing_ok=True)
            self._written.pop(name, None)
        stale, self._stale = self._stale, set()
        for name, group in wanted.items():
            if name in stale or self._written.get(name) != group:
                self._write(name, group)
        self._remove_if_empty()

    def update(self, changes: Mapping[str, ProxyRecord | None]) -> None:
        """Write the record of each changed key, or remove it (None): one file per group
        touched, whatever the number of the others. Raises OSError."""
        touched: dict[str, dict[str, ProxyRecord]] = {}
        for key, record in changes.items():
            name = record_name(key)
            written = self._written.get(name, {})
            if written.get(key) == record and name not in self._stale:
                continue  # e.g. a survivor adopted as it was recorded
            if name not in touched:
                touched[name] = dict(written)
            if record is None:
                touched[name].pop(key, None)
            else:
                touched[name][key] = record
        for name, group in touched.items():
            self._stale.discard(name)
            if group:
                self._write(name, group)
            else:
                (self.path / name).unlink(missing_ok=True)
                self._written.pop(name, None)
        self._remove_if_empty()

    def _write(self, name: str, group: dict[str, ProxyRecord]) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        content = {"version": STATE_VERSION, "proxies": [r.to_json() for r in group.values()]}
        replace_json(self.path / name, content)
        self._written[name] = group

    def _remove_if_empty(self) -> None:
        if self._written or self._stale:
            return
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # not empty: files that are not ours

    def load(self) -> list[ProxyRecord]:
        """The records a previous daemon left: a directory of one file per container (or per
        proxy, or the earlier single file holding them all). Every file read is replaced or
        removed by the next :meth:`save`."""
        path = self.path
        entries: list[Any] = []
        try:
            if path.is_file():
                entries = _entries(read_json(path, {}))
            elif path.is_dir():
                for f in sorted(path.glob("*.json")):
                    self._stale.add(f.name)
                    try:
                        entries.extend(_entries(read_record(f, {})))
                    except CorruptRecord as err:
                        # One unreadable file must not cost the other containers their proxies.
                        log.warning("ignoring a corrupt proxy record: %s", err)
                # Temporary files of writes a SIGKILL cut short (replace_json's names).
                for leftover in path.glob(".*.json.tmp*"):
                    leftover.unlink(missing_ok=True)
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: %s", path, err)
            return []
        loaded = []
        for entry in entries:
            try:
                loaded.append(ProxyRecord.from_json(entry))
            except (KeyError, TypeError, ValueError) as err:
                log.warning("ignoring a malformed proxy record in %s: %r", path, err)
        return loaded


def _entries(content: Any) -> list[Any]:
    """The records in one file's content: a group's ``proxies`` list, or one record (the
    per-proxy form)."""
    if isinstance(content, dict) and isinstance(content.get("proxies"), list):
        return list(content["proxies"])
    return [content] if isinstance(content, dict) and content else [{}]


@dataclass(eq=False)
class Survivor:
    """A proxy a previous daemon left running: recognised and held, not supervised yet."""

    record: ProxyRecord
    pidfd: int
    listen_sockets: tuple[socket.socket, ...]  # copies of the proxy's fd 4 (and fd 5)
    problem: str | None = None  # why it cannot be kept, though it is the recorded proxy

    def close(self) -> None:
        """Let go of the process (it keeps running) and of the copies of its sockets."""
        os.close(self.pidfd)
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in self.listen_sockets:
            sock.close()


def recognise(record: ProxyRecord) -> Survivor | None:
    """The recorded proxy, held by a pidfd, with a copy of each of its listening sockets (or
    the problem with them); None (and a log line) when it is gone or its pid names another
    process now."""
    pidfd = open_pidfd(record.identity)
    if pidfd is None:
        log.info(
            "proxy %s (pid %d) of the previous daemon is gone", record.key, record.identity.pid
        )
        return None
    sockets: list[socket.socket] = []
    problem = None
    for fd in LISTEN_FDS[: len(record.spec.addresses)]:
        try:
            sock = socket_of(pidfd, fd)
        except OSError as err:
            problem = f"its fd {fd} cannot be taken ({err})"
            break
        sockets.append(sock)
        problem = listener_problem(sock, record.spec, fd)
        if problem is not None:
            break
    return Survivor(record, pidfd, tuple(sockets), problem)
