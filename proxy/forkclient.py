"""The supervisor's side of the fork server (proxy/forkserver.py): start it, ask it for proxies.

The fork server is started on first use with posix_spawn (a daemon with threads must not fork
itself) and restarted on the next request if it has died. Each proxy it forks comes back as a
:class:`ChildProcess` watched through a pidfd the server opened for it; the server, being the
parent, reaps it and reports the exit status here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from proxy.childprocess import ChildProcess, spawn_with_fds, watch_process
from proxy.forkserver import (
    CONTROL_FD,
    MAX_FDS,
    MAX_MESSAGE,
    ForkServerError,
    decode,
    encode_request,
)
from proxy.options import ProxyOptions
from proxy.pidfd import ProcessIdentity

log = logging.getLogger("proxy.forkserver")

READY_TIMEOUT_SECONDS = 30.0
REPLY_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0


def default_server_argv() -> list[str]:
    return [sys.executable, "-m", "proxy.forkserver"]


class ForkServerClient:
    """Starts proxies as children of one warm fork server process."""

    def __init__(self, argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        """env: the fork server's environment, and so its proxies' (default: ours)."""
        self._argv = list(argv) if argv else default_server_argv()
        self._env = env
        self._server: ChildProcess | None = None
        self._control: socket.socket | None = None
        self._start_lock = asyncio.Lock()
        self._request_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._children: dict[int, ChildProcess] = {}
        self._early_exits: dict[int, int | None] = {}
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        # A forked proxy's command line is the server's (fork(2) copies the memory that
        # /proc/<pid>/cmdline reads): read once per server.
        self._child_cmdline: tuple[str, ...] | None = None

    @property
    def server_pid(self) -> int | None:
        return self._server.pid if self._server is not None and self._server.running else None

    async def start(self) -> None:
        """Start the fork server now, if it is not running (spawn() does so on first use)."""
        await self._ensure_started()

    async def spawn(
        self,
        argv: list[str],
        fds: dict[int, int],
        *,
        outlive_parent: bool = False,
        options: ProxyOptions | None = None,
    ) -> ChildProcess:
        """Fork a proxy running ``pyengine-proxy argv`` with ``fds[n]`` as its fd ``n``.
        ``outlive_parent``: the proxy keeps running when the fork server dies (and so when
        the daemon dies) instead of getting SIGTERM. ``options``: what ``argv`` says, when the
        caller has it parsed already."""
        control = await self._ensure_started()
        request_id = next(self._request_ids)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[tuple[dict[str, Any], list[int]]] = loop.create_future()
        self._pending[request_id] = reply
        targets = list(fds)
        try:
            try:
                payload = encode_request(
                    request_id, argv, targets, outlive_parent=outlive_parent, options=options
                )
            except ValueError as err:
                raise ForkServerError(str(err)) from None
            try:
                socket.send_fds(control, [payload], [fds[n] for n in targets])
            except OSError as err:
                raise ForkServerError(f"cannot reach the fork server: {err.strerror}") from None
            try:
                message, received = await asyncio.wait_for(reply, REPLY_TIMEOUT_SECONDS)
            except TimeoutError:
                raise ForkServerError(
                    f"the fork server did not answer within {REPLY_TIMEOUT_SECONDS:g} s"
                ) from None
        finally:
            self._pending.pop(request_id, None)
        if "error" in message:
            _close_all(received)
            raise ForkServerError(f"the fork server could not start a proxy: {message['error']}")
        if len(received) != 1 or not isinstance(message.get("pid"), int):
            _close_all(received)
            raise ForkServerError("the fork server answered without a pid and its pidfd")
        pid: int = message["pid"]
        child = watch_process(pid, received[0], reaped_elsewhere=True)
        child.cmdline = self._child_cmdline
        early = self._early_exits.pop(pid, None)
        if early is not None:
            child.report_exit(early)
        elif child.running:
            self._children[pid] = child
            child.exited.add_done_callback(lambda _: self._children.pop(pid, None))
        return child

    async def close(self) -> None:
        """Stop the fork server (its proxies get SIGTERM from the kernel when it exits, except
        those spawned with ``outlive_parent``)."""
        server, control = self._server, self._control
        self._server, self._control = None, None
        if control is not None:
            self._detach(control)
        if server is not None:
            try:
                await asyncio.wait_for(asyncio.shield(server.exited), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("fork server pid %d did not exit; killing it", server.pid)
                server.send_signal(signal.SIGKILL)
                await asyncio.wait_for(asyncio.shield(server.exited), STOP_TIMEOUT_SECONDS)

    async def _ensure_started(self) -> socket.socket:
        async with self._start_lock:
            if self._control is not None and self._server is not None and self._server.running:
                return self._control
            if self._control is not None:
                self._detach(self._control)
                self._control = None
            return await self._start()

    async def _start(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                server = spawn_with_fds(self._argv, {CONTROL_FD: theirs.fileno()}, self._env)
            except OSError as err:
                raise ForkServerError(
                    f"cannot run the fork server {self._argv[0]}: {err.strerror or err}"
                ) from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_message, ours)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_SECONDS)
        except (TimeoutError, ForkServerError) as err:
            self._detach(ours)
            server.send_signal(signal.SIGKILL)
            reason = "it did not start in time" if isinstance(err, TimeoutError) else str(err)
            raise ForkServerError(f"fork server failed: {reason}") from None
        self._server, self._control = server, ours
        identity = ProcessIdentity.of(server.pid)
        self._child_cmdline = identity.cmdline if identity is not None else None
        log.debug("fork server ready (pid %d)", server.pid)
        return ours

    def _on_message(self, control: socket.socket) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                _close_all(fds)
                self._on_server_gone(control)
                return
            try:
                message = decode(data)
            except ValueError:
                _close_all(fds)
                log.warning("ignoring a malformed message from the fork server")
                continue
            self._dispatch(message, fds)

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        if "exited" in message:
            _close_all(fds)
            pid, code = message["exited"], message.get("code")
            child = self._children.pop(pid, None)
            if child is not None:
                child.report_exit(code)
            else:
                # The exit can overtake the reply that names the pid.
                self._early_exits[pid] = code
            return
        if message.get("ready"):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
            return
        reply = self._pending.get(message.get("id"))  # type: ignore[arg-type]  # no id: no reply
        if reply is None or reply.done():
            # Nobody waits for this proxy any more (its request timed out): do not leave it
            # running unsupervised.
            if "pid" in message and fds:
                try:
                    signal.pidfd_send_signal(fds[0], signal.SIGKILL)
                except OSError:
                    pass
            _close_all(fds)
            return
        reply.set_result((message, fds))

    def _on_server_gone(self, control: socket.socket) -> None:
        self._detach(control)
        if self._control is control:
            self._control = None
        error = ForkServerError("the fork server exited")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved here: the starter reports it in its own words
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(error)
        # Its children got SIGTERM (PR_SET_PDEATHSIG) and nobody will report their status: let
        # their pidfds tell their supervisors at once.
        self._early_exits.clear()
        children, self._children = self._children, {}
        for child in children.values():
            child.orphan()

    @staticmethod
    def _detach(control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if control.fileno() >= 0:
            loop.remove_reader(control.fileno())
        control.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
