"""What every part of the Docker Engine API shares: errors, query flags, bodies, filters, streams.

Docker's conventions (swagger v1.41): errors are ``{"message": "..."}`` with the status code
saying what kind; booleans in queries are ``1``/``true``; ``filters`` is a JSON object whose values
are either a list of strings or (what the docker CLI sends) an object ``{"value": true}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from common import errors

log = logging.getLogger("pyengined.api")


class NotImplementedByEngine(Exception):
    """A Docker feature pyengined does not have: the API answers 501 with this message."""


class NotFound(errors.NotFound):
    """An object other than a container or image that does not exist: 404."""


class Forbidden(errors.Forbidden):
    """An operation Docker refuses on purpose (e.g. removing the default network): 403."""


class BadParameter(errors.InvalidParameter):
    """A request pyengined understands but cannot accept as given: 400."""


def json_response(obj: Any, status: int = 200) -> web.Response:
    """JSON with Docker's exact ``Content-Type: application/json``: the docker CLI shows an
    error body as raw text unless the type is exactly that (aiohttp's json_response adds a
    charset parameter)."""
    return web.Response(
        body=json.dumps(obj).encode(), status=status, content_type="application/json"
    )


def error_response(status: int, message: str) -> web.Response:
    return json_response({"message": message}, status=status)


def flag(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    return value.lower() in ("1", "true", "yes")


def int_query(request: web.Request, name: str, default: int | None = None) -> int | None:
    value = request.query.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise BadParameter(f"invalid value for {name}: {value!r}") from None


def float_query(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        raise BadParameter(f"invalid value for {name}: {value!r}") from None
    if not math.isfinite(number):
        raise BadParameter(f"invalid value for {name}: {value!r}")
    return number


# Bodies are attacker-controlled: JSON bodies are read whole only up to this size (the app's
# client_max_size; image archives are streamed and not bound by it), and parsed values are
# bounded in depth, integer range and string content before any handler looks at them.
MAX_JSON_BODY = 1 << 20
MAX_JSON_DEPTH = 32
INT64 = (-(1 << 63), (1 << 63) - 1)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_json_value(value: Any, what: str) -> None:
    """Refuse what Docker's Go decoder would refuse or what could hurt later: nesting deeper than
    MAX_JSON_DEPTH, integers outside int64, non-finite floats, NULs and lone surrogates in
    strings. Iterative, so depth costs no Python recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise BadParameter(f"invalid {what}: nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            if "\0" in item:
                raise BadParameter(f"invalid {what}: a string contains a NUL character")
            try:
                item.encode()
            except UnicodeEncodeError:
                raise BadParameter(f"invalid {what}: a string is not valid UTF-8") from None
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int) and not INT64[0] <= item <= INT64[1]:
            raise BadParameter(f"invalid {what}: number {item} out of range")
        elif isinstance(item, float) and not math.isfinite(item):
            raise BadParameter(f"invalid {what}: number out of range")


def parse_json(raw: bytes | str, what: str) -> Any:
    """JSON from a client, checked by ``check_json_value``; any failure is a BadParameter."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadParameter(f"invalid {what}: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        # ValueError covers JSONDecodeError and CPython's limit on integer digits.
        raise BadParameter(f"invalid {what}: {e}") from None
    check_json_value(value, what)
    return value


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.read()  # HTTP 413 past the app's client_max_size (MAX_JSON_BODY)
    if not raw.strip():
        return {}
    body = parse_json(raw, "JSON body")
    if not isinstance(body, dict):
        raise BadParameter("request body must be a JSON object")
    return body


def parse_filters(request: web.Request, allowed: set[str]) -> dict[str, list[str]]:
    """The ``filters`` query as {key: [values]}; an unknown key is a 400 as in Docker."""
    raw = request.query.get("filters")
    if not raw:
        return {}
    data = parse_json(raw, "filters")
    if not isinstance(data, dict):
        raise BadParameter("invalid filters: not a JSON object")
    filters: dict[str, list[str]] = {}
    for key, value in data.items():
        if key not in allowed:
            raise BadParameter(f"invalid filter '{key}'")
        if isinstance(value, dict):
            values = [str(k) for k, on in value.items() if on]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            values = list(value)
        else:
            raise BadParameter(f"invalid filter '{key}': want a list of strings or an object")
        filters[key] = values
    return filters


# ---- streams ---------------------------------------------------------------------------------

# Docker's multiplexed stream (no TTY): an 8-byte header [stream, 0, 0, 0, size uint32 BE],
# then the payload (swagger: ContainerAttach).
STREAM_IDS = {"stdin": 0, "stdout": 1, "stderr": 2}
MEDIA_RAW_STREAM = "application/vnd.docker.raw-stream"
MEDIA_MULTIPLEXED_STREAM = "application/vnd.docker.multiplexed-stream"


def stream_frame(stream: str, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", STREAM_IDS[stream], len(payload)) + payload


class HijackedResponse(web.StreamResponse):
    """A response whose body is the raw connection: no chunked coding, no length, closed at the
    end. Docker answers an attach this way, with ``101 UPGRADED`` when the client asked for
    ``Upgrade: tcp`` and ``200 OK`` otherwise; either way the client reads raw bytes."""

    # aiohttp would pick chunked coding for a body of unknown length; WebSocketResponse turns
    # the same switch off, for the same reason.
    _length_check = False

    def __init__(self, upgrade: bool) -> None:
        headers = {"Content-Type": MEDIA_RAW_STREAM}
        if upgrade:
            headers.update(Connection="Upgrade", Upgrade="tcp")
        super().__init__(
            status=101 if upgrade else 200, reason="UPGRADED" if upgrade else "OK", headers=headers
        )
        self.force_close()

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        transport = request.transport
        if transport is not None and not isinstance(transport.get_protocol(), _HijackedProtocol):
            transport.set_protocol(_HijackedProtocol(transport.get_protocol()))
        return writer


class _HijackedProtocol(asyncio.Protocol):
    """Stands between a hijacked connection and aiohttp's protocol once the headers are out.

    The docker CLI shuts down its write side as soon as it has no stdin to send (a TCP-style
    half-close, shutdown(2) SHUT_WR). asyncio closes a transport whose protocol's
    eof_received() returns a false value, as aiohttp's does; this one keeps the read-closed
    connection open for the output still to come, drops the (unused) stdin bytes, and hands
    everything else to aiohttp so its bookkeeping and flow control stay right.
    """

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self.inner = inner

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class JsonLinesResponse(web.StreamResponse):
    """Docker's progress stream: chunked, one JSON object per line, HTTP 200 even when the last
    object is an error (``{"errorDetail": {"message": m}, "error": m}``)."""

    def __init__(self) -> None:
        super().__init__(status=200, headers={"Content-Type": "application/json"})

    async def send(self, obj: dict[str, Any]) -> None:
        await self.write(json.dumps(obj).encode() + b"\r\n")

    async def send_error(self, message: str) -> None:
        await self.send({"errorDetail": {"message": message}, "error": message})
