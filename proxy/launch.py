"""Starting a proxy process and stopping it.

A proxy is forked by the warm fork server (proxy/forkserver.py) or exec'd from ``argv``, with
the write end of its status pipe as fd 3 and its listening socket as fd 4 (and its second, for
the other family of the port, as fd 5); it is started once
it reports ``0`` on the pipe (proxy/handshake.py). It is stopped by SIGTERM through its pidfd,
then SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence

from proxy.childprocess import ChildProcess, describe_exit, spawn_with_fds
from proxy.forkclient import ForkServerClient
from proxy.forkserver import ForkServerError
from proxy.handshake import LISTEN_FDS, STATUS_FD, read_status
from proxy.options import ProxyOptions
from proxy.prctl import OUTLIVE_PARENT_ENV
from proxy.spec import ProxySpec

log = logging.getLogger("proxy.supervisor")

STOP_TIMEOUT_SECONDS = 5.0


class ProxyError(Exception):
    """A proxy could not be started; the message says why in one line."""


def default_proxy_argv() -> list[str]:
    return [sys.executable, "-m", "proxy.main"]


class ProxyLauncher:
    def __init__(
        self,
        argv: list[str] | None = None,
        *,
        fork_server: bool | None = None,
        env: Mapping[str, str] | None = None,
        outlive_parent: bool = False,
    ) -> None:
        """See :class:`proxy.supervisor.ProxySupervisor`: ``env`` is the proxies' environment
        (None: this process's), ``outlive_parent`` its ``outlive_daemon``."""
        self._argv = list(argv) if argv else default_proxy_argv()
        if fork_server is None:
            fork_server = self._argv == default_proxy_argv()
        self._env = env
        self._fork_server = ForkServerClient(env=env) if fork_server else None
        self._outlive_parent = outlive_parent
        self._warm_up: asyncio.Task[None] | None = None

    @property
    def fork_server_pid(self) -> int | None:
        return self._fork_server.server_pid if self._fork_server is not None else None

    async def launch(
        self, key: str, spec: ProxySpec, listen_sockets: Sequence[socket.socket], timeout: float
    ) -> ChildProcess:
        """Spawn the proxy for ``spec`` and wait up to ``timeout`` for its handshake; on any
        failure it is killed again, and ProxyError says why."""
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise ProxyError(f"cannot create the status pipe: {err.strerror}") from None
        try:
            fds = {STATUS_FD: write_fd}
            targets = LISTEN_FDS[: len(listen_sockets)]
            fds.update((fd, s.fileno()) for fd, s in zip(targets, listen_sockets, strict=True))
            try:
                child = await self._spawn(spec.command_line(), fds, spec.options())
            finally:
                os.close(write_fd)
            try:
                status = await asyncio.wait_for(read_status(read_fd), timeout)
                if status.startswith(b"0"):
                    return child
                if status.startswith(b"1"):
                    reason = status[1:].decode("utf-8", "replace").strip() or "no reason given"
                    raise ProxyError(f"proxy for {key} failed to start: {reason}")
                code = await asyncio.wait_for(asyncio.shield(child.exited), timeout)
                raise ProxyError(f"proxy for {key} exited during start-up ({describe_exit(code)})")
            except TimeoutError:
                await kill(child)
                raise ProxyError(
                    f"proxy for {key} did not report start-up within {timeout:g} s"
                ) from None
            except BaseException:
                await kill(child)
                raise
        finally:
            os.close(read_fd)

    async def _spawn(
        self, args: list[str], fds: dict[int, int], options: ProxyOptions | None = None
    ) -> ChildProcess:
        if self._fork_server is not None:
            try:
                return await self._fork_server.spawn(
                    args, fds, outlive_parent=self._outlive_parent, options=options
                )
            except ForkServerError as err:
                raise ProxyError(str(err)) from None
        argv = self._argv + args
        env = dict(self._env or os.environ)
        if self._outlive_parent:
            env[OUTLIVE_PARENT_ENV] = "1"
        try:
            return spawn_with_fds(argv, fds, env)
        except OSError as err:
            raise ProxyError(f"cannot run {argv[0]}: {err.strerror or err}") from None

    def start_warm_up(self) -> None:
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

    async def cancel_warm_up(self) -> None:
        task, self._warm_up = self._warm_up, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        """Stop the fork server (started again if a proxy is launched later); the proxies it
        forked do not depend on it."""
        if self._fork_server is not None:
            await self._fork_server.close()


async def terminate(child: ChildProcess) -> None:
    """SIGTERM, wait up to 5 s, then SIGKILL."""
    child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(child.exited), STOP_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning(
            "proxy pid %d ignored SIGTERM for %g s; killing it", child.pid, STOP_TIMEOUT_SECONDS
        )
        await kill(child)


async def kill(child: ChildProcess) -> None:
    """SIGKILL and wait for the exit (the pidfd watch reaps it even if this wait is cut short)."""
    child.send_signal(signal.SIGKILL)
    try:
        await asyncio.wait_for(asyncio.shield(child.exited), STOP_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning("proxy pid %d still alive %g s after SIGKILL", child.pid, STOP_TIMEOUT_SECONDS)
