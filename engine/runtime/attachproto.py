"""The attach channel between the daemon and a container's monitor: stdin bytes and resizes.

The monitor listens on ``attach.sock`` in the container's directory; the daemon connects
(again after a restart: the monitor outlives it) and sends frames. A frame is a 1-byte kind, a
4-byte big-endian length and at most ``MAX_PAYLOAD`` bytes:

* ``STDIN``: bytes for the container's stdin (the pty master with a TTY, else a pipe);
* ``CLOSE_STDIN``: end of input (Docker's ``StdinOnce``; nothing with a TTY);
* ``RESIZE``: two big-endian uint16, rows and columns (TIOCSWINSZ on the pty master).

Nothing flows back: output is read from the container's json log. A socket path can be
longer than sun_path allows (108 bytes) beneath a deep data root, so both ends reach it through
an O_PATH descriptor of its directory, ``/proc/self/fd/N/attach.sock`` (as conmon does).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SOCKET_NAME = "attach.sock"
STDIN, CLOSE_STDIN, RESIZE = 0, 1, 2
KINDS = (STDIN, CLOSE_STDIN, RESIZE)
HEADER = struct.Struct(">BL")
MAX_PAYLOAD = 32 * 1024
MAX_CLIENTS = 16


class ProtocolError(ValueError):
    """A malformed frame: the monitor drops the connection that sent it."""


@dataclass(frozen=True)
class Frame:
    kind: int
    payload: bytes = b""

    def size(self) -> tuple[int, int]:
        if self.kind != RESIZE or len(self.payload) != 4:
            raise ProtocolError("not a resize")
        rows, cols = struct.unpack(">HH", self.payload)
        return rows, cols


def encode(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    return HEADER.pack(kind, len(payload)) + payload


def encode_stdin(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), MAX_PAYLOAD):
        yield encode(STDIN, data[start : start + MAX_PAYLOAD])


def encode_resize(rows: int, cols: int) -> bytes:
    return encode(RESIZE, struct.pack(">HH", rows, cols))


class Decoder:
    """Frames from a byte stream; holds at most one partial frame (≤ header + MAX_PAYLOAD)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        frames: list[Frame] = []
        while len(self.buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self.buffer)
            if kind not in KINDS or length > MAX_PAYLOAD:
                raise ProtocolError(f"bad frame (kind {kind}, length {length})")
            end = HEADER.size + length
            if len(self.buffer) < end:
                break
            frames.append(Frame(kind, bytes(self.buffer[HEADER.size : end])))
            del self.buffer[:end]
        return frames


@contextmanager
def socket_path(directory: Path) -> Iterator[str]:
    """A short path to ``directory/attach.sock`` valid while the context lasts."""
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)
