"""A launcher's proxy goes back to sleep once its traffic stops.

A proxy forked by the host server (proxy/hostserver.py) idles in C at a few pages of its own;
its first connection brings it into Python, which copies ~2.4 MB of the server's pages for
good (CPython writes to every object it touches). A proxy that has had no connection open, no
UDP flow and no new traffic for ``rest_after`` seconds asks the server for a fresh idle proxy
on the same listeners and lifeline, waits for its ``0\\n``, tells the launcher the new pid on the
lifeline (``{"handover": P}``: the launcher follows P from then on) and exits quietly. While the
two change places, new connections wait in the listener's backlog and datagrams in its buffer.
If anything fails, the proxy goes on serving and tries again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any

from proxy.forkserver import LIFELINE_FD, decode, encode, encode_request
from proxy.handshake import LISTEN_FDS, STATUS_FD, read_status_blocking
from proxy.options import ProxyOptions
from proxy.tcp import TcpProxy
from proxy.udp import UdpProxy

log = logging.getLogger("proxy.rest")

STEP_TIMEOUT_SECONDS = 2.0
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7) SO_PEERCRED)


@dataclass(frozen=True)
class RestPlan:
    server: str
    rest_after: float
    argv: list[str]
    options: ProxyOptions

    @classmethod
    def of(cls, request: dict[str, Any], argv: list[str], options: ProxyOptions) -> RestPlan | None:
        """From the launcher's request; None when it asks for no rest."""
        server, rest_after = request.get("server"), request.get("rest_after")
        if not isinstance(server, str) or not isinstance(rest_after, int) or rest_after <= 0:
            return None
        return cls(server, float(rest_after), argv, options)


class Rest:
    """Checks every ``rest_after`` seconds whether the proxies were idle since the last check,
    and if so hands them over; ``close()`` says whether that happened."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        proxies: list[TcpProxy | UdpProxy],
        plan: RestPlan | None,
        stop: asyncio.Event,
    ) -> None:
        self._loop = loop
        self._proxies = proxies
        self._plan = plan
        self._stop = stop
        self._seen = -1
        self.handed_over = False
        self._timer = loop.call_later(plan.rest_after, self._check) if plan else None

    def _check(self) -> None:
        assert self._plan is not None
        self._timer = None
        activity = sum(proxy.activity for proxy in self._proxies)
        if activity == self._seen and not any(proxy.busy() for proxy in self._proxies):
            for proxy in self._proxies:
                proxy.pause()
            if hand_over(self._plan):
                self.handed_over = True
                self._stop.set()
                return
            for proxy in self._proxies:
                proxy.resume()
        self._seen = activity
        self._timer = self._loop.call_later(self._plan.rest_after, self._check)

    def close(self) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        return self.handed_over


def hand_over(plan: RestPlan) -> bool:
    """Ask the host server for a new idle proxy with our listeners and lifeline; True once it
    reported ready and the launcher was told. Blocks for at most a few seconds (the proxy is
    idle: nothing else waits on it). A new proxy that did not get that far is killed: it must
    not serve beside this one."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    child: int | None = None
    done = False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(STEP_TIMEOUT_SECONDS)
            conn.connect(plan.server)
            _, uid, _ = _CREDENTIALS.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
            )
            if uid != os.getuid():
                return False
            listeners = LISTEN_FDS[: len(plan.options.listeners())]
            request = encode_request(
                1,
                plan.argv,
                [STATUS_FD, *listeners, LIFELINE_FD],
                outlive_parent=True,
                options=plan.options,
                extra={"server": plan.server, "rest_after": int(plan.rest_after)},
            )
            socket.send_fds(conn, [request], [write_end, *listeners, LIFELINE_FD])
            os.close(write_end)
            write_end = -1
            reply, fds, _, _ = socket.recv_fds(conn, 4096, 1)
            child = fds[0] if fds else None
            pid = decode(reply).get("pid") if reply else None
            if child is None or not isinstance(pid, int):
                return False
            if not read_status_blocking(read_end, STEP_TIMEOUT_SECONDS).startswith(b"0\n"):
                return False
            os.write(LIFELINE_FD, encode({"handover": pid}))
            done = True
            return True
    except (OSError, ValueError, TimeoutError) as err:
        log.debug("cannot rest: %s", err)
        return False
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        if child is not None:
            if not done:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(child, signal.SIGKILL)
            os.close(child)
