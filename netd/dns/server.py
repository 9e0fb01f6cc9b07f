"""The embedded DNS responder of a user-defined network (Docker's 127.0.0.11).

Per query, over UDP or TCP:

* a container name or alias (any case, with or without the final dot, bare or under the
  engine's domain) gets its A/AAAA records from the network's NameTable, and a container's
  address gets a PTR record;
* an unknown single-label name, or an unknown name under the engine's domain, gets NXDOMAIN;
* everything else is forwarded to the upstreams (see forwarder.py); SERVFAIL if none answers,
  and at once when ``forwarding()`` says no: a container with no way out (only internal
  networks) must not get one through the daemon's resolvers (CVE-2024-29018, fixed in Docker
  26, whose resolver also forwards only for sandboxes with external access);
* a message that is not a well-formed query gets FORMERR (NOTIMP for another opcode), or is
  dropped when it has no header to answer or claims to be a response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from dnslib import RD

from netd.dns import wire
from netd.dns.forwarder import Forwarder
from netd.dns.records import NameLookup, normalize_name
from netd.dns.sockets import bind_udp_tcp
from netd.errors import NetdError

log = logging.getLogger(__name__)

MAX_QUERY = 4096  # larger "queries" are dropped unread (a real one is a few hundred octets)
# Per responder, i.e. per container: each forward holds a socket of the daemon's, and one
# container must not be able to spend the descriptors every container shares.
MAX_FORWARDS_IN_FLIGHT = 128  # beyond this a query to forward gets SERVFAIL at once
MAX_TCP_CLIENTS = 16  # beyond this a new connection is closed at once
MAX_TCP_REPLY = 65535  # RFC 1035 §4.2.2: the two-octet length prefix
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent (RFC 7766 §6.2.3)


@dataclass
class ResponderStats:
    """Counters of what the responder did, for status output and tests."""

    local: int = 0
    nxdomain: int = 0
    forwarded: int = 0
    servfail: int = 0
    formerr: int = 0
    notimp: int = 0
    dropped: int = 0
    truncated: int = 0


@dataclass(frozen=True)
class _Forward:
    """A parsed query that is not ours: the raw message goes to the upstreams."""

    query: wire.Query
    raw: bytes


@dataclass
class _Listeners:
    udp_transport: asyncio.DatagramTransport | None = None
    tcp_server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class DnsResponder:
    """Answers the names of ``table`` (one network's NameTable, or a container's ScopedNames)
    on ``listen`` (UDP and TCP) and forwards the rest."""

    def __init__(
        self,
        table: NameLookup,
        listen: tuple[str, int],
        upstreams: list[tuple[str, int]],
        domain: str = "",
        netns_path: str | None = None,
        timeout: float = 2.0,
        forwarding: Callable[[], bool] | None = None,
    ) -> None:
        self.table = table
        self.forwarding = forwarding  # asked on every query to forward; None: always allowed
        self.listen = listen
        self.domain = normalize_name(domain)
        self.netns_path = netns_path
        self.forwarder = Forwarder(upstreams, timeout)
        self.stats = ResponderStats()
        self._domain_labels = tuple(
            label.encode("ascii") for label in self.domain.split(".") if label
        )
        self._listeners: _Listeners | None = None
        self._forwards_in_flight = 0
        self._tcp_clients = 0

    @property
    def address(self) -> tuple[str, int]:
        """The address and port actually listened on (the port is chosen when listen's is 0)."""
        if self._listeners is None or self._listeners.udp_transport is None:
            raise NetdError("the DNS responder is not started")
        host, port = self._listeners.udp_transport.get_extra_info("sockname")[:2]
        return host, port

    async def start(self) -> None:
        """Listen on UDP and TCP (inside ``netns_path`` when given). Raises NetdError, with
        nothing left open, when the address cannot be bound."""
        if self._listeners is not None:
            raise NetdError("the DNS responder is already started")
        udp, tcp = bind_udp_tcp(self.listen[0], self.listen[1], self.netns_path)
        loop = asyncio.get_running_loop()
        listeners = _Listeners()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp)
            listeners.udp_transport = transport
            listeners.tcp_server = await asyncio.start_server(
                self._serve_tcp_client, sock=tcp, limit=wire.UDP_EDNS_CAP
            )
        except BaseException:
            if listeners.udp_transport is not None:
                listeners.udp_transport.close()
            else:
                udp.close()
            tcp.close()
            raise
        self._listeners = listeners

    async def close(self) -> None:
        """Stop listening and cancel the queries in flight."""
        listeners, self._listeners = self._listeners, None
        if listeners is None:
            return
        if listeners.udp_transport is not None:
            listeners.udp_transport.close()
        if listeners.tcp_server is not None:
            listeners.tcp_server.close()
        for task in list(listeners.tasks):
            task.cancel()
        if listeners.tasks:
            await asyncio.gather(*listeners.tasks, return_exceptions=True)
        if listeners.tcp_server is not None:
            await listeners.tcp_server.wait_closed()

    # -- one query ------------------------------------------------------------------------

    def answer_locally(self, data: bytes, over_tcp: bool) -> bytes | _Forward | None:
        """The reply to ``data`` when the responder can give it itself, a _Forward when the
        upstreams must, or None when the message is dropped."""
        if len(data) > MAX_QUERY:
            self.stats.dropped += 1
            return None
        header = wire.header_of(data)
        if header is None or header.qr:
            self.stats.dropped += 1  # no header to answer, or a response: never reply to one
            return None
        if header.opcode != wire.OPCODE_QUERY:
            self.stats.notimp += 1
            return wire.header_only_reply(data, wire.NOTIMP)
        try:
            query = wire.parse_query(data)
        except wire.FormatError as exc:
            log.debug("FORMERR: %s", exc)
            self.stats.formerr += 1
            return wire.header_only_reply(data, wire.FORMERR)
        max_reply = MAX_TCP_REPLY if over_tcp else query.max_udp_reply
        if query.edns and query.edns_version > 0:  # RFC 6891 §6.1.3: we speak EDNS(0) only
            return wire.build_reply(query, wire.BADVERS, [], max_reply)
        if query.qclass != wire.CLASS_IN or any(b"." in label for label in query.labels):
            return _Forward(query, data)
        labels = query.labels
        in_domain = False
        if self._domain_labels and labels[-len(self._domain_labels) :] == self._domain_labels:
            in_domain = True
            labels = labels[: -len(self._domain_labels)]
            if not labels:  # the domain itself: it exists, but has no records of ours
                return self._reply(query, wire.NOERROR, [], max_reply)
        if not labels:  # the root
            return _Forward(query, data)
        name = ".".join(label.decode("ascii", "replace") for label in labels)
        qtype = wire.TYPE_NAMES.get(query.qtype, str(query.qtype))
        found = self.table.lookup(name, qtype)
        if found is not None:
            if qtype == "PTR":
                answers = [wire.pointer_answer(self._qualify(n)) for n in found]
            else:
                answers = [wire.address_answer(address) for address in found]
            return self._reply(query, wire.NOERROR, answers, max_reply)
        if in_domain or (len(labels) == 1 and qtype != "PTR"):
            self.stats.nxdomain += 1
            return wire.build_reply(query, wire.NXDOMAIN, [], max_reply)
        return _Forward(query, data)

    def _qualify(self, name: str) -> str:
        return f"{name}.{self.domain}" if self.domain else name

    def _reply(
        self, query: wire.Query, rcode: int, answers: list[tuple[int, RD]], max_reply: int
    ) -> bytes:
        self.stats.local += 1
        reply = wire.build_reply(query, rcode, answers, max_reply)
        if answers and wire.is_truncated(reply):
            self.stats.truncated += 1
        return reply

    async def answer(self, data: bytes, over_tcp: bool) -> bytes | None:
        """The reply to one query, forwarding it when needed; None to drop it."""
        local = self.answer_locally(data, over_tcp)
        if not isinstance(local, _Forward):
            return local
        return await self._forward(local, over_tcp)

    async def _forward(self, local: _Forward, over_tcp: bool) -> bytes | None:
        query = local.query
        max_reply = MAX_TCP_REPLY if over_tcp else query.max_udp_reply
        allowed = self.forwarding is None or self.forwarding()
        if (
            not allowed
            or self._forwards_in_flight >= MAX_FORWARDS_IN_FLIGHT
            or not self.forwarder.upstreams
        ):
            self.stats.servfail += 1
            return wire.build_reply(query, wire.SERVFAIL, [], max_reply, authoritative=False)
        self._forwards_in_flight += 1
        try:
            if over_tcp:
                reply = await self.forwarder.forward_tcp(local.raw, query.question)
            else:
                reply = await self.forwarder.forward_udp(local.raw, query.question, max_reply)
        finally:
            self._forwards_in_flight -= 1
        if reply is None:
            self.stats.servfail += 1
            return wire.build_reply(query, wire.SERVFAIL, [], max_reply, authoritative=False)
        self.stats.forwarded += 1
        return reply

    # -- transports -----------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        listeners = self._listeners
        if listeners is None:
            coroutine.close()
            return
        task = asyncio.ensure_future(coroutine)
        listeners.tasks.add(task)
        task.add_done_callback(listeners.tasks.discard)

    def _on_datagram(
        self, transport: asyncio.DatagramTransport, data: bytes, peer: tuple[Any, ...]
    ) -> None:
        try:
            local = self.answer_locally(data, over_tcp=False)
        except Exception:  # a bug must cost one query, never the responder
            log.exception("DNS query from %s failed", peer)
            self.stats.dropped += 1
            return
        if isinstance(local, _Forward):
            self._spawn(self._forward_datagram(transport, local, peer))
        elif local is not None:
            transport.sendto(local, peer)

    async def _forward_datagram(
        self, transport: asyncio.DatagramTransport, local: _Forward, peer: tuple[Any, ...]
    ) -> None:
        try:
            reply = await self._forward(local, over_tcp=False)
        except Exception:
            log.exception("forwarding a DNS query from %s failed", peer)
            return
        if reply is not None and not transport.is_closing():
            transport.sendto(reply, peer)

    async def _serve_tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        listeners = self._listeners
        if listeners is None or task is None or self._tcp_clients >= MAX_TCP_CLIENTS:
            writer.close()
            return
        listeners.tasks.add(task)
        self._tcp_clients += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(length)
                reply = await self.answer(data, over_tcp=True)
                if reply is None:
                    break  # dropped: nothing sensible to say on this stream any more
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("DNS over TCP from %s failed", writer.get_extra_info("peername"))
        finally:
            self._tcp_clients -= 1
            listeners.tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport, but is one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is not None:
            self.responder._on_datagram(self.transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply (the client went away): nothing to do.
        log.debug("DNS UDP socket error: %s", exc)
