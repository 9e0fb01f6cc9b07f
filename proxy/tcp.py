"""TCP proxying with splice(2): payload moves socket -> pipe -> socket and never enters Python.

Each accepted connection gets a non-blocking connect to the container, then two relays, one per
direction. A relay is driven by event-loop readiness: it reads its source only while its pipe can
be drained into its destination (back-pressure), and it shuts down the destination's write side
once its source hit EOF and its pipe is empty (half-close). Both sockets close when both relays
are done, or at once when either side fails.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from proxy import proxyprotocol
from proxy.listener import address_family
from proxy.pipes import Pipe, PipePool
from proxy.proxyprotocol import Address
from proxy.readiness import Readiness
from proxy.transparent import RETRY_ERRNOS, TransparentSource, bind_source

log = logging.getLogger("proxy.tcp")

# splice(2): SPLICE_F_NONBLOCK makes the pipe side non-blocking (the sockets are O_NONBLOCK
# themselves); SPLICE_F_MOVE is only a hint, but harmless.
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Splice calls one relay may make per wake-up before it lets other connections run.
_SPLICE_BUDGET = 32
# Set on the listener, these are inherited by every accepted socket (the kernel clones it from
# the listener), and set on each backend socket: TCP_NODELAY because the sender already chose
# how to chunk its data, SO_KEEPALIVE to notice peers that vanished (tcp(7), socket(7)).
_INHERITED_OPTIONS = (
    (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
)
_ACCEPT_BATCH = 64
_ACCEPT_PAUSE_SECONDS = 0.1
# Errors only a connection attempt reports (connect(2)); an established one gets ECONNRESET.
_CONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
# accept(2): errors about one aborted connection; the next one may be fine.
_ACCEPT_RETRY_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH}
)


class TcpProxy:
    """Accepts on ``listener`` and relays every connection to ``backend_ip:backend_port``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        backend_ip: str,
        backend_port: int,
        pipe_pool: PipePool | None = None,
        proxy_protocol: str | None = None,
        transparent: TransparentSource | None = None,
    ) -> None:
        """proxy_protocol: "v1" or "v2" to send each backend a PROXY protocol header first;
        transparent: connect from the client's address (proxy/transparent.py)."""
        self._loop = loop
        self._listener = listener
        self._backend_family = address_family(backend_ip)
        self._backend_address = (backend_ip, backend_port)
        self._pipe_pool = pipe_pool if pipe_pool is not None else PipePool()
        self.readiness = Readiness(loop)  # the connections' sockets; the listener is the loop's
        self.proxy_protocol = proxy_protocol
        self.transparent = transparent
        self._connections: set[TcpConnection] = set()
        self.activity = 0  # connections accepted so far (proxy/rest.py)
        self._accepting = False
        self._closed = False
        self._resume_accept_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        for level, option in _INHERITED_OPTIONS:
            try:
                self._listener.setsockopt(level, option, 1)
            except OSError:
                pass
        self._set_accepting(True)

    def close(self) -> None:
        """Stop accepting, close the listener, and drop every connection."""
        if self._closed:
            return
        self._closed = True
        self._set_accepting(False)
        if self._resume_accept_handle is not None:
            self._resume_accept_handle.cancel()
        self._listener.close()
        for connection in list(self._connections):
            connection.close()
        self.readiness.close()
        self._pipe_pool.close()

    def forget(self, connection: TcpConnection) -> None:
        self._connections.discard(connection)

    def busy(self) -> bool:
        return bool(self._connections)

    def pause(self) -> None:
        """Leave new connections in the listener's backlog (resume() takes them again)."""
        if self._resume_accept_handle is not None:
            self._resume_accept_handle.cancel()
            self._resume_accept_handle = None
        self._set_accepting(False)

    def resume(self) -> None:
        if not self._closed:
            self._set_accepting(True)

    def _set_accepting(self, accepting: bool) -> None:
        if accepting == self._accepting:
            return
        if accepting:
            self._loop.add_reader(self._listener.fileno(), self._on_acceptable)
        else:
            self._loop.remove_reader(self._listener.fileno())
        self._accepting = accepting

    def _resume_accepting(self) -> None:
        self._resume_accept_handle = None
        if not self._closed:
            self._set_accepting(True)

    def _on_acceptable(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                client, client_address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in _ACCEPT_RETRY_ERRNOS:
                    continue
                # Out of fds or memory (or anything unexpected): the connection stays queued
                # and the listener readable, so back off instead of spinning.
                log.warning("accept failed: %s; pausing new connections briefly", err.strerror)
                self._set_accepting(False)
                self._resume_accept_handle = self._loop.call_later(
                    _ACCEPT_PAUSE_SECONDS, self._resume_accepting
                )
                return
            connection = TcpConnection(self, self._loop, client, client_address)
            self._connections.add(connection)
            self.activity += 1
            connection.connect_backend(self._backend_family, self._backend_address)

    def acquire_pipe(self) -> Pipe:
        return self._pipe_pool.acquire()

    def release_pipe(self, pipe: Pipe, *, is_empty: bool) -> None:
        if self._closed:
            pipe.close()
        else:
            self._pipe_pool.release(pipe, is_empty=is_empty)


class TcpConnection:
    """One client connection and its backend connection."""

    def __init__(
        self,
        proxy: TcpProxy,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        client_address: Address,
    ) -> None:
        self._proxy = proxy
        self._loop = loop
        self._client = client
        self._client_address = client_address
        self._backend: socket.socket | None = None
        self._connecting = False
        self._relays: list[Relay] = []
        self._closed = False
        client.setblocking(False)

    def connect_backend(self, family: socket.AddressFamily, address: tuple[str, int]) -> None:
        transparent = self._proxy.transparent
        source = None if transparent is None else transparent.source_for(self._client_address)
        # Transparent mode: from the client's address and port, else its address alone.
        for keep_port in (True, False) if source is not None else (False,):
            try:
                # Non-blocking from the start (socket(2) SOCK_NONBLOCK): no ioctl to make it so.
                backend = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as err:
                self.fail(f"cannot create backend socket: {err.strerror}")
                return
            for level, option in _INHERITED_OPTIONS:  # the client socket has them already
                try:
                    backend.setsockopt(level, option, 1)
                except OSError:
                    pass
            try:
                if source is not None:
                    bind_source(backend, source, keep_port=keep_port)
                status = backend.connect_ex(address)
            except OSError as err:
                status = err.errno or errno.EINVAL
            if keep_port and status in RETRY_ERRNOS:
                backend.close()
                continue
            break
        self._backend = backend
        if status == 0:
            self._start_relaying()
        elif status == errno.EINPROGRESS and self._proxy.proxy_protocol is None:
            # To a local backend (a bridge, loopback) the handshake is usually over by the time
            # connect(2) returns EINPROGRESS (the SYN-ACK was processed on the way out), so
            # relay at once rather than wait a loop iteration for writability: a splice into a
            # socket still connecting fails with EAGAIN and the relay waits for it to turn
            # writable; one whose connection failed reports the error (tcp(7), connect(2)).
            self._start_relaying()
        elif status == errno.EINPROGRESS:
            # connect(2): with O_NONBLOCK the socket turns writable when the handshake is over;
            # SO_ERROR then says whether it worked. The PROXY protocol header goes first.
            self._connecting = True
            self._proxy.readiness.set_writer(backend.fileno(), self._on_connect_done)
        else:
            self.fail(f"cannot connect to backend: {os.strerror(status)}")

    def _on_connect_done(self) -> None:
        assert self._backend is not None
        self._proxy.readiness.set_writer(self._backend.fileno(), None)
        self._connecting = False
        status = self._backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status != 0:
            self.fail(f"cannot connect to backend: {os.strerror(status)}")
            return
        self._start_relaying()

    def _start_relaying(self) -> None:
        assert self._backend is not None
        if self._proxy.proxy_protocol is not None and not self._send_proxy_header():
            return
        try:
            to_backend = Relay(self, self._loop, self._client, self._backend, self._proxy)
            self._relays.append(to_backend)
            to_client = Relay(self, self._loop, self._backend, self._client, self._proxy)
            self._relays.append(to_client)
        except OSError as err:
            self.fail(f"cannot create pipe: {err.strerror}")
            return
        # The client has most likely sent its first bytes by now; the backend, just connected,
        # most likely not: wait for it rather than try a read that fails with EAGAIN.
        to_backend.pump()
        if not self._closed:
            to_client.wait_for_source()

    def _send_proxy_header(self) -> bool:
        assert self._backend is not None and self._proxy.proxy_protocol is not None
        try:
            destination = self._client.getsockname()
            data = proxyprotocol.header(
                self._proxy.proxy_protocol, self._client_address, destination
            )
            # A fresh connection's send buffer is empty: a header of at most 232 bytes
            # (v2 over IPv6 is 52) is taken whole.
            if self._backend.send(data) != len(data):
                raise OSError(errno.EAGAIN, "the PROXY protocol header did not fit")
        except OSError as err:
            self.fail(f"cannot send the PROXY protocol header: {err.strerror or err}")
            return False
        return True

    def relay_finished(self) -> None:
        if self.both_finished():
            self.close()

    def both_finished(self) -> bool:
        return all(relay.finished for relay in self._relays)

    def fail(self, reason: str, *, level: int = logging.INFO) -> None:
        if not self._closed:
            log.log(level, "closing connection: %s", reason)
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing the sockets takes them out of the epoll set; forgotten first, the relays'
        # detach() costs no epoll_ctl.
        readiness = self._proxy.readiness
        readiness.forget(self._client.fileno())
        if self._backend is not None:
            readiness.forget(self._backend.fileno())
        for relay in self._relays:
            relay.detach()
        if self._backend is not None:
            self._backend.close()
        self._client.close()
        self._proxy.forget(self)


class Relay:
    """One direction of a connection: ``source`` -> pipe -> ``destination`` with splice(2)."""

    def __init__(
        self,
        connection: TcpConnection,
        loop: asyncio.AbstractEventLoop,
        source: socket.socket,
        destination: socket.socket,
        proxy: TcpProxy,
    ) -> None:
        self._connection = connection
        self._loop = loop
        self._source = source
        self._destination = destination
        self._source_fd = source.fileno()
        self._destination_fd = destination.fileno()
        self._proxy = proxy
        self._readiness = proxy.readiness
        self._pipe: Pipe | None = proxy.acquire_pipe()
        self._buffered = 0
        self._source_eof = False
        self._waiting_readable = False
        self._waiting_writable = False
        self._resume_scheduled = False
        self.finished = False

    def wait_for_source(self) -> None:
        """Do nothing until the source is readable."""
        self._wait_for(readable=True, writable=False)

    def pump(self) -> None:
        """Move as much as possible now, then wait for the readiness that lets it go on."""
        self._resume_scheduled = False
        if self.finished or self._pipe is None:
            return
        try:
            self._pump(self._pipe)
        except OSError as err:
            if err.errno in _CONNECT_ERRNOS:  # reported by a splice while it was connecting
                self._connection.fail(f"cannot connect to backend: {err.strerror}")
            else:
                # A reset or a vanished peer is routine for a proxy; do not log it loudly.
                self._connection.fail(err.strerror or str(err), level=logging.DEBUG)
        except Exception:
            log.exception("relay failed")
            self._connection.close()

    def _pump(self, pipe: Pipe) -> None:
        # The hot path: locals and positional arguments save measurable time per request.
        splice, flags = os.splice, _SPLICE_FLAGS
        source_fd, destination_fd = self._source_fd, self._destination_fd
        for _ in range(_SPLICE_BUDGET):
            drained = False
            if not self._buffered:
                if self._source_eof:
                    self._finish()
                    return
                try:
                    moved = splice(source_fd, pipe.write_fd, pipe.capacity, None, None, flags)
                except BlockingIOError:
                    self._wait_for(readable=True, writable=False)
                    return
                if moved == 0:
                    self._source_eof = True
                    continue
                self._buffered = moved
                drained = moved < pipe.capacity
            try:
                moved = splice(pipe.read_fd, destination_fd, self._buffered, None, None, flags)
            except BlockingIOError:
                # Back-pressure: the source is not read again until the pipe has drained.
                self._wait_for(readable=False, writable=True)
                return
            self._buffered -= moved
            if drained and not self._buffered:
                # The read did not fill the pipe: the source had nothing more just then.
                # Instead of a splice that fails with EAGAIN (a syscall and an exception), go
                # back to the event loop; readiness is level triggered, so bytes that are
                # still waiting, or that arrive, wake this relay again at once.
                self._wait_for(readable=True, writable=False)
                return
        if not self._resume_scheduled:
            self._resume_scheduled = True
            self._loop.call_soon(self.pump)

    def _finish(self) -> None:
        self.finished = True
        if not self._connection.both_finished():
            self._wait_for(readable=False, writable=False)
            # Half-close: the destination learns that no more comes this way. After the
            # second relay, both sockets are closed at once (which sends the FIN anyway, and
            # takes them out of the epoll set).
            try:
                self._destination.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._release_pipe()
        self._connection.relay_finished()

    def _wait_for(self, *, readable: bool, writable: bool) -> None:
        if readable != self._waiting_readable:
            self._readiness.set_reader(self._source_fd, self.pump if readable else None)
            self._waiting_readable = readable
        if writable != self._waiting_writable:
            self._readiness.set_writer(self._destination_fd, self.pump if writable else None)
            self._waiting_writable = writable

    def _release_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            self._proxy.release_pipe(pipe, is_empty=self._buffered == 0)

    def detach(self) -> None:
        """Stop watching both sockets and give the pipe back; the sockets are closed after."""
        self._wait_for(readable=False, writable=False)
        self.finished = True
        self._release_pipe()
