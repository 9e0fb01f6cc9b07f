"""Runs one pyengine-proxy process per published port for the daemon, and keeps it running.

A proxy serves one listening socket, or two: a port published on 0.0.0.0 and :: is one proxy
with its IPv4 listener as fd 4 and its IPv6 one as fd 5 (proxy/spec.py). The supervisor holds
its own dup of each listening socket, so the port stays bound while a proxy restarts:
connections and datagrams that arrive meanwhile wait in the socket's queue and are served by
the next proxy, which receives the very same sockets as its fds 4 and 5. How a proxy is
started and stopped is proxy/launch.py; what a proxy is asked to serve, proxy/spec.py.

Live restore (``outlive_daemon=True``): the proxies get no parent-death signal, so they outlive
the daemon and keep serving its published ports while no daemon runs. The supervisor records
the proxies that can outlive it under ``state_path`` (proxy/records.py: a directory, one JSON
file per proxy, written atomically when that proxy starts, restarts or stops): each proxy's
key, its :class:`ProxySpec`, and the identity of its process (pid, start time, name, command
line), which tells it from a process that later got the same pid. Handing the proxies over:

1. the old daemon's :meth:`detach` stops watching them and leaves them running (a SIGKILLed
   daemon leaves them running without being asked);
2. the next daemon's :meth:`take_over`, before netd re-reserves host ports, recognises each
   recorded proxy that still runs, holds it by a pidfd, and copies its listening sockets out
   of it (pidfd_getfd(2) of its fds 4 and 5): those copies become netd's reservations of the
   ports, so
   the port is never re-bound and never closed;
3. :meth:`adopt_survivor` then puts each one under supervision again, watched through its
   pidfd and restarted on the same socket if it dies, like a proxy of this supervisor's own;
   :meth:`stop_survivors` stops those no container claimed. A proxy forked but not recorded
   yet when the old daemon was killed is found by the marker in its environment
   (proxy/strays.py) and stopped by :meth:`take_over`.

Without ``outlive_daemon`` the proxies die with the daemon, as docker-proxy dies with dockerd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy import hostlimits, strays
from proxy.childprocess import ChildProcess, describe_exit, watch_process
from proxy.hostlimits import HostLimitError
from proxy.launch import ProxyError, ProxyLauncher, terminate
from proxy.listencheck import dup_socket, same_socket
from proxy.pidfd import ProcessIdentity
from proxy.records import ProxyRecord, RecordDirectory, Survivor, recognise
from proxy.spec import PortAddress, ProxySpec

__all__ = [
    "HostLimitError",
    "Listeners",
    "PortAddress",
    "ProxyError",
    "ProxySpec",
    "ProxySupervisor",
]

Listeners = socket.socket | Sequence[socket.socket]
"""A proxy's listening socket, or its sockets in fd order (one per address of its spec)."""

log = logging.getLogger("proxy.supervisor")

HANDSHAKE_TIMEOUT_SECONDS = 10.0
# Starts in flight at once in a batch: each holds a status pipe (2 fds) and its request holds
# 2 fds queued to the fork server; the window keeps both bounded whatever the batch's size.
START_WINDOW = 64
# A proxy that dies again soon after a restart is restarted with growing delays.
_STABLE_AFTER_SECONDS = 10.0
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0


@dataclass(eq=False)
class _SupervisedProxy:
    key: str
    spec: ProxySpec
    listen_sockets: tuple[socket.socket, ...] = field(default=())
    child: ChildProcess | None = None
    identity: ProcessIdentity | None = None  # of the process last started (or adopted)
    started_at: float = 0.0
    outlives_supervisor: bool = False  # the process last started (or adopted) would
    quick_exits: int = 0
    stopping: bool = False
    restart_task: asyncio.Task[None] | None = None


class ProxySupervisor:
    def __init__(
        self,
        argv: list[str] | None = None,
        *,
        fork_server: bool | None = None,
        state_path: Path | None = None,
        outlive_daemon: bool = False,
    ) -> None:
        """argv: how to run the proxy; default [sys.executable, "-m", "proxy.main"].

        fork_server: fork each proxy from a warm fork server (proxy/forkserver.py) instead of
        exec'ing ``argv``; by default, whenever ``argv`` is this Python's own proxy.

        state_path: the directory where the running proxies are recorded (a JSON file each),
        for :meth:`take_over` in the next daemon; None: nowhere.

        outlive_daemon: the proxies keep running when this process (or the fork server) dies,
        instead of getting SIGTERM (PR_SET_PDEATHSIG); for live restore."""
        # The proxies carry the record directory's marker (proxy/strays.py), so that the
        # next daemon finds one forked but not yet recorded when this one was killed.
        env = strays.marked_environment(state_path) if state_path is not None else None
        self._launcher = ProxyLauncher(
            argv, fork_server=fork_server, env=env, outlive_parent=outlive_daemon
        )
        self._state_path = state_path
        self._records = RecordDirectory(state_path) if state_path is not None else None
        self._outlive_daemon = outlive_daemon
        self._proxies: dict[str, _SupervisedProxy] = {}
        self._survivors: dict[str, Survivor] = {}
        self._changed: set[str] = set()  # keys whose record is to be written or removed

    # ---- proxies of this supervisor's own ------------------------------------------------------

    async def start(self, key: str, spec: ProxySpec, listen_sock: Listeners) -> int:
        """Start one proxy for spec with listen_sock passed as fd 4 (-use-listen-fd; a second
        socket, for ``spec.host_ip2``, as fd 5) and a pipe as fd 3; wait for the handshake
        (timeout 10 s) and return its pid; raise ProxyError on '1\\n<err>' or early exit. The
        supervisor keeps its own dup of each socket, so the caller may close its copies. If the
        proxy later dies unexpectedly, it is restarted on the same sockets, with one log line."""
        pids = await self.start_many([(key, spec, listen_sock)])
        return pids[key]

    async def start_many(
        self, proxies: Sequence[tuple[str, ProxySpec, Listeners]]
    ) -> dict[str, int]:
        """:meth:`start` for many ports at once, all or nothing: the requests go to the fork
        server back to back (up to START_WINDOW in flight), and the records are written in
        one pass at the end. If one proxy cannot start, the others of the batch are stopped
        again and ProxyError says why the first failed; HostLimitError (one) when the host or
        this process cannot hold that many more proxies, before any starts. Returns the pids
        by key."""
        seen: set[str] = set()
        for key, _, _ in proxies:
            if key in seen or key in self._proxies or key in self._survivors:
                raise ProxyError(f"a proxy for {key} is already running")
            seen.add(key)
        sockets = sum(len(spec.addresses) for _, spec, _ in proxies)
        hostlimits.check_room(len(proxies), sockets, START_WINDOW)
        batch: list[_SupervisedProxy] = []
        try:
            for key, spec, listen_sock in proxies:
                supervised = _SupervisedProxy(key=key, spec=spec)
                self._proxies[key] = supervised
                batch.append(supervised)
                supervised.listen_sockets = _own_copies(key, spec, listen_sock)
            window = asyncio.Semaphore(START_WINDOW)
            results = await asyncio.gather(
                *(self._start_one(supervised, window) for supervised in batch),
                return_exceptions=True,
            )
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure
            self._save()
        except BaseException as err:
            await self._undo_batch(batch)
            if isinstance(err, OSError):
                # Unrecorded, a proxy that outlives this daemon would be unknown to the next.
                raise ProxyError(
                    f"cannot record the proxies in {self._state_path}: {err.strerror or err}"
                ) from None
            raise
        return {s.key: s.child.pid for s in batch if s.child is not None}

    async def _start_one(self, supervised: _SupervisedProxy, window: asyncio.Semaphore) -> None:
        async with window:
            if supervised.stopping:
                raise ProxyError(f"proxy for {supervised.key} was stopped while starting")
            child = await self._launch(supervised)
        if supervised.stopping:
            await terminate(child)
            raise ProxyError(f"proxy for {supervised.key} was stopped while starting")
        self._watch(supervised, child)

    async def _undo_batch(self, batch: list[_SupervisedProxy]) -> None:
        """Stop what a failed batch started and forget all of it."""
        for supervised in batch:
            supervised.stopping = True
        await asyncio.gather(
            *(terminate(s.child) for s in batch if s.child is not None), return_exceptions=True
        )
        for supervised in batch:
            if self._proxies.get(supervised.key) is supervised:
                del self._proxies[supervised.key]
                self._changed.add(supervised.key)
            _close_all(supervised.listen_sockets)
        self._save_or_warn()

    async def stop(self, key: str) -> None:
        """SIGTERM the proxy (through its pidfd), wait up to 5 s, then SIGKILL; close the
        socket dup. A survivor not adopted yet is stopped the same way."""
        await self.stop_many([key])

    async def stop_many(self, keys: Iterable[str]) -> None:
        """:meth:`stop` for many keys at once: every proxy is signalled at once, their exits
        are awaited together, and the records are removed in one pass."""
        try:
            await asyncio.gather(*(self._stop_one(key) for key in set(keys)))
        finally:
            self._save_or_warn()

    def begin_stop(self, keys: Iterable[str]) -> None:
        """Ask the proxies of ``keys`` to stop now (SIGTERM through the pidfd) without waiting
        for them: their exits (the kernel's teardown of each process) run while the caller
        does other work, and a later :meth:`stop_many` of the same keys awaits them. A proxy
        asked to stop is not restarted."""
        for key in keys:
            supervised = self._proxies.get(key)
            if supervised is None:
                continue
            supervised.stopping = True
            if supervised.child is not None:
                supervised.child.send_signal(signal.SIGTERM)

    async def _stop_one(self, key: str) -> None:
        survivor = self._survivors.pop(key, None)
        if survivor is not None:
            self._changed.add(key)
            await self._stop_survivor(survivor)
        supervised = self._proxies.pop(key, None)
        if supervised is None:
            return
        self._changed.add(key)
        supervised.stopping = True
        try:
            if supervised.restart_task is not None:
                supervised.restart_task.cancel()
                await asyncio.gather(supervised.restart_task, return_exceptions=True)
            if supervised.child is not None:
                await terminate(supervised.child)
        finally:
            _close_all(supervised.listen_sockets)

    async def stop_all(self) -> None:
        """Stop every proxy (survivors included), then the fork server (started again if a
        proxy is started later)."""
        await self._launcher.cancel_warm_up()
        await self.stop_many(list(self._proxies))
        await self.stop_survivors()
        await self._launcher.close()
        self._save_or_warn()

    async def detach(self) -> None:
        """Live restore: leave every proxy running and stop supervising it; the state file
        keeps them for the next daemon's :meth:`take_over`. A restart in progress is given
        up (that port waits for the next daemon). Then the fork server is stopped; the proxies
        do not depend on it. Without ``outlive_daemon`` the proxies could not outlive this
        process anyway: this is :meth:`stop_all`."""
        if not self._outlive_daemon:
            await self.stop_all()
            return
        await self._launcher.cancel_warm_up()
        self._save_or_warn()
        proxies, self._proxies = list(self._proxies.values()), {}
        survivors, self._survivors = list(self._survivors.values()), {}
        restarts = [p.restart_task for p in proxies if p.restart_task is not None]
        for supervised in proxies:
            supervised.stopping = True
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        for supervised in proxies:
            if supervised.child is not None:
                supervised.child.release()
            _close_all(supervised.listen_sockets)
        for survivor in survivors:
            survivor.close()
        await self._launcher.close()
        log.info("left %d proxies running for the next daemon", len(proxies) + len(survivors))

    @property
    def fork_server_pid(self) -> int | None:
        return self._launcher.fork_server_pid

    def pids(self) -> dict[str, int]:
        return {
            key: supervised.child.pid
            for key, supervised in self._proxies.items()
            if supervised.child is not None and supervised.child.running
        }

    # ---- proxies a previous daemon left running --------------------------------------------

    async def take_over(self, *, keep: bool = True) -> dict[PortAddress, socket.socket]:
        """Find the proxies recorded in the state file that still run (same pid, start time,
        name and command line). ``keep``: hold each one (a pidfd, and a copy of each listening
        socket taken from its fds 4 and 5) until :meth:`adopt_survivor` or
        :meth:`stop_survivors`, and return another copy of each socket keyed (proto, host_ip,
        host_port), for netd's
        ``setup(held_sockets=...)``; the caller owns those. Otherwise stop them and return {}.
        Records of proxies that are gone, or whose pid now names another process, are
        dropped (that process is left alone). Then every other process carrying this record
        directory's marker (proxy/strays.py) is stopped: a proxy a killed daemon forked but
        had not recorded yet. Call it before starting any proxy."""
        if self._proxies or self._survivors:
            raise ProxyError("take_over() must come before any proxy is started or adopted")
        held: dict[PortAddress, socket.socket] = {}
        unwanted: list[Survivor] = []
        try:
            for record in self._records.load() if self._records is not None else []:
                key, spec = record.key, record.spec
                survivor = recognise(record)
                if survivor is None:
                    continue
                if survivor.problem is not None:
                    log.warning("proxy %s (pid %d): %s", key, record.identity.pid, survivor.problem)
                if (
                    survivor.problem is not None
                    or not keep
                    or key in self._survivors
                    or any(address in held for address in spec.addresses)
                ):
                    unwanted.append(survivor)
                    continue
                try:
                    copies = [dup_socket(sock) for sock in survivor.listen_sockets]
                except OSError as err:
                    log.warning("cannot duplicate the socket of proxy %s: %s", key, err.strerror)
                    unwanted.append(survivor)
                    continue
                held.update(zip(spec.addresses, copies, strict=True))
                self._survivors[key] = survivor
        finally:
            await asyncio.gather(*(self._stop_survivor(s) for s in unwanted))
            self._save_or_warn(everything=True)
        await self._stop_strays()
        if held:
            log.info("taking over %d proxies left running by the previous daemon", len(held))
        return held

    async def _stop_strays(self) -> None:
        """Stop the proxies of this record directory that no record accounts for (forked
        by a daemon killed before it recorded them), so that their ports are free again."""
        if self._state_path is None:
            return
        kept = {s.record.identity.pid for s in self._survivors.values()}
        found = await asyncio.to_thread(strays.find_marked, self._state_path, kept)
        if found:
            stopped = await asyncio.to_thread(strays.stop_marked, self._state_path, found)
            log.warning("stopped %d proxies no record accounted for", stopped)

    async def adopt_survivor(
        self, key: str, spec: ProxySpec, reservation: Listeners | None = None
    ) -> int | None:
        """Supervise the survivor recorded under ``key`` (see :meth:`adopt`) and return its
        pid; None when there is none. A survivor that does not serve ``spec`` on the sockets
        ``reservation`` (netd's reservations of the port, when given) is stopped instead, and
        None returned: the caller starts a new proxy."""
        survivor = self._survivors.pop(key, None)
        if survivor is None:
            return None
        reserved = None if reservation is None else _as_tuple(reservation)
        mismatch = (
            "a different mapping"
            if survivor.record.spec != spec
            else "another socket"
            if reserved is not None
            and (
                len(reserved) != len(survivor.listen_sockets)
                or not all(map(same_socket, reserved, survivor.listen_sockets))
            )
            else None
        )
        if mismatch is not None:
            log.warning("proxy %s of the previous daemon serves %s; replacing it", key, mismatch)
            self._changed.add(key)
            await self._stop_survivor(survivor)
            self._save_or_warn()
            return None
        pid = survivor.record.identity.pid
        self.adopt(key, spec, pid, survivor.pidfd, survivor.listen_sockets)
        return pid

    def adopt(self, key: str, spec: ProxySpec, pid: int, pidfd: int, sock: Listeners) -> None:
        """Supervise a running proxy this supervisor did not start (and whose parent it is
        not): ``pidfd`` refers to it and ``sock`` is its listening socket (or sockets); the
        supervisor owns them from now on. It is watched through the pidfd (readable once it
        exits: no waitpid) and, if it dies, restarted on ``sock`` like a proxy of its own;
        :meth:`stop` terminates it through the pidfd."""
        sockets = _as_tuple(sock)
        if key in self._proxies:
            os.close(pidfd)
            _close_all(sockets)
            raise ProxyError(f"a proxy for {key} is already running")
        supervised = _SupervisedProxy(key=key, spec=spec, listen_sockets=sockets)
        self._proxies[key] = supervised
        child = watch_process(pid, pidfd, reaped_elsewhere=False, foreign=True)
        self._watch(supervised, child)
        self._save_or_warn()
        log.info("adopted proxy %s (pid %d)", key, pid)
        self._launcher.start_warm_up()

    async def stop_survivors(self) -> None:
        """Stop the survivors nobody adopted (their containers were not restored)."""
        survivors, self._survivors = list(self._survivors.values()), {}
        if not survivors:
            return
        self._changed.update(s.record.key for s in survivors)
        await asyncio.gather(*(self._stop_survivor(s) for s in survivors))
        self._save_or_warn()

    async def _stop_survivor(self, survivor: Survivor) -> None:
        pid = survivor.record.identity.pid
        log.info("stopping proxy %s (pid %d) of the previous daemon", survivor.record.key, pid)
        child = watch_process(pid, survivor.pidfd, reaped_elsewhere=False, foreign=True)
        try:
            await terminate(child)
        finally:
            survivor.close_sockets()

    # ---- the record of the running proxies -----------------------------------------------------

    def _record_of(self, key: str) -> ProxyRecord | None:
        """The record of a proxy that can outlive this process (started to, or adopted): the
        others die with it (PR_SET_PDEATHSIG). Survivors of a previous daemon stay recorded
        until they are stopped or adopted."""
        p = self._proxies.get(key)
        if p is not None and p.identity is not None and p.outlives_supervisor:
            return ProxyRecord(p.key, p.spec, p.identity)
        survivor = self._survivors.get(key)
        return survivor.record if survivor is not None else None

    def _save(self, *, everything: bool = False) -> None:
        """Write the records of the proxies that changed since the last save (proxy/records.py),
        or with ``everything``, bring the whole directory in line with what runs. Raises
        OSError."""
        changed, self._changed = self._changed, set()
        if self._records is None:
            return
        try:
            if everything:
                keys = list(self._proxies) + list(self._survivors)
                self._records.save(r for r in map(self._record_of, keys) if r is not None)
            elif changed:
                self._records.update({key: self._record_of(key) for key in changed})
        except OSError:
            self._changed |= changed  # tried again at the next save
            raise

    def _save_or_warn(self, *, everything: bool = False) -> None:
        try:
            self._save(everything=everything)
        except OSError as err:
            log.warning("cannot record the running proxies in %s: %s", self._state_path, err)

    # ---- starting and watching -----------------------------------------------------------------

    async def _launch(self, supervised: _SupervisedProxy) -> ChildProcess:
        """Spawn the proxy and wait for its handshake; on any failure it is killed again."""
        return await self._launcher.launch(
            supervised.key, supervised.spec, supervised.listen_sockets, HANDSHAKE_TIMEOUT_SECONDS
        )

    def _watch(self, supervised: _SupervisedProxy, child: ChildProcess) -> None:
        loop = asyncio.get_running_loop()
        supervised.child = child
        supervised.started_at = loop.time()
        supervised.outlives_supervisor = self._outlive_daemon or child.foreign
        # Only a proxy that can outlive this process is recorded (with its identity).
        outlives = supervised.outlives_supervisor and self._records is not None
        supervised.identity = (
            ProcessIdentity.of(child.pid, child.cmdline) if outlives and child.running else None
        )
        self._changed.add(supervised.key)
        child.exited.add_done_callback(lambda _: self._on_exit(supervised, child))

    def _on_exit(self, supervised: _SupervisedProxy, child: ChildProcess) -> None:
        if supervised.stopping or supervised.child is not child:
            return
        supervised.child = None
        loop = asyncio.get_running_loop()
        if loop.time() - supervised.started_at < _STABLE_AFTER_SECONDS:
            supervised.quick_exits += 1
        else:
            supervised.quick_exits = 0
        # The first unexpected exit is restarted at once; a proxy that keeps dying backs off.
        delay = _backoff(supervised.quick_exits - 1) if supervised.quick_exits > 1 else 0.0
        log.warning(
            "proxy %s (pid %d) exited unexpectedly (%s); restarting%s",
            supervised.key,
            child.pid,
            describe_exit(child.exited.result()),
            f" in {delay:g} s" if delay else "",
        )
        supervised.restart_task = loop.create_task(self._restart(supervised, delay))

    async def _restart(self, supervised: _SupervisedProxy, delay: float) -> None:
        failures = 0
        while not supervised.stopping:
            if delay:
                await asyncio.sleep(delay)
            try:
                child = await self._launch(supervised)
            except Exception as err:  # keep supervising whatever went wrong this time
                failures += 1
                delay = _backoff(failures)
                log.warning(
                    "restarting proxy %s failed: %s; retrying in %g s", supervised.key, err, delay
                )
                continue
            supervised.restart_task = None
            self._watch(supervised, child)
            self._save_or_warn()
            return


def _as_tuple(listeners: Listeners) -> tuple[socket.socket, ...]:
    return (listeners,) if isinstance(listeners, socket.socket) else tuple(listeners)


def _own_copies(key: str, spec: ProxySpec, listeners: Listeners) -> tuple[socket.socket, ...]:
    """The supervisor's own dup of each of a proxy's sockets, one per address of ``spec``."""
    given = _as_tuple(listeners)
    if len(given) != len(spec.addresses):
        raise ProxyError(
            f"proxy for {key} listens on {len(spec.addresses)} addresses, given {len(given)} "
            "sockets"
        )
    copies: list[socket.socket] = []
    try:
        for sock in given:
            copies.append(dup_socket(sock))
    except OSError as err:
        _close_all(copies)
        raise ProxyError(f"cannot duplicate the socket for {key}: {err.strerror}") from None
    return tuple(copies)


def _close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _backoff(attempt: int) -> float:
    return min(_MAX_BACKOFF_SECONDS, _FIRST_BACKOFF_SECONDS * 2.0 ** max(0, attempt - 1))
