"""UDP proxying: a flow per client address, each with its own connected backend socket.

A datagram from a new client opens a flow: a socket connect(2)ed to the container, so the kernel
only delivers that container port's replies to it. Replies go back to the client through the
listening socket, from the address the client sent to. A flow closes after ``idle_timeout``
seconds without traffic either way; the table holds at most ``max_flows`` flows.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from dataclasses import dataclass, field

from proxy.listener import address_family
from proxy.pktinfo import (
    ANCILLARY_BUFFER_SIZE,
    AncillaryItem,
    enable_packet_info,
    is_wildcard,
    reply_source,
)
from proxy.transparent import RETRY_ERRNOS, TransparentSource, bind_source

log = logging.getLogger("proxy.udp")

DEFAULT_MAX_FLOWS = 1024
_MAX_DATAGRAM = 65535
# Datagrams handled per wake-up before other sockets get their turn (the loop is level
# triggered, so anything left over wakes us again).
_RECEIVE_BUDGET = 64

ClientAddress = tuple[str, int] | tuple[str, int, int, int]


@dataclass(eq=False)
class UdpFlow:
    client_address: ClientAddress
    backend: socket.socket
    last_active: float
    reply_ancillary: list[AncillaryItem] = field(default_factory=list)
    idle_timer: asyncio.TimerHandle | None = None


def prepare_listener(listener: socket.socket) -> bool:
    """On a wildcard address the kernel would pick a reply's source by routing, which need not
    be the address the client sent to: ask for each datagram's destination (True), before the
    first datagram is queued (it is reported only for datagrams queued from then on)."""
    if not is_wildcard(listener.getsockname()[0]):
        return False
    enable_packet_info(listener)
    return True


class UdpProxy:
    """Receives on ``listener`` and relays datagrams to ``backend_ip:backend_port`` and back."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        backend_ip: str,
        backend_port: int,
        idle_timeout: float,
        max_flows: int = DEFAULT_MAX_FLOWS,
        transparent: TransparentSource | None = None,
    ) -> None:
        self.transparent = transparent
        self._loop = loop
        self._listener = listener
        self._backend_family = address_family(backend_ip)
        self._backend_address = (backend_ip, backend_port)
        self._idle_timeout = idle_timeout
        self._max_flows = max_flows
        self._flows: dict[ClientAddress, UdpFlow] = {}
        self._table_full_reported = False
        self._reply_from_destination = False
        self._buffer = bytearray(_MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        self._closed = False
        self.activity = 0  # wake-ups by client datagrams so far (proxy/rest.py)

    def start(self) -> None:
        self._reply_from_destination = prepare_listener(self._listener)
        self._listener.setblocking(False)
        self._loop.add_reader(self._listener.fileno(), self._on_client_datagrams)

    def busy(self) -> bool:
        return bool(self._flows)

    def pause(self) -> None:
        """Leave new datagrams in the listener's buffer (resume() reads them again)."""
        self._loop.remove_reader(self._listener.fileno())

    def resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._listener.fileno(), self._on_client_datagrams)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for flow in list(self._flows.values()):
            self._close_flow(flow)

    def _on_client_datagrams(self) -> None:
        self.activity += 1
        for _ in range(_RECEIVE_BUDGET):
            try:
                size, ancillary, _, client = self._listener.recvmsg_into(
                    [self._buffer], ANCILLARY_BUFFER_SIZE
                )
            except BlockingIOError:
                return
            except OSError as err:
                log.debug("receive from clients failed: %s", err)
                return
            flow = self._flows.get(client)
            if flow is None:
                flow = self._open_flow(client)
                if flow is None:
                    continue
            flow.last_active = self._loop.time()
            if self._reply_from_destination:
                flow.reply_ancillary = reply_source(ancillary)
            try:
                flow.backend.send(self._view[:size])
            except OSError as err:
                # Full buffer, or an ICMP error left by an earlier datagram: UDP may drop.
                log.debug("datagram to backend dropped: %s", err)
                if err.errno != errno.EAGAIN:
                    self._rewatch(flow)

    def _rewatch(self, flow: UdpFlow) -> None:
        if self._flows.get(flow.client_address) is flow:
            self._watch_replies(flow)

    def _watch_replies(self, flow: UdpFlow) -> None:
        """(Re)arm the reader of a flow's backend socket. An ICMP error pending on a connected
        UDP socket (udp(7): the container's port was closed) makes epoll report EPOLLERR, on
        which libuv stops the socket's poll handle for good; the error has been taken by a
        send() or recv() when we get here, so watching again is safe."""
        self._loop.remove_reader(flow.backend.fileno())
        self._loop.add_reader(flow.backend.fileno(), functools.partial(self._on_replies, flow))

    def _open_flow(self, client: ClientAddress) -> UdpFlow | None:
        if len(self._flows) >= self._max_flows:
            if not self._table_full_reported:
                log.warning(
                    "UDP flow table full (%d flows): dropping datagrams from new clients "
                    "until a flow goes idle",
                    self._max_flows,
                )
                self._table_full_reported = True
            return None
        try:
            backend = socket.socket(self._backend_family, socket.SOCK_DGRAM)
        except OSError as err:
            log.warning("cannot open a UDP flow for %s: %s", client, err.strerror)
            return None
        try:
            backend.setblocking(False)
            source = None if self.transparent is None else self.transparent.source_for(client)
            if source is not None:
                # From the client's address and port (proxy/transparent.py): the container's
                # replies to it are steered back to this socket by netd's return path.
                try:
                    bind_source(backend, source)
                except OSError as err:
                    if err.errno not in RETRY_ERRNOS:
                        raise
                    backend.close()
                    backend = socket.socket(self._backend_family, socket.SOCK_DGRAM)
                    backend.setblocking(False)
                    bind_source(backend, source, keep_port=False)
            backend.connect(self._backend_address)
        except OSError as err:
            backend.close()
            log.warning("cannot open a UDP flow for %s: %s", client, err.strerror)
            return None
        flow = UdpFlow(client_address=client, backend=backend, last_active=self._loop.time())
        self._watch_replies(flow)
        flow.idle_timer = self._loop.call_later(
            self._idle_timeout, functools.partial(self._expire_if_idle, flow)
        )
        self._flows[client] = flow
        return flow

    def _on_replies(self, flow: UdpFlow) -> None:
        for _ in range(_RECEIVE_BUDGET):
            try:
                size = flow.backend.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError as err:
                # udp(7): a connected socket reports an ICMP error (ECONNREFUSED, ...) for an
                # earlier datagram once, on the next call; the socket itself is still fine,
                # but libuv stops watching it after this wake-up (EPOLLERR): watch it again.
                log.debug("backend reported: %s", err)
                self._loop.call_soon(self._rewatch, flow)
                continue
            flow.last_active = self._loop.time()
            self._send_to_client(flow, self._view[:size])

    def _send_to_client(self, flow: UdpFlow, payload: memoryview) -> None:
        try:
            self._listener.sendmsg([payload], flow.reply_ancillary, 0, flow.client_address)
        except OSError as err:
            if err.errno == errno.EINVAL and flow.reply_ancillary:
                # The address the client used is gone from this host: answer from any.
                flow.reply_ancillary = []
                self._send_to_client(flow, payload)
                return
            log.debug("datagram to client %s dropped: %s", flow.client_address, err)

    def _expire_if_idle(self, flow: UdpFlow) -> None:
        idle_for = self._loop.time() - flow.last_active
        if idle_for >= self._idle_timeout:
            flow.idle_timer = None
            self._close_flow(flow)
        else:
            flow.idle_timer = self._loop.call_later(
                self._idle_timeout - idle_for, functools.partial(self._expire_if_idle, flow)
            )

    def _close_flow(self, flow: UdpFlow) -> None:
        if self._flows.get(flow.client_address) is not flow:
            return
        del self._flows[flow.client_address]
        if flow.idle_timer is not None:
            flow.idle_timer.cancel()
        self._loop.remove_reader(flow.backend.fileno())
        flow.backend.close()
        if len(self._flows) < self._max_flows:
            self._table_full_reported = False
