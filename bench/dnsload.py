"""The load side of ``pyengine-bench dns``: the queries and the fake upstream's replies in raw
wire format (RFC 1035 §4.1), and the load generator that keeps a fixed number of queries in
flight against one server (``run_load``)."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

LOCAL_NAME = "web"
LOCAL_ADDRESS = "10.52.0.2"
FORWARDED_ZONE = "example.test"
FORWARDED_ADDRESS = "198.18.0.10"  # what the fake upstream answers (RFC 2544's range)
FORWARDED_NAMES = 4096  # distinct forwarded names, cycled

LOSS_TIMEOUT_S = 0.5  # a query unanswered this long is counted lost and replaced

# RFC 1035 §4.1.1 header fields as the load generator reads them.
FLAG_QR = 0x8000
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_AND_RD = 0x7900
TYPE_A = 1
CLASS_IN = 1


class DnsBenchError(Exception):
    """The benchmark could not set up or run a server; the message says why."""


# -- the queries and the fake upstream's replies (raw wire format, RFC 1035 §4.1) --------------


def encode_name(name: str) -> bytes:
    out = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split("."))
    return out + b"\x00"


def query_without_id(name: str) -> bytes:
    """A standard query for ``name`` A, RD set, without its first two octets (the ID)."""
    header_rest = struct.pack("!5H", FLAG_RD, 1, 0, 0, 0)
    return header_rest + encode_name(name) + struct.pack("!HH", TYPE_A, CLASS_IN)


def queries_for(scenario: str) -> list[bytes]:
    if scenario == "local":
        return [query_without_id(LOCAL_NAME)]
    return [query_without_id(f"q{i}.{FORWARDED_ZONE}") for i in range(FORWARDED_NAMES)]


def upstream_reply(query: bytes) -> bytes | None:
    """The fake upstream's reply: the question echoed and, for an A question, one A record
    pointing back at it (a compression pointer to offset 12, RFC 1035 §4.1.4). Additional
    records of the query (an EDNS OPT) are not echoed. None for anything but a query."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack_from("!3H", query)
    if flags & FLAG_QR or qdcount != 1:
        return None
    end = 12
    while end < len(query) and query[end]:
        if query[end] & 0xC0:
            return None  # a query's only name is never compressed
        end += query[end] + 1
    end += 5  # the root label, QTYPE, QCLASS
    if end > len(query):
        return None
    qtype = struct.unpack_from("!H", query, end - 4)[0]
    answer = b""
    if qtype == TYPE_A:
        rdata = socket.inet_aton(FORWARDED_ADDRESS)
        answer = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, 60, 4) + rdata
    header = struct.pack(
        "!6H", qid, FLAG_QR | FLAG_RA | (flags & OPCODE_AND_RD), 1, 1 if answer else 0, 0, 0
    )
    return header + query[12:end] + answer


# -- the load generator --------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One load run against one server: counts over the measured window, latencies in ms."""

    answered: int  # good replies received in the measured window
    answered_total: int  # good replies, warm-up included (for CPU per query)
    errors: int  # replies with a non-NOERROR rcode or no answer
    lost: int  # queries unanswered after LOSS_TIMEOUT_S
    seconds: float
    p50_ms: float | None
    p99_ms: float | None

    @property
    def qps(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def _percentile(sorted_values: list[int], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index] / 1e6


def run_load(
    server: tuple[str, int],
    queries: list[bytes],
    duration_s: float,
    inflight: int,
    warmup_s: float,
) -> LoadResult:
    """Keep ``inflight`` queries outstanding against ``server`` for ``warmup_s`` +
    ``duration_s`` seconds, cycling through ``queries`` (each without its ID); measure over
    the last ``duration_s``."""
    ids = [i.to_bytes(2, "big") for i in range(65536)]
    clock = time.perf_counter_ns
    pending: dict[int, int] = {}  # query ID -> send time; insertion order is send order
    latencies: list[int] = []
    answered_total = errors = lost = 0
    next_id = 0
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.connect(server)
        sock.settimeout(LOSS_TIMEOUT_S / 5)
        send, recv = sock.send, sock.recv
        started = clock()
        measure_from = started + int(warmup_s * 1e9)
        deadline = measure_from + int(duration_s * 1e9)
        loss_ns = int(LOSS_TIMEOUT_S * 1e9)
        count = len(queries)

        def send_query() -> None:
            nonlocal next_id, sent
            while next_id in pending:  # an ID still in flight after 65536 sends: skip it
                next_id = (next_id + 1) & 0xFFFF
            pending[next_id] = clock()
            send(ids[next_id] + queries[sent % count])
            next_id = (next_id + 1) & 0xFFFF
            sent += 1

        for _ in range(inflight):
            send_query()
        now = clock()
        while now < deadline:
            try:
                reply = recv(4096)
            except TimeoutError:
                reply = b""
            except ConnectionRefusedError as exc:
                raise DnsBenchError(f"{server[0]}:{server[1]} refused the queries") from exc
            now = clock()
            if len(reply) >= 12:
                sent_at = pending.pop((reply[0] << 8) | reply[1], None)
                if sent_at is not None:
                    # RCODE is the low nibble of octet 3; ANCOUNT octets 6-7 (RFC 1035 §4.1.1).
                    if reply[3] & 0x0F or not (reply[6] or reply[7]):
                        errors += 1
                    else:
                        answered_total += 1
                        if now >= measure_from:
                            latencies.append(now - sent_at)
                    send_query()
            # Replace queries lost on the way (the oldest one first: the dict is in send order).
            while pending:
                oldest_id, oldest_at = next(iter(pending.items()))
                if now - oldest_at < loss_ns:
                    break
                del pending[oldest_id]
                lost += 1
                send_query()
    latencies.sort()
    return LoadResult(
        answered=len(latencies),
        answered_total=answered_total,
        errors=errors,
        lost=lost,
        seconds=duration_s,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
    )
