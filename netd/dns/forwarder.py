"""Forwarding the queries that are not the network's own to the host's resolvers.

Each forwarded UDP query gets a socket of its own, connected to the upstream, so its source port
is random and only that upstream's replies reach it, and a fresh random ID; a reply is taken only
when its ID and question match (RFC 5452 §4, §9.2). A truncated UDP reply is retried over TCP
(RFC 7766 §5). Upstreams are tried in order: an upstream that times out, refuses, or answers
SERVFAIL makes way for the next one.

Forwarding sockets are opened in the daemon's own network namespace, even when the responder
listens inside a container's: the host's resolvers, loopback ones included (127.0.0.53), are
reachable from there whatever the container's routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from dataclasses import dataclass

from dnslib import DNSQuestion

from netd.dns import wire

MAX_MESSAGE = 65535


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = 53

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _random_id() -> int:
    return int.from_bytes(os.urandom(2), "big")


class Forwarder:
    """Sends a client's query to the upstreams and returns the reply for the client."""

    def __init__(self, upstreams: list[tuple[str, int]], timeout: float = 2.0) -> None:
        self.upstreams = [Upstream(host, port) for host, port in upstreams]
        self.timeout = timeout

    async def forward_udp(
        self, query: bytes, question: DNSQuestion, max_reply: int
    ) -> bytes | None:
        """The reply to a query a client sent over UDP, at most ``max_reply`` octets (else the
        truncated reply, so the client retries over TCP), or None when no upstream answered."""
        client_id = struct.unpack_from("!H", query)[0]
        fallback: bytes | None = None
        for upstream in self.upstreams:
            query_id = _random_id()
            reply = await self._exchange_udp(upstream, wire.with_id(query, query_id), question)
            if reply is not None and wire.is_truncated(reply):
                full = await self._exchange_tcp(upstream, wire.with_id(query, query_id), question)
                if full is not None and len(full) <= max_reply:
                    reply = full
            if reply is None:
                continue
            if len(reply) > max_reply:  # an upstream ignoring the client's size: truncate
                reply = wire.truncated_reply(reply, client_id, question)
            reply = wire.with_id(reply, client_id)
            if wire.rcode_of(reply) != wire.SERVFAIL:
                return reply
            fallback = reply
        return fallback

    async def forward_tcp(self, query: bytes, question: DNSQuestion) -> bytes | None:
        """The reply to a query a client sent over TCP (forwarded over TCP)."""
        client_id = struct.unpack_from("!H", query)[0]
        fallback: bytes | None = None
        for upstream in self.upstreams:
            query_id = _random_id()
            reply = await self._exchange_tcp(upstream, wire.with_id(query, query_id), question)
            if reply is None:
                continue
            reply = wire.with_id(reply, client_id)
            if wire.rcode_of(reply) != wire.SERVFAIL:
                return reply
            fallback = reply
        return fallback

    async def _exchange_udp(
        self, upstream: Upstream, query: bytes, question: DNSQuestion
    ) -> bytes | None:
        loop = asyncio.get_running_loop()
        query_id = struct.unpack_from("!H", query)[0]
        sock = socket.socket(upstream.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            # connect(2) on UDP only sets the peer: datagrams from anyone else are discarded,
            # and an ICMP port unreachable comes back as ECONNREFUSED (udp(7)).
            sock.connect((upstream.host, upstream.port))
            await loop.sock_sendall(sock, query)
            async with asyncio.timeout(self.timeout):
                while True:
                    reply = await loop.sock_recv(sock, MAX_MESSAGE)
                    if wire.answers_query(reply, query_id, question):
                        return reply
        except (OSError, TimeoutError):
            return None
        finally:
            sock.close()

    async def _exchange_tcp(
        self, upstream: Upstream, query: bytes, question: DNSQuestion
    ) -> bytes | None:
        query_id = struct.unpack_from("!H", query)[0]
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
                # RFC 1035 §4.2.2: over TCP a message is preceded by its two-octet length.
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = await reader.readexactly(length)
            return reply if wire.answers_query(reply, query_id, question) else None
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
