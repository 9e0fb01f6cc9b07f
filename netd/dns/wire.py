"""Glue between the embedded responder and dnslib, which does the DNS wire format: parse one
query, build the replies the responder gives itself (A, AAAA, PTR, NXDOMAIN, errors), and check
an upstream's reply.

The responder only ever reads a header, one question and an OPT record (RFC 1035 §4.1,
RFC 6891 §6). What dnslib accepts but the responder must refuse (a compressed question name,
answer records in a query, trailing bytes, a second OPT) is checked here and answered FORMERR.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dnslib import (
    AAAA,
    CLASS,
    EDNS0,
    PTR,
    QTYPE,
    RCODE,
    RD,
    RR,
    A,
    DNSBuffer,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)
from dnslib.bimap import BimapError
from dnslib.buffer import BufferError as DnslibBufferError
from dnslib.label import DNSLabelError

HEADER_SIZE = 12  # RFC 1035 §4.1.1
UDP_PLAIN_MAX = 512  # RFC 1035 §4.2.1: without EDNS a UDP message is at most 512 octets
UDP_EDNS_CAP = 4096  # we never send a UDP reply larger than this, whatever a client advertises
OUR_EDNS_PAYLOAD = 1232  # the size DNS Flag Day 2020 settled on to avoid IP fragmentation
TTL = 600  # what Docker's embedded resolver gives container records

OPCODE_QUERY = 0
NOERROR = RCODE.NOERROR
FORMERR = RCODE.FORMERR
SERVFAIL = RCODE.SERVFAIL
NXDOMAIN = RCODE.NXDOMAIN
NOTIMP = RCODE.NOTIMP
BADVERS = 16  # an extended RCODE, carried half in the header, half in the OPT (RFC 6891 §9)

TYPE_A, TYPE_PTR, TYPE_AAAA, TYPE_OPT, TYPE_ANY = (
    QTYPE.A,
    QTYPE.PTR,
    QTYPE.AAAA,
    QTYPE.OPT,
    QTYPE.ANY,
)
CLASS_IN = CLASS.IN

TYPE_NAMES = {TYPE_A: "A", TYPE_PTR: "PTR", TYPE_AAAA: "AAAA", TYPE_ANY: "ANY"}

# What dnslib raises on malformed input. A compression-pointer loop that its per-pointer check
# misses ends in RecursionError.
_MALFORMED = (DNSError, DNSLabelError, DnslibBufferError, BimapError, RecursionError)


class FormatError(Exception):
    """The message is not a well-formed DNS query; the responder answers FORMERR."""


@dataclass(frozen=True)
class Query:
    """One parsed query. ``labels`` are the question name's labels lowercased (RFC 4343: names
    compare case-insensitively); ``question`` keeps the case it was asked with, for replies."""

    header: DNSHeader
    question: DNSQuestion
    opt: RR | None
    labels: tuple[bytes, ...]

    @property
    def id(self) -> int:
        return int(self.header.id)

    @property
    def qtype(self) -> int:
        return int(self.question.qtype)

    @property
    def qclass(self) -> int:
        return int(self.question.qclass)

    @property
    def edns(self) -> bool:
        return self.opt is not None

    @property
    def edns_version(self) -> int:
        return int(self.opt.edns_ver) if self.opt is not None else 0

    @property
    def dnssec_ok(self) -> bool:
        return bool(self.opt is not None and self.opt.edns_do)

    @property
    def max_udp_reply(self) -> int:
        """The largest UDP reply this client accepts (RFC 6891 §6.2.5: below 512 means 512)."""
        if self.opt is None:
            return UDP_PLAIN_MAX
        return min(max(int(self.opt.edns_len), UDP_PLAIN_MAX), UDP_EDNS_CAP)

    @property
    def name(self) -> str:
        """The question name in presentation form, lowercased, without the final dot."""
        return ".".join(label.decode("ascii", "backslashreplace") for label in self.labels)


def header_of(data: bytes) -> DNSHeader | None:
    """The message's header, or None when it is shorter than one."""
    if len(data) < HEADER_SIZE:
        return None
    return DNSHeader.parse(DNSBuffer(data[:HEADER_SIZE]))


def parse_query(data: bytes) -> Query:
    """Parse a QUERY-opcode message with exactly one question. Raises FormatError."""
    buffer = DNSBuffer(data)
    try:
        header = DNSHeader.parse(buffer)
        if header.q != 1:
            raise FormatError(f"{header.q} questions; exactly one is supported")
        if header.a or header.auth:
            raise FormatError("a query with answer or authority records")
        question = DNSQuestion.parse(buffer)
        question_end = buffer.offset
        additional = [RR.parse(buffer) for _ in range(header.ar)]
        # The question name sits right after the header, so a compression pointer there could
        # only point back into the header (RFC 1035 §4.1.4): the question must re-encode to
        # exactly the octets received. Encoding also enforces 63-octet labels and 255-octet
        # names (RFC 1035 §2.3.4), which decoding does not.
        echoed = DNSBuffer()
        question.pack(echoed)
    except _MALFORMED as exc:
        raise FormatError(f"malformed query: {exc}") from None
    if echoed.data != data[HEADER_SIZE:question_end]:
        raise FormatError("compressed or over-long question name")
    if buffer.remaining():
        raise FormatError("trailing bytes after the last record")
    opts = [record for record in additional if record.rtype == TYPE_OPT]
    # RFC 6891 §6.1.1: at most one OPT record, owned by the root name.
    if len(opts) > 1 or any(opt.rname.label for opt in opts):
        raise FormatError("more than one OPT record, or an OPT not owned by the root")
    labels = tuple(label.lower() for label in question.qname.label)
    return Query(header, question, opts[0] if opts else None, labels)


def address_answer(address: str) -> tuple[int, RD]:
    """The (type, rdata) of an A or AAAA answer for ``address``."""
    if ":" in address:
        return TYPE_AAAA, AAAA(address)
    return TYPE_A, A(address)


def pointer_answer(name: str) -> tuple[int, RD]:
    """The (type, rdata) of a PTR answer naming ``name`` (a dotted ASCII name)."""
    return TYPE_PTR, PTR(DNSLabel(name.encode("ascii")))


def _reply_header(query: Query, rcode: int, authoritative: bool) -> DNSHeader:
    """QR and RA set, the request's opcode, RD and CD kept (RFC 1035 §4.1.1, RFC 4035 §3.2.2).
    Only the non-zero flags are passed: each one costs dnslib a checked bitmap update."""
    request = query.header
    flags = {"opcode": request.opcode, "rd": request.rd, "cd": request.cd, "rcode": rcode & 0xF}
    flags = {name: value for name, value in flags.items() if value}
    if authoritative:
        flags["aa"] = 1
    return DNSHeader(id=request.id, bitmap=0, qr=1, ra=1, **flags)


def build_reply(
    query: Query,
    rcode: int,
    answers: list[tuple[int, RD]],
    max_size: int,
    authoritative: bool = True,
) -> bytes:
    """A reply echoing the question, with ``answers`` as (type, rdata) owned by the question
    name. Truncated to header + question (+OPT) with TC set when it would not fit
    ``max_size`` (RFC 2181 §9)."""
    reply = DNSRecord(_reply_header(query, rcode, authoritative), q=query.question)
    for rtype, rdata in answers:
        reply.add_answer(RR(query.question.qname, rtype, CLASS_IN, TTL, rdata))
    if query.opt is not None:
        # RFC 6891 §6.1.3: the OPT carries the upper 8 bits of the RCODE, and DO is echoed.
        reply.add_ar(
            EDNS0(
                ext_rcode=rcode >> 4,
                udp_len=OUR_EDNS_PAYLOAD,
                flags="do" if query.dnssec_ok else "",
            )
        )
    packed = bytes(reply.pack())
    if len(packed) > max_size:
        reply.rr = []
        reply.header.tc = 1
        packed = bytes(reply.pack())
    return packed


def header_only_reply(data: bytes, rcode: int) -> bytes | None:
    """FORMERR/NOTIMP for a message that could not be parsed: the header of the request with
    QR set, its ID, opcode and RD kept, and no sections (RFC 1035 §4.1.1). None when there is
    not even a header to answer."""
    request = header_of(data)
    if request is None:
        return None
    header = DNSHeader(
        id=request.id, bitmap=0, qr=1, opcode=request.opcode, rd=request.rd, ra=1, rcode=rcode
    )
    return bytes(DNSRecord(header).pack())


def truncated_reply(reply: bytes, client_id: int, question: DNSQuestion) -> bytes:
    """An upstream's reply cut down to its header (with TC set and the client's ID) and the
    question, for a client that cannot take it whole over UDP (RFC 2181 §9)."""
    header = DNSHeader.parse(DNSBuffer(reply[:HEADER_SIZE]))
    header.id = client_id
    header.tc = 1
    return bytes(DNSRecord(header, q=question).pack())


def with_id(message: bytes, new_id: int) -> bytes:
    """``message`` with its ID (the first two octets, RFC 1035 §4.1.1) replaced and every other
    octet unchanged: forwarded messages are passed on as they are, never re-encoded."""
    return struct.pack("!H", new_id) + message[2:]


def rcode_of(message: bytes) -> int:
    return int(DNSHeader.parse(DNSBuffer(message[:HEADER_SIZE])).rcode)


def is_truncated(message: bytes) -> bool:
    return bool(DNSHeader.parse(DNSBuffer(message[:HEADER_SIZE])).tc)


def answers_query(reply: bytes, query_id: int, question: DNSQuestion) -> bool:
    """Whether ``reply`` is an upstream's reply to our query: QR set, our ID, and the same
    question (name case-insensitively, RFC 5452 §4.2). An error reply without a question
    section (FORMERR/NOTIMP/REFUSED from a server that could not parse it) also counts."""
    buffer = DNSBuffer(reply)
    try:
        header = DNSHeader.parse(buffer)
        if header.id != query_id or not header.qr:
            return False
        if header.q == 0:
            return bool(header.rcode != NOERROR)
        if header.q != 1:
            return False
        # DNSQuestion compares its name case-insensitively, its type and class exactly.
        return bool(DNSQuestion.parse(buffer) == question)
    except _MALFORMED:
        return False
