"""Runs one pyengine-proxy process per published port for the daemon, and keeps it running.

The supervisor holds its own dup of each listening socket, so the port stays bound while a
proxy restarts: connections and datagrams that arrive meanwhile wait in the socket's queue and
are served by the next proxy, which receives the very same socket as its fd 4.

Live restore (``outlive_daemon=True``): the proxies get no parent-death signal, so they outlive
the daemon and keep serving its published ports while no daemon runs. The supervisor records
the proxies that can outlive it under ``state_path`` (a directory, one JSON file per proxy,
written atomically when that proxy starts, restarts or stops): each proxy's key, its
:class:`ProxySpec`, and the identity of its process (pid, start time, name, command line),
which tells it from a process that later got the same pid. Handing the
proxies over:

1. the old daemon's :meth:`detach` stops watching them and leaves them running (a SIGKILLed
   daemon leaves them running without being asked);
2. the next daemon's :meth:`take_over`, before netd re-reserves host ports, recognises each
   recorded proxy that still runs, holds it by a pidfd, and copies its listening socket out of
   it (pidfd_getfd(2) of its fd 4): those copies become netd's reservations of the ports, so
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
import hashlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.jsonstate import CorruptRecord, read_json, read_record, write_json_atomic
from common.ports import PortMapping
from proxy import strays
from proxy.childprocess import ChildProcess, describe_exit, spawn_with_fds, watch_process
from proxy.forkclient import ForkServerClient
from proxy.forkserver import ForkServerError
from proxy.handshake import LISTEN_FD, STATUS_FD, read_status
from proxy.pidfd import ProcessIdentity, open_pidfd, socket_of
from proxy.prctl import OUTLIVE_PARENT_ENV

log = logging.getLogger("proxy.supervisor")

HANDSHAKE_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0
# A proxy that dies again soon after a restart is restarted with growing delays.
_STABLE_AFTER_SECONDS = 10.0
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0
STATE_VERSION = 1

_SOCKET_TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}

PortAddress = tuple[str, str, int]
"""(proto, host_ip, host_port): how netd names a port reservation."""


class ProxyError(Exception):
    """A proxy could not be started; the message says why in one line."""


@dataclass(frozen=True)
class ProxySpec(PortMapping):
    """A published port as the engine hands it over, and how its proxy talks to the container."""

    proxy_protocol: str | None = None  # "v1" | "v2": a PROXY protocol header to the container

    @classmethod
    def of(cls, port: PortMapping, proxy_protocol: str | None = None) -> ProxySpec:
        return cls(
            port.proto,
            port.host_ip,
            port.host_port,
            port.container_ip,
            port.container_port,
            proxy_protocol,
        )

    @property
    def address(self) -> PortAddress:
        return (self.proto, self.host_ip, self.host_port)

    def command_line(self) -> list[str]:
        extra = ["-proxy-protocol", self.proxy_protocol] if self.proxy_protocol else []
        return [
            "-proto",
            self.proto,
            "-host-ip",
            self.host_ip,
            "-host-port",
            str(self.host_port),
            "-container-ip",
            self.container_ip,
            "-container-port",
            str(self.container_port),
            "-use-listen-fd",
            *extra,
        ]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProxySpec:
        proxy_protocol = data.get("proxy_protocol")
        return cls.of(
            PortMapping.from_json(data), None if proxy_protocol is None else str(proxy_protocol)
        )


@dataclass(eq=False)
class _SupervisedProxy:
    key: str
    spec: ProxySpec
    listen_socket: socket.socket
    child: ChildProcess | None = None
    identity: ProcessIdentity | None = None  # of the process last started (or adopted)
    started_at: float = 0.0
    outlives_supervisor: bool = False  # the process last started (or adopted) would
    quick_exits: int = 0
    stopping: bool = False
    restart_task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Survivor:
    """A proxy a previous daemon left running: recognised and held, not supervised yet."""

    key: str
    spec: ProxySpec
    identity: ProcessIdentity
    pidfd: int
    listen_socket: socket.socket | None  # a copy of the proxy's fd 4
    problem: str | None = None  # why it cannot be kept, though it is the recorded proxy


def _record_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24] + ".json"


def default_proxy_argv() -> list[str]:
    return [sys.executable, "-m", "proxy.main"]


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
        self._argv = list(argv) if argv else default_proxy_argv()
        if fork_server is None:
            fork_server = self._argv == default_proxy_argv()
        # The proxies carry the record directory's marker (proxy/strays.py), so that the
        # next daemon finds one forked but not yet recorded when this one was killed.
        self._env = strays.marked_environment(state_path) if state_path is not None else None
        self._fork_server = ForkServerClient(env=self._env) if fork_server else None
        self._state_path = state_path
        self._outlive_daemon = outlive_daemon
        self._proxies: dict[str, _SupervisedProxy] = {}
        self._survivors: dict[str, _Survivor] = {}
        # Record files written, by name: what each held (see _save()).
        self._written: dict[str, tuple[str, ProxySpec, ProcessIdentity] | None] = {}
        self._warm_up: asyncio.Task[None] | None = None

    # ---- proxies of this supervisor's own ------------------------------------------------------

    async def start(self, key: str, spec: ProxySpec, listen_sock: socket.socket) -> int:
        """Start one proxy for spec with listen_sock passed as fd 4 (-use-listen-fd) and a pipe
        as fd 3; wait for the handshake (timeout 10 s) and return its pid; raise ProxyError on
        '1\\n<err>' or early exit. The supervisor keeps its own dup of listen_sock, so the
        caller may close its copy. If the proxy later dies unexpectedly, it is restarted on the
        same socket, with one log line."""
        if key in self._proxies or key in self._survivors:
            raise ProxyError(f"a proxy for {key} is already running")
        try:
            own_socket = _dup(listen_sock)
        except OSError as err:
            raise ProxyError(f"cannot duplicate the socket for {key}: {err.strerror}") from None
        supervised = _SupervisedProxy(key=key, spec=spec, listen_socket=own_socket)
        self._proxies[key] = supervised
        try:
            child = await self._launch(supervised)
            if supervised.stopping:
                await _terminate(child)
                raise ProxyError(f"proxy for {key} was stopped while starting")
        except BaseException:
            if self._proxies.get(key) is supervised:
                del self._proxies[key]
            own_socket.close()
            raise
        self._watch(supervised, child)
        try:
            self._save()
        except OSError as err:
            # Unrecorded, a proxy that outlives this daemon would be unknown to the next one.
            await self.stop(key)
            raise ProxyError(
                f"cannot record the proxy for {key} in {self._state_path}: {err.strerror or err}"
            ) from None
        return child.pid

    async def stop(self, key: str) -> None:
        """SIGTERM the proxy (through its pidfd), wait up to 5 s, then SIGKILL; close the
        socket dup. A survivor not adopted yet is stopped the same way."""
        survivor = self._survivors.pop(key, None)
        if survivor is not None:
            await self._stop_survivor(survivor)
            self._save_or_warn()
        supervised = self._proxies.pop(key, None)
        if supervised is None:
            return
        supervised.stopping = True
        try:
            if supervised.restart_task is not None:
                supervised.restart_task.cancel()
                await asyncio.gather(supervised.restart_task, return_exceptions=True)
            if supervised.child is not None:
                await _terminate(supervised.child)
        finally:
            supervised.listen_socket.close()
            self._save_or_warn()

    async def stop_all(self) -> None:
        """Stop every proxy (survivors included), then the fork server (started again if a
        proxy is started later)."""
        await self._cancel_warm_up()
        await asyncio.gather(*(self.stop(key) for key in list(self._proxies)))
        await self.stop_survivors()
        if self._fork_server is not None:
            await self._fork_server.close()
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
        await self._cancel_warm_up()
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
            supervised.listen_socket.close()
        for survivor in survivors:
            os.close(survivor.pidfd)
            if survivor.listen_socket is not None:
                survivor.listen_socket.close()
        if self._fork_server is not None:
            await self._fork_server.close()
        log.info("left %d proxies running for the next daemon", len(proxies) + len(survivors))

    @property
    def fork_server_pid(self) -> int | None:
        return self._fork_server.server_pid if self._fork_server is not None else None

    def pids(self) -> dict[str, int]:
        return {
            key: supervised.child.pid
            for key, supervised in self._proxies.items()
            if supervised.child is not None and supervised.child.running
        }

    # ---- proxies a previous daemon left running --------------------------------------------

    async def take_over(self, *, keep: bool = True) -> dict[PortAddress, socket.socket]:
        """Find the proxies recorded in the state file that still run (same pid, start time,
        name and command line). ``keep``: hold each one (a pidfd, and a copy of its listening
        socket taken from its fd 4) until :meth:`adopt_survivor` or :meth:`stop_survivors`,
        and return another copy of each socket keyed (proto, host_ip, host_port), for netd's
        ``setup(held_sockets=...)``; the caller owns those. Otherwise stop them and return {}.
        Records of proxies that are gone, or whose pid now names another process, are
        dropped (that process is left alone). Then every other process carrying this record
        directory's marker (proxy/strays.py) is stopped: a proxy a killed daemon forked but
        had not recorded yet. Call it before starting any proxy."""
        if self._proxies or self._survivors:
            raise ProxyError("take_over() must come before any proxy is started or adopted")
        held: dict[PortAddress, socket.socket] = {}
        unwanted: list[_Survivor] = []
        try:
            for key, spec, identity in self._load():
                survivor = _recognise(key, spec, identity)
                if survivor is None:
                    continue
                if survivor.problem is not None:
                    log.warning("proxy %s (pid %d): %s", key, identity.pid, survivor.problem)
                if (
                    survivor.listen_socket is None
                    or survivor.problem is not None
                    or not keep
                    or key in self._survivors
                    or spec.address in held
                ):
                    unwanted.append(survivor)
                    continue
                try:
                    held[spec.address] = _dup(survivor.listen_socket)
                except OSError as err:
                    log.warning("cannot duplicate the socket of proxy %s: %s", key, err.strerror)
                    unwanted.append(survivor)
                    continue
                self._survivors[key] = survivor
        finally:
            await asyncio.gather(*(self._stop_survivor(s) for s in unwanted))
            self._save_or_warn()
        await self._stop_strays()
        if held:
            log.info("taking over %d proxies left running by the previous daemon", len(held))
        return held

    async def _stop_strays(self) -> None:
        """Stop the proxies of this record directory that no record accounts for (forked
        by a daemon killed before it recorded them), so that their ports are free again."""
        if self._state_path is None:
            return
        kept = {s.identity.pid for s in self._survivors.values()}
        found = await asyncio.to_thread(strays.find_marked, self._state_path, kept)
        if found:
            stopped = await asyncio.to_thread(strays.stop_marked, self._state_path, found)
            log.warning("stopped %d proxies no record accounted for", stopped)

    async def adopt_survivor(
        self, key: str, spec: ProxySpec, reservation: socket.socket | None = None
    ) -> int | None:
        """Supervise the survivor recorded under ``key`` (see :meth:`adopt`) and return its
        pid; None when there is none. A survivor that does not serve ``spec`` on the socket
        ``reservation`` (netd's reservation of the port, when given) is stopped instead, and
        None returned: the caller starts a new proxy."""
        survivor = self._survivors.pop(key, None)
        if survivor is None:
            return None
        assert survivor.listen_socket is not None  # take_over() keeps only those with one
        mismatch = (
            "a different mapping"
            if survivor.spec != spec
            else "another socket"
            if reservation is not None and not _same_socket(reservation, survivor.listen_socket)
            else None
        )
        if mismatch is not None:
            log.warning("proxy %s of the previous daemon serves %s; replacing it", key, mismatch)
            await self._stop_survivor(survivor)
            self._save_or_warn()
            return None
        self.adopt(key, spec, survivor.identity.pid, survivor.pidfd, survivor.listen_socket)
        return survivor.identity.pid

    def adopt(self, key: str, spec: ProxySpec, pid: int, pidfd: int, sock: socket.socket) -> None:
        """Supervise a running proxy this supervisor did not start (and whose parent it is
        not): ``pidfd`` refers to it and ``sock`` is its listening socket; the supervisor owns
        both from now on. It is watched through the pidfd (readable once it exits: no waitpid)
        and, if it dies, restarted on ``sock`` like a proxy of its own; :meth:`stop`
        terminates it through the pidfd."""
        if key in self._proxies:
            os.close(pidfd)
            sock.close()
            raise ProxyError(f"a proxy for {key} is already running")
        supervised = _SupervisedProxy(key=key, spec=spec, listen_socket=sock)
        self._proxies[key] = supervised
        child = watch_process(pid, pidfd, reaped_elsewhere=False, foreign=True)
        self._watch(supervised, child)
        self._save_or_warn()
        log.info("adopted proxy %s (pid %d)", key, pid)
        self._start_warm_up()

    async def stop_survivors(self) -> None:
        """Stop the survivors nobody adopted (their containers were not restored)."""
        survivors, self._survivors = list(self._survivors.values()), {}
        if not survivors:
            return
        await asyncio.gather(*(self._stop_survivor(s) for s in survivors))
        self._save_or_warn()

    async def _stop_survivor(self, survivor: _Survivor) -> None:
        pid = survivor.identity.pid
        log.info("stopping proxy %s (pid %d) of the previous daemon", survivor.key, pid)
        child = watch_process(pid, survivor.pidfd, reaped_elsewhere=False, foreign=True)
        try:
            await _terminate(child)
        finally:
            if survivor.listen_socket is not None:
                survivor.listen_socket.close()

    def _start_warm_up(self) -> None:
        """Start the fork server in the background, so that restarting an adopted proxy is as
        quick as restarting one of our own (a cold fork server takes most of a second)."""
        if self._fork_server is None or self._warm_up is not None:
            return
        self._warm_up = asyncio.get_running_loop().create_task(self._warm_fork_server())

    async def _warm_fork_server(self) -> None:
        assert self._fork_server is not None
        try:
            await self._fork_server.start()
        except ForkServerError as err:
            log.warning("%s (it is started again when a proxy needs it)", err)

    async def _cancel_warm_up(self) -> None:
        task, self._warm_up = self._warm_up, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ---- the state file ------------------------------------------------------------------------

    def _recorded(self) -> dict[str, tuple[str, ProxySpec, ProcessIdentity]]:
        """Record file name -> (key, spec, process) of each proxy that can outlive this
        process (started to, or adopted): the others die with it (PR_SET_PDEATHSIG). Survivors
        of a previous daemon stay recorded until they are stopped or adopted."""
        recorded: dict[str, tuple[str, ProxySpec, ProcessIdentity]] = {}
        for p in self._proxies.values():
            if p.identity is not None and p.outlives_supervisor:
                recorded[_record_name(p.key)] = (p.key, p.spec, p.identity)
        for sv in self._survivors.values():
            recorded[_record_name(sv.key)] = (sv.key, sv.spec, sv.identity)
        return recorded

    def _save(self) -> None:
        """Bring the record directory in line with what runs: one small file per proxy, so a
        start or a stop writes or removes one file, whatever the number of proxies (one file
        rewritten in full after every start made 1,000 starts take 18 s instead of 3 s).
        Raises OSError."""
        if self._state_path is None:
            return
        wanted = self._recorded()
        if self._state_path.is_file():
            self._state_path.unlink()  # the single-file form, read once by _load()
        for name in [n for n in self._written if n not in wanted]:
            (self._state_path / name).unlink(missing_ok=True)
            del self._written[name]
        for name, (key, spec, identity) in wanted.items():
            if self._written.get(name) == (key, spec, identity):
                continue
            self._state_path.mkdir(mode=0o700, parents=True, exist_ok=True)
            record = {
                "version": STATE_VERSION,
                "key": key,
                "spec": spec.to_json(),
                "process": identity.to_json(),
            }
            write_json_atomic(self._state_path / name, record)
            self._written[name] = (key, spec, identity)
        if not wanted:
            try:
                self._state_path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                pass  # not empty: files that are not ours

    def _save_or_warn(self) -> None:
        try:
            self._save()
        except OSError as err:
            log.warning("cannot record the running proxies in %s: %s", self._state_path, err)

    def _load(self) -> list[tuple[str, ProxySpec, ProcessIdentity]]:
        """The records a previous daemon left: a directory of one file per proxy (or the
        earlier single file holding them all)."""
        if self._state_path is None:
            return []
        path = self._state_path
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
                        entries.append((f.name, {}))  # malformed: _save() removes it
                # Temporary files of writes a SIGKILL cut short (write_json_atomic's names).
                for leftover in path.glob(".*.json.tmp*"):
                    leftover.unlink(missing_ok=True)
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: %s", path, err)
            return []
        loaded = []
        for name, entry in entries:
            if name:
                # On disk now: _save() replaces or removes it (a malformed one too).
                self._written[name] = None
            try:
                record = (
                    str(entry["key"]),
                    ProxySpec.from_json(entry["spec"]),
                    ProcessIdentity.from_json(entry["process"]),
                )
            except (KeyError, TypeError, ValueError) as err:
                log.warning("ignoring a malformed proxy record in %s: %r", path, err)
                continue
            loaded.append(record)
            if name == _record_name(record[0]):
                self._written[name] = record
        return loaded

    # ---- starting and watching -----------------------------------------------------------------

    async def _launch(self, supervised: _SupervisedProxy) -> ChildProcess:
        """Spawn the proxy and wait for its handshake; on any failure it is killed again."""
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise ProxyError(f"cannot create the status pipe: {err.strerror}") from None
        try:
            fds = {STATUS_FD: write_fd, LISTEN_FD: supervised.listen_socket.fileno()}
            try:
                child = await self._spawn(supervised.spec.command_line(), fds)
            finally:
                os.close(write_fd)
            try:
                status = await asyncio.wait_for(read_status(read_fd), HANDSHAKE_TIMEOUT_SECONDS)
                if status.startswith(b"0"):
                    return child
                if status.startswith(b"1"):
                    reason = status[1:].decode("utf-8", "replace").strip() or "no reason given"
                    raise ProxyError(f"proxy for {supervised.key} failed to start: {reason}")
                code = await asyncio.wait_for(
                    asyncio.shield(child.exited), HANDSHAKE_TIMEOUT_SECONDS
                )
                raise ProxyError(
                    f"proxy for {supervised.key} exited during start-up ({describe_exit(code)})"
                )
            except TimeoutError:
                await _kill(child)
                raise ProxyError(
                    f"proxy for {supervised.key} did not report start-up within "
                    f"{HANDSHAKE_TIMEOUT_SECONDS:g} s"
                ) from None
            except BaseException:
                await _kill(child)
                raise
        finally:
            os.close(read_fd)

    async def _spawn(self, args: list[str], fds: dict[int, int]) -> ChildProcess:
        if self._fork_server is not None:
            try:
                return await self._fork_server.spawn(args, fds, outlive_parent=self._outlive_daemon)
            except ForkServerError as err:
                raise ProxyError(str(err)) from None
        argv = self._argv + args
        env = dict(self._env or os.environ)
        if self._outlive_daemon:
            env[OUTLIVE_PARENT_ENV] = "1"
        try:
            return spawn_with_fds(argv, fds, env)
        except OSError as err:
            raise ProxyError(f"cannot run {argv[0]}: {err.strerror or err}") from None

    def _watch(self, supervised: _SupervisedProxy, child: ChildProcess) -> None:
        loop = asyncio.get_running_loop()
        supervised.child = child
        supervised.started_at = loop.time()
        supervised.identity = ProcessIdentity.of(child.pid) if child.running else None
        supervised.outlives_supervisor = self._outlive_daemon or child.foreign
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


def _recognise(key: str, spec: ProxySpec, identity: ProcessIdentity) -> _Survivor | None:
    """The recorded proxy, held by a pidfd, with a copy of its listening socket (or the
    problem with it); None (and a log line) when it is gone or its pid names another process
    now."""
    pidfd = open_pidfd(identity)
    if pidfd is None:
        log.info("proxy %s (pid %d) of the previous daemon is gone", key, identity.pid)
        return None
    try:
        sock = socket_of(pidfd, LISTEN_FD)
    except OSError as err:
        return _Survivor(
            key, spec, identity, pidfd, None, f"its fd {LISTEN_FD} cannot be taken ({err})"
        )
    return _Survivor(key, spec, identity, pidfd, sock, _listener_problem(sock, spec))


def _listener_problem(sock: socket.socket, spec: ProxySpec) -> str | None:
    try:
        if sock.type != _SOCKET_TYPES.get(spec.proto):
            return f"its fd {LISTEN_FD} is not a {spec.proto} socket"
        port = sock.getsockname()[1]
        if port != spec.host_port:
            return f"its fd {LISTEN_FD} is bound to port {port}, not {spec.host_port}"
        if spec.proto == "tcp" and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return f"its fd {LISTEN_FD} is not listening"
    except OSError as err:
        return f"its fd {LISTEN_FD} is not a usable socket ({err.strerror or err})"
    return None


def _dup(sock: socket.socket) -> socket.socket:
    """Another fd for ``sock``, leaving its flags alone. socket.dup() would not: it sets the
    copy's timeout, which clears O_NONBLOCK; that flag belongs to the open file description
    (fcntl(2)), which every dup shares, the proxy's fd 4 included, and a proxy whose listener
    turned blocking blocks in accept(2)."""
    return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))


def _same_socket(a: socket.socket, b: socket.socket) -> bool:
    """Whether two fds refer to one socket (sockfs gives each socket an inode of its own)."""
    try:
        first, second = os.fstat(a.fileno()), os.fstat(b.fileno())
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _backoff(attempt: int) -> float:
    return min(_MAX_BACKOFF_SECONDS, _FIRST_BACKOFF_SECONDS * 2.0 ** max(0, attempt - 1))


async def _terminate(child: ChildProcess) -> None:
    child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(child.exited), STOP_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning(
            "proxy pid %d ignored SIGTERM for %g s; killing it", child.pid, STOP_TIMEOUT_SECONDS
        )
        await _kill(child)


async def _kill(child: ChildProcess) -> None:
    """SIGKILL and wait for the exit (the pidfd watch reaps it even if this wait is cut short)."""
    child.send_signal(signal.SIGKILL)
    try:
        await asyncio.wait_for(asyncio.shield(child.exited), STOP_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning("proxy pid %d still alive %g s after SIGKILL", child.pid, STOP_TIMEOUT_SECONDS)
