"""A hijacked connection that carries the client's stdin too (exec start, attach with stdin).

Once the response headers are out, the connection's bytes from the client are the stdin of the
process: they go into a bounded reader whose fill pauses reading from the socket (TCP flow
control then stops the client), and a half-close (shutdown(2) SHUT_WR, what the docker CLI
does when its stdin ends) is end of input. Detach keys (Docker's ``--detach-keys``, by
default ctrl-p ctrl-q) are recognised here: they end the stream, not the process.
"""

from __future__ import annotations

import asyncio

from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from common.errors import InvalidParameter
from engine.api.common import HijackedResponse

STDIN_BUFFER = 64 * 1024
DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"
MAX_DETACH_KEYS = 32


def parse_detach_keys(text: str) -> bytes:
    """Docker's key sequence syntax (moby pkg/term ToBytes): comma-separated keys, each one
    character or ``ctrl-`` + one of a-z @ [ \\ ] ^ _."""
    out = bytearray()
    for key in text.split(","):
        key = key.strip()
        if len(key) == 1:
            out += key.encode()
        elif key.lower().startswith("ctrl-") and len(key) == 6:
            c = key[5].lower()
            if "a" <= c <= "z":
                out.append(ord(c) - ord("a") + 1)
            elif c in "@[\\]^_":
                out.append("@[\\]^_".index(c) + (0 if c == "@" else 26))
            else:
                raise InvalidParameter(f"Invalid detach keys ({text}) provided")
        else:
            raise InvalidParameter(f"Invalid detach keys ({text}) provided")
    if not out or len(out) > MAX_DETACH_KEYS:
        raise InvalidParameter(f"Invalid detach keys ({text}) provided")
    return bytes(out)


class DetachScanner:
    """Holds back bytes that may begin the detach sequence (moby's escapeProxy)."""

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self.held = b""
        self.detached = False

    def feed(self, data: bytes) -> bytes:
        """What to pass on of ``data``; sets ``detached`` once the sequence is complete."""
        out = bytearray()
        for byte in data:
            if self.detached:
                break
            candidate = self.held + bytes([byte])
            if self.keys.startswith(candidate):
                self.held = candidate
                if candidate == self.keys:
                    self.detached = True
                    self.held = b""
            else:
                out += candidate
                self.held = b""
        return bytes(out)


class StdinHijackedResponse(HijackedResponse):
    """A hijacked response whose client bytes are readable from ``stdin``."""

    def __init__(self, upgrade: bool) -> None:
        super().__init__(upgrade)
        self.stdin = asyncio.StreamReader(limit=STDIN_BUFFER)

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        writer = await web_prepare(self, request)
        transport = request.transport
        if transport is not None:
            inner = transport.get_protocol()
            transport.set_protocol(_StdinProtocol(inner, self.stdin))
            self.stdin.set_transport(transport)
        return writer


async def web_prepare(resp: HijackedResponse, request: BaseRequest) -> AbstractStreamWriter | None:
    # The plain StreamResponse.prepare: HijackedResponse.prepare would put its own protocol
    # (which drops the client's bytes) in place.
    return await super(HijackedResponse, resp).prepare(request)


class _StdinProtocol(asyncio.Protocol):
    """Between the hijacked connection and aiohttp's protocol: the client's bytes to
    ``stdin``, write flow control and connection loss to aiohttp's protocol."""

    def __init__(self, inner: asyncio.BaseProtocol, stdin: asyncio.StreamReader) -> None:
        self.inner = inner
        self.stdin = stdin

    def data_received(self, data: bytes) -> None:
        self.stdin.feed_data(data)  # pauses the transport past 2 * STDIN_BUFFER

    def eof_received(self) -> bool:
        self.stdin.feed_eof()
        return True  # keep the write side open for the output still to come

    def connection_lost(self, exc: Exception | None) -> None:
        self.stdin.feed_eof()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
