"""Runs one pyengine-proxy process per published port for the daemon, and keeps it running.

The supervisor holds its own dup of each listening socket, so the port stays bound while a
proxy restarts: connections and datagrams that arrive meanwhile wait in the socket's queue and
are served by the next proxy, which receives the very same socket as its fd 4.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

from proxy.childprocess import ChildProcess, describe_exit, spawn_with_fds
from proxy.forkclient import ForkServerClient
from proxy.forkserver import ForkServerError
from proxy.handshake import LISTEN_FD, STATUS_FD

log = logging.getLogger("proxy.supervisor")

HANDSHAKE_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0
# A proxy that dies again soon after a restart is restarted with growing delays.
_STABLE_AFTER_SECONDS = 10.0
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0


class ProxyError(Exception):
    """A proxy could not be started; the message says why in one line."""


@dataclass(frozen=True)
class ProxySpec:
    proto: str  # "tcp" | "udp"
    host_ip: str  # "0.0.0.0", "::", "127.0.0.1", ...
    host_port: int
    container_ip: str
    container_port: int
    proxy_protocol: str | None = None  # "v1" | "v2": a PROXY protocol header to the container

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


@dataclass(eq=False)
class _SupervisedProxy:
    key: str
    spec: ProxySpec
    listen_socket: socket.socket
    child: ChildProcess | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    stopping: bool = False
    restart_task: asyncio.Task[None] | None = None


def default_proxy_argv() -> list[str]:
    return [sys.executable, "-m", "proxy.main"]


class ProxySupervisor:
    def __init__(self, argv: list[str] | None = None, *, fork_server: bool | None = None) -> None:
        """argv: how to run the proxy; default [sys.executable, "-m", "proxy.main"].

        fork_server: fork each proxy from a warm fork server (proxy/forkserver.py) instead of
        exec'ing ``argv``; by default, whenever ``argv`` is this Python's own proxy."""
        self._argv = list(argv) if argv else default_proxy_argv()
        if fork_server is None:
            fork_server = self._argv == default_proxy_argv()
        self._fork_server = ForkServerClient() if fork_server else None
        self._proxies: dict[str, _SupervisedProxy] = {}

    async def start(self, key: str, spec: ProxySpec, listen_sock: socket.socket) -> int:
        """Start one proxy for spec with listen_sock passed as fd 4 (-use-listen-fd) and a pipe
        as fd 3; wait for the handshake (timeout 10 s) and return its pid; raise ProxyError on
        '1\\n<err>' or early exit. The supervisor keeps its own dup of listen_sock, so the
        caller may close its copy. If the proxy later dies unexpectedly, it is restarted on the
        same socket, with one log line."""
        if key in self._proxies:
            raise ProxyError(f"a proxy for {key} is already running")
        try:
            own_socket = listen_sock.dup()
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
        return child.pid

    async def stop(self, key: str) -> None:
        """SIGTERM the proxy, wait up to 5 s, then SIGKILL; close the socket dup."""
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

    async def stop_all(self) -> None:
        """Stop every proxy, then the fork server (started again if a proxy is started later)."""
        await asyncio.gather(*(self.stop(key) for key in list(self._proxies)))
        if self._fork_server is not None:
            await self._fork_server.close()

    @property
    def fork_server_pid(self) -> int | None:
        return self._fork_server.server_pid if self._fork_server is not None else None

    def pids(self) -> dict[str, int]:
        return {
            key: supervised.child.pid
            for key, supervised in self._proxies.items()
            if supervised.child is not None and supervised.child.running
        }

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
                status = await asyncio.wait_for(_read_status(read_fd), HANDSHAKE_TIMEOUT_SECONDS)
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
                return await self._fork_server.spawn(args, fds)
            except ForkServerError as err:
                raise ProxyError(str(err)) from None
        argv = self._argv + args
        try:
            return spawn_with_fds(argv, fds)
        except OSError as err:
            raise ProxyError(f"cannot run {argv[0]}: {err.strerror or err}") from None

    def _watch(self, supervised: _SupervisedProxy, child: ChildProcess) -> None:
        loop = asyncio.get_running_loop()
        supervised.child = child
        supervised.started_at = loop.time()
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
            return


def _backoff(attempt: int) -> float:
    return min(_MAX_BACKOFF_SECONDS, _FIRST_BACKOFF_SECONDS * 2 ** max(0, attempt - 1))


async def _read_status(fd: int) -> bytes:
    """What the proxy wrote to its fd 3: read until ``0\\n`` arrives or the pipe hits EOF."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    received = bytearray()

    def on_readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        received.extend(chunk)
        if (not chunk or received.startswith(b"0\n")) and not done.done():
            done.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return bytes(received)


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
