"""The embedded DNS responder (netd.dns): its name table, real UDP/TCP queries on loopback,
forwarding to a fake upstream this test runs on loopback, a responder inside a test-made network
namespace queried with busybox nslookup, fuzzing, and the standalone runner.

Traffic goes only to 127.0.53.0/24 (responders and fake upstreams) and to 127.0.0.11 inside
``pyetest-dns-*`` namespaces. Queries and replies are built and read with dnspython, an
implementation independent of the responder's own wire code.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from netd.dns import (
    DnsResponder,
    NameTable,
    container_resolv_conf,
    host_upstreams,
    load_host_upstreams,
)
from netd.dns.server import MAX_QUERY
from netd.errors import NetdError
from tests.conftest import REPO, require_root, require_tool
from tests.netns_helpers import netns_socket

RESPONDER_IP = "127.0.53.1"
UPSTREAM_IP = "127.0.53.2"
SECOND_UPSTREAM_IP = "127.0.53.3"
IO_TIMEOUT = 5.0  # bounds every blocking client call; no assertion depends on it


# -- a fake upstream resolver on loopback -------------------------------------------------------


def _bind_udp_tcp(host: str) -> tuple[socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(20):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise AssertionError(f"no port free for both UDP and TCP on {host}")


@dataclass
class FakeUpstream:
    """A resolver on loopback: ``answers`` names get A records, ``big`` names are truncated
    over UDP and get 100 A records over TCP, ``servfail`` names get SERVFAIL, anything else
    NXDOMAIN. Every query it sees is recorded as (protocol, name)."""

    host: str
    answers: dict[str, list[str]] = field(default_factory=dict)
    big: set[str] = field(default_factory=set)
    servfail: set[str] = field(default_factory=set)
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._udp, self._tcp = _bind_udp_tcp(self.host)
        self._udp.settimeout(0.2)
        self._tcp.settimeout(0.2)
        self.port = self._udp.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _reply(self, data: bytes, proto: str) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None  # fuzzed junk: a real server might drop it too
        if len(query.question) != 1:
            return None
        name = query.question[0].name.to_text().lower()
        self.seen.append((proto, name))
        reply = dns.message.make_response(query)
        if name in self.servfail:
            reply.set_rcode(dns.rcode.SERVFAIL)
        elif name in self.big:
            if proto == "udp":
                reply.flags |= dns.flags.TC
            else:
                addresses = [f"10.99.{i // 250}.{i % 250 + 1}" for i in range(100)]
                reply.answer.append(dns.rrset.from_text_list(name, 60, "IN", "A", addresses))
        elif name in self.answers and query.question[0].rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text_list(name, 60, "IN", "A", self.answers[name]))
        elif name not in self.answers:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply.to_wire()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._reply(data, "udp")
            if reply is not None:
                self._udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT)
                try:
                    length = struct.unpack("!H", _recv_exactly(conn, 2))[0]
                    reply = self._reply(_recv_exactly(conn, length), "tcp")
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                except (OSError, EOFError):
                    pass

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._udp.close()
        self._tcp.close()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def closed_port(host: str) -> int:
    """A UDP/TCP port on ``host`` that nothing listens on (it was free a moment ago)."""
    udp, tcp = _bind_udp_tcp(host)
    port = udp.getsockname()[1]
    udp.close()
    tcp.close()
    return port


# -- an event loop in a thread, for responders under test ---------------------------------------


class LoopThread:
    """Runs the responders on their own event loop (uvloop, as the daemon does), so the test
    can query them with ordinary blocking sockets and update tables from its own thread."""

    def __init__(self, use_uvloop: bool = True) -> None:
        self.loop = uvloop.new_event_loop() if use_uvloop else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(
        UPSTREAM_IP,
        answers={"www.example.test.": ["198.18.0.10"]},
        big={"big.example.test."},
        servfail={"broken.example.test."},
    )
    try:
        yield fake
    finally:
        fake.close()


StartResponder = Callable[..., DnsResponder]


@pytest.fixture(params=["uvloop"])
def start_responder(request: pytest.FixtureRequest) -> Iterator[StartResponder]:
    """start_responder(table, upstreams=[...], domain="", listen=..., netns_path=None)."""
    loop = LoopThread(use_uvloop=request.param == "uvloop")
    started: list[DnsResponder] = []

    def start(
        table: NameTable,
        upstreams: list[tuple[str, int]] | None = None,
        domain: str = "",
        listen: tuple[str, int] = (RESPONDER_IP, 0),
        netns_path: str | None = None,
        timeout: float = 2.0,
    ) -> DnsResponder:
        responder = DnsResponder(table, listen, upstreams or [], domain, netns_path, timeout)
        loop.run(responder.start())
        started.append(responder)
        return responder

    try:
        yield start
    finally:
        for responder in started:
            loop.run(responder.close())
        loop.stop()


def udp_query(
    server: tuple[str, int], name: str, rdtype: str = "A", **kwargs: Any
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)
    return dns.query.udp(query, server[0], port=server[1], timeout=IO_TIMEOUT)


def tcp_query(
    server: tuple[str, int], name: str, rdtype: str = "A", **kwargs: Any
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)
    return dns.query.tcp(query, server[0], port=server[1], timeout=IO_TIMEOUT)


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def raw_udp_exchange(server: tuple[str, int], payload: bytes, sentinel_name: str) -> list[bytes]:
    """Send ``payload`` then a valid query; return every reply received before the sentinel's
    (UDP from one socket is handled in order, so the payload's reply, if any, comes first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(server)
        sock.send(payload)
        sentinel = dns.message.make_query(sentinel_name, "A")
        sentinel.id = 4242
        sock.send(sentinel.to_wire())
        replies: list[bytes] = []
        while True:
            data = sock.recv(65535)
            if data[:2] == struct.pack("!H", 4242):
                return replies
            replies.append(data)


def sample_table() -> NameTable:
    table = NameTable()
    table.set("c1", ["/Web", "frontend"], ["10.52.0.2"], ["fd52::2"])
    table.set("c2", ["db"], ["10.52.0.3"], [])
    return table


# -- NameTable --------------------------------------------------------------------------------


def test_table_names_and_aliases_case_and_final_dot() -> None:
    table = sample_table()
    assert table.lookup("web", "A") == ["10.52.0.2"]
    assert table.lookup("WEB.", "A") == ["10.52.0.2"]
    assert table.lookup("FrontEnd", "AAAA") == ["fd52::2"]
    assert table.lookup("db", "AAAA") == []  # a known name without IPv6: NODATA, not ours=None
    assert table.lookup("db", "MX") == []
    assert table.lookup("web", "ANY") == ["10.52.0.2", "fd52::2"]
    assert table.lookup("nope", "A") is None
    assert table.lookup("2.0.52.10.in-addr.arpa.", "PTR") == ["web"]
    assert table.lookup("3.0.52.10.in-addr.arpa", "ptr") == ["db"]
    assert table.lookup("9.0.52.10.in-addr.arpa", "PTR") is None
    v6 = "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.5.d.f.ip6.arpa"
    assert table.lookup(v6, "PTR") == ["web"]


def test_table_shared_alias_replace_and_remove() -> None:
    table = sample_table()
    table.set("c3", ["svc"], ["10.52.0.4"], [])
    table.set("c4", ["svc", "worker"], ["10.52.0.5"], [])
    assert table.lookup("svc", "A") == ["10.52.0.4", "10.52.0.5"]
    table.set("c4", ["other"], ["10.52.0.6"], [])  # a new record replaces the old one whole
    assert table.lookup("svc", "A") == ["10.52.0.4"]
    assert table.lookup("worker", "A") is None
    assert table.lookup("other", "A") == ["10.52.0.6"]
    assert table.lookup("5.0.52.10.in-addr.arpa", "PTR") is None
    table.remove("c3")
    table.remove("c3")  # removing twice is a no-op
    assert table.lookup("svc", "A") is None
    assert len(table) == 3


@pytest.mark.parametrize(
    "names, ipv4, ipv6",
    [
        (["bad name"], ["10.52.0.9"], []),
        (["-dash"], ["10.52.0.9"], []),
        (["a" * 64], ["10.52.0.9"], []),
        (["ok"], ["10.52.0.300"], []),
        (["ok"], ["fd52::9"], []),
        (["ok"], [], ["10.52.0.9"]),
    ],
)
def test_table_rejects_bad_records_and_changes_nothing(
    names: list[str], ipv4: list[str], ipv6: list[str]
) -> None:
    table = sample_table()
    before = table.records()
    with pytest.raises(NetdError):
        table.set("c1", names, ipv4, ipv6)
    assert table.records() == before


def test_table_concurrent_updates_are_atomic_and_visible_at_once() -> None:
    """Writers replace a record whose two addresses carry the same generation number; readers
    must never see a mix of generations, a half record, or an update before set() returns."""
    table = NameTable()
    table.set("pair", ["pair"], ["10.60.0.1", "10.61.0.1"], [])
    failures: list[str] = []
    done = threading.Event()

    def writer(offset: int) -> None:
        for i in range(2000):
            g = (i * 2 + offset) % 250 + 1
            table.set("pair", ["pair"], [f"10.60.0.{g}", f"10.61.0.{g}"], [])
            table.set(f"w{offset}", [f"fresh{offset}"], [f"10.62.{offset}.{g}"], [])
            seen = table.lookup(f"fresh{offset}", "A")
            if seen != [f"10.62.{offset}.{g}"]:
                failures.append(f"own update not visible: {seen}")

    def reader() -> None:
        while not done.is_set():
            found = table.lookup("pair", "A")
            if found is None or len(found) != 2:
                failures.append(f"half record: {found}")
                return
            if found[0].split(".")[3] != found[1].split(".")[3]:
                failures.append(f"mixed generations: {found}")
                return

    writers = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert failures == []


# -- resolv.conf ------------------------------------------------------------------------------


def test_host_upstreams_from_resolv_conf() -> None:
    text = (
        "# generated\n"
        "domain corp.example\n"
        "nameserver 198.18.0.53 # primary\n"
        "; nameserver 198.18.0.54\n"
        "nameserver   2001:db8::53\n"
        "nameserver not-an-address\n"
        "nameserver 198.18.0.53\n"
        "options edns0\n"
    )
    assert host_upstreams(text) == [("198.18.0.53", 53), ("2001:db8::53", 53)]
    assert host_upstreams("") == []


def test_host_upstreams_behind_systemd_resolved() -> None:
    stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n"
    real = "# resolved's upstreams\nnameserver 198.18.1.1\nnameserver 198.18.1.2\n"
    assert host_upstreams(stub, real) == [("198.18.1.1", 53), ("198.18.1.2", 53)]
    assert host_upstreams(stub, None) == [("127.0.0.53", 53)]  # no resolved file: the stub
    assert host_upstreams(stub, "") == [("127.0.0.53", 53)]
    assert host_upstreams("nameserver 198.18.2.2\n", real) == [("198.18.2.2", 53)]


def test_load_host_upstreams_reads_the_files(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolved = tmp_path / "resolved.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    resolved.write_text("nameserver 198.18.3.3\n")
    assert load_host_upstreams(resolv, resolved) == [("198.18.3.3", 53)]
    assert load_host_upstreams(resolv, tmp_path / "missing") == [("127.0.0.53", 53)]
    assert load_host_upstreams(tmp_path / "missing", resolved) == []


def test_container_resolv_conf() -> None:
    host = "nameserver 198.18.0.53\nsearch a.example b.example\noptions edns0 attempts:2\n"
    assert container_resolv_conf(host) == (
        "nameserver 127.0.0.11\nsearch a.example b.example\noptions edns0 attempts:2 ndots:0\n"
    )
    assert container_resolv_conf("search x\ndomain y\noptions ndots:3\n") == (
        "nameserver 127.0.0.11\nsearch y\noptions ndots:3\n"
    )


# -- the responder over real sockets ----------------------------------------------------------


@pytest.mark.parametrize("start_responder", ["uvloop", "asyncio"], indirect=True)
def test_answers_container_names_over_udp_and_tcp(start_responder: StartResponder) -> None:
    responder = start_responder(sample_table(), domain="Pye.Test")
    server = responder.address
    assert server[0] == RESPONDER_IP and server[1] > 0
    for query in (udp_query, tcp_query):
        reply = query(server, "web", "A")
        assert reply.rcode() == dns.rcode.NOERROR
        assert addresses(reply) == ["10.52.0.2"]
        assert reply.flags & dns.flags.AA and reply.flags & dns.flags.RA
        assert reply.answer[0].ttl == 600
        assert addresses(query(server, "FRONTEND.", "AAAA")) == ["fd52::2"]
        assert addresses(query(server, "web.pye.test.", "A")) == ["10.52.0.2"]
        assert addresses(query(server, "DB.Pye.Test", "A")) == ["10.52.0.3"]
        nodata = query(server, "db", "AAAA")
        assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []
        ptr = query(server, "2.0.52.10.in-addr.arpa.", "PTR")
        assert [rd.to_text() for rd in ptr.answer[0]] == ["web.pye.test."]


def test_question_case_and_id_are_echoed(start_responder: StartResponder) -> None:
    server = start_responder(sample_table()).address
    query = dns.message.make_query("WeB.", "A", use_edns=0, payload=1232, want_dnssec=True)
    reply = dns.query.udp(query, server[0], port=server[1], timeout=IO_TIMEOUT)
    assert reply.id == query.id
    assert reply.question[0].name.to_text() == "WeB."  # RFC 4343: the question as asked
    assert reply.edns == 0 and reply.ednsflags & dns.flags.DO
    assert reply.flags & dns.flags.RD


def test_nxdomain_for_unknown_single_label_and_domain_names(
    start_responder: StartResponder, upstream: FakeUpstream
) -> None:
    server = start_responder(sample_table(), [upstream.address], domain="pye.test").address
    for query in (udp_query, tcp_query):
        for name in ("nope", "NOPE.", "nope.pye.test", "deep.nope.pye.test."):
            reply = query(server, name, "A")
            assert reply.rcode() == dns.rcode.NXDOMAIN, name
        apex = query(server, "pye.test", "A")
        assert apex.rcode() == dns.rcode.NOERROR and apex.answer == []
    assert upstream.seen == []  # none of these left the responder


def test_truncation_and_tcp_for_large_answers(start_responder: StartResponder) -> None:
    table = NameTable()
    for i in range(100):
        table.set(f"c{i}", [f"replica{i}", "svc"], [f"10.53.{i // 200}.{i % 200 + 1}"], [])
    server = start_responder(table).address
    plain = udp_query(server, "svc", "A")  # no EDNS: 512 octets at most
    assert plain.flags & dns.flags.TC and plain.answer == []
    edns = udp_query(server, "svc", "A", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC and len(addresses(edns)) == 100
    over_tcp = tcp_query(server, "svc", "A")
    assert len(addresses(over_tcp)) == 100
    assert over_tcp.answer[0].name.to_text() == "svc."


def test_updates_are_visible_to_the_next_query(start_responder: StartResponder) -> None:
    table = sample_table()
    server = start_responder(table).address
    for i in range(1, 60):
        table.set("moving", ["moving"], [f"10.54.0.{i}"], [])
        assert addresses(udp_query(server, "moving", "A")) == [f"10.54.0.{i}"]
    table.remove("moving")
    assert udp_query(server, "moving", "A").rcode() == dns.rcode.NXDOMAIN


def test_queries_during_concurrent_updates_see_whole_records(
    start_responder: StartResponder,
) -> None:
    table = NameTable()
    table.set("pair", ["pair"], ["10.60.0.1", "10.61.0.1"], [])
    server = start_responder(table).address
    stop = threading.Event()

    def writer() -> None:
        g = 0
        while not stop.is_set():
            g = g % 250 + 1
            table.set("pair", ["pair"], [f"10.60.0.{g}", f"10.61.0.{g}"], [])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            found = addresses(udp_query(server, "pair", "A"))
            assert len(found) == 2 and found[0].split(".")[3] == found[1].split(".")[3], found
    finally:
        stop.set()
        thread.join()


# -- forwarding -------------------------------------------------------------------------------


def test_forwards_other_names_over_udp_and_tcp(
    start_responder: StartResponder, upstream: FakeUpstream
) -> None:
    server = start_responder(sample_table(), [upstream.address], domain="pye.test").address
    reply = udp_query(server, "www.example.test", "A")
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["198.18.0.10"]
    assert upstream.seen == [("udp", "www.example.test.")]
    reply = tcp_query(server, "www.example.test", "A")
    assert addresses(reply) == ["198.18.0.10"]
    assert upstream.seen[-1] == ("tcp", "www.example.test.")
    assert udp_query(server, "missing.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    # A multi-label name outside the domain is not ours, even if its first label is.
    assert udp_query(server, "web.example.test", "A").rcode() == dns.rcode.NXDOMAIN
    assert ("udp", "web.example.test.") in upstream.seen
    # An address that is not a container's is asked upstream too.
    udp_query(server, "9.9.52.10.in-addr.arpa", "PTR")
    assert ("udp", "9.9.52.10.in-addr.arpa.") in upstream.seen


def test_truncated_upstream_reply_is_retried_over_tcp(
    start_responder: StartResponder, upstream: FakeUpstream
) -> None:
    server = start_responder(NameTable(), [upstream.address]).address
    reply = udp_query(server, "big.example.test", "A", use_edns=0, payload=4096)
    assert not reply.flags & dns.flags.TC and len(addresses(reply)) == 100
    assert upstream.seen == [("udp", "big.example.test."), ("tcp", "big.example.test.")]
    # Without EDNS the full answer does not fit: the client gets TC and retries over TCP.
    small = udp_query(server, "big.example.test", "A")
    assert small.flags & dns.flags.TC and small.answer == []
    assert len(addresses(tcp_query(server, "big.example.test", "A"))) == 100


def test_failover_to_the_next_upstream(
    start_responder: StartResponder, upstream: FakeUpstream
) -> None:
    second = FakeUpstream(SECOND_UPSTREAM_IP, answers={"broken.example.test.": ["198.18.0.77"]})
    try:
        refused = (UPSTREAM_IP, closed_port(UPSTREAM_IP))
        server = start_responder(NameTable(), [refused, upstream.address, second.address]).address
        # The first upstream refuses (ICMP port unreachable), the second answers.
        assert addresses(udp_query(server, "www.example.test")) == ["198.18.0.10"]
        assert addresses(tcp_query(server, "www.example.test")) == ["198.18.0.10"]
        # The second answers SERVFAIL, so the third is asked.
        assert addresses(udp_query(server, "broken.example.test")) == ["198.18.0.77"]
        assert second.seen == [("udp", "broken.example.test.")]
    finally:
        second.close()


def test_servfail_when_no_upstream_answers(
    start_responder: StartResponder, upstream: FakeUpstream
) -> None:
    refused = (UPSTREAM_IP, closed_port(UPSTREAM_IP))
    server = start_responder(NameTable(), [refused]).address
    for query in (udp_query, tcp_query):
        reply = query(server, "www.example.test", "A")
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert not reply.flags & dns.flags.AA
    only_broken = start_responder(NameTable(), [upstream.address]).address
    assert udp_query(only_broken, "broken.example.test").rcode() == dns.rcode.SERVFAIL
    no_upstreams = start_responder(NameTable(), []).address
    assert udp_query(no_upstreams, "www.example.test").rcode() == dns.rcode.SERVFAIL


def test_forged_upstream_replies_are_ignored(start_responder: StartResponder) -> None:
    """A reply with the wrong ID or question is not taken for the answer (RFC 5452)."""
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind((UPSTREAM_IP, 0))
    forger.settimeout(IO_TIMEOUT)
    try:
        server = start_responder(NameTable(), [forger.getsockname()]).address
        result: list[dns.message.Message] = []
        client = threading.Thread(
            target=lambda: result.append(udp_query(server, "www.example.test")), daemon=True
        )
        client.start()
        data, peer = forger.recvfrom(65535)
        query = dns.message.from_wire(data)
        wrong_id = dns.message.make_response(query)
        wrong_id.id = (query.id + 1) % 65536
        wrong_id.answer.append(
            dns.rrset.from_text_list("www.example.test.", 60, "IN", "A", ["198.18.6.6"])
        )
        other = dns.message.make_query("evil.example.test", "A")
        other.id = query.id
        wrong_question = dns.message.make_response(other)
        good = dns.message.make_response(query)
        good.answer.append(
            dns.rrset.from_text_list("www.example.test.", 60, "IN", "A", ["198.18.0.10"])
        )
        for reply in (wrong_id, wrong_question, good):
            forger.sendto(reply.to_wire(), peer)
        client.join(timeout=IO_TIMEOUT * 2)
        assert len(result) == 1 and addresses(result[0]) == ["198.18.0.10"]
    finally:
        forger.close()


# -- malformed queries and fuzzing ------------------------------------------------------------


def _query_bytes(name: str = "web", rdtype: str = "A", qid: int = 7, **kwargs: Any) -> bytes:
    query = dns.message.make_query(name, rdtype, **kwargs)
    query.id = qid
    return query.to_wire()


def test_malformed_queries_get_formerr_notimp_or_are_dropped(
    start_responder: StartResponder,
) -> None:
    responder = start_responder(sample_table())
    server = responder.address
    good = _query_bytes()
    header = struct.unpack("!6H", good[:12])

    def with_header(**fields: int) -> bytes:
        names = ("id", "flags", "qd", "an", "ns", "ar")
        values = [fields.get(n, v) for n, v in zip(names, header, strict=True)]
        return struct.pack("!6H", *values) + good[12:]

    def single_reply(payload: bytes) -> dns.message.Message:
        replies = raw_udp_exchange(server, payload, "web")
        assert len(replies) == 1
        return dns.message.from_wire(replies[0])

    formerr_cases = {
        "two questions": with_header(qd=2),
        "no question": with_header(qd=0)[:12],
        "trailing junk": good + b"\x00\x01",
        "truncated question": good[:-3],
        "pointer in question": good[:12] + b"\xc0\x0c" + good[-4:],
        "label past the end": good[:12] + b"\x3fweb",
        "answer record in a query": with_header(an=1),
        "two OPT records": _two_opts(),
    }
    for case, payload in formerr_cases.items():
        reply = single_reply(payload)
        assert reply.rcode() == dns.rcode.FORMERR, case
        assert reply.id == 7, case
    notimp = single_reply(with_header(flags=5 << 11))  # opcode UPDATE
    assert notimp.rcode() == dns.rcode.NOTIMP
    badvers = single_reply(_query_bytes(use_edns=1))
    assert badvers.rcode() == dns.rcode.BADVERS
    dropped = responder.stats.dropped
    for payload in (b"", b"\x00" * 11, with_header(flags=0x8000), good + b"\x00" * MAX_QUERY):
        assert raw_udp_exchange(server, payload, "web") == []
    assert responder.stats.dropped == dropped + 4


def _two_opts() -> bytes:
    query = dns.message.make_query("web", "A", use_edns=0)
    wire = bytearray(query.to_wire())
    opt = bytes(wire[-11:])
    struct.pack_into("!H", wire, 10, 2)
    wire[:2] = b"\x00\x07"
    return bytes(wire) + opt


def test_oversized_or_junk_tcp_messages_close_only_that_connection(
    start_responder: StartResponder,
) -> None:
    server = start_responder(sample_table()).address
    with socket.create_connection(server, timeout=IO_TIMEOUT) as conn:
        junk = os.urandom(MAX_QUERY + 1)
        conn.sendall(struct.pack("!H", len(junk)) + junk)
        assert conn.recv(1) == b""  # dropped: the responder hung up
    with socket.create_connection(server, timeout=IO_TIMEOUT) as conn:
        conn.sendall(struct.pack("!H", 3) + b"abc")  # shorter than a header: dropped
        assert conn.recv(1) == b""
    with socket.create_connection(server, timeout=IO_TIMEOUT) as conn:
        # Two queries back to back on one connection, the first malformed (RFC 7766 §6.2.1).
        bad = _query_bytes(qid=1)[:-2]
        good = _query_bytes(qid=2)
        conn.sendall(struct.pack("!H", len(bad)) + bad + struct.pack("!H", len(good)) + good)
        first = _read_tcp_message(conn)
        second = _read_tcp_message(conn)
        assert first.id == 1 and first.rcode() == dns.rcode.FORMERR
        assert second.id == 2 and addresses(second) == ["10.52.0.2"]
    assert addresses(tcp_query(server, "web")) == ["10.52.0.2"]


def _read_tcp_message(conn: socket.socket) -> dns.message.Message:
    length = struct.unpack("!H", _recv_exactly(conn, 2))[0]
    return dns.message.from_wire(_recv_exactly(conn, length))


def _mutations(rng: random.Random, seeds: list[bytes]) -> Iterator[bytes]:
    """Random bytes and valid queries with bits flipped, bytes cut, inserted or overwritten,
    and header counts changed."""
    while True:
        kind = rng.randrange(6)
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 600))
            continue
        data = bytearray(rng.choice(seeds))
        if kind == 1:
            for _ in range(rng.randrange(1, 8)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == 2:
            del data[rng.randrange(len(data)) :]
        elif kind == 3:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randrange(1, 40))
        elif kind == 4:
            i = rng.randrange(len(data))
            data[i] = rng.choice([0, 0x3F, 0x40, 0x80, 0xC0, 0xFF, rng.randrange(256)])
        else:
            offset = rng.choice([4, 6, 8, 10])
            struct.pack_into("!H", data, offset, rng.choice([0, 1, 2, 255, 65535]))
        if len(data) > 2:
            data[2] &= 0x7F  # mostly keep QR clear, so the mutation reaches the parser
            if rng.random() < 0.05:
                data[2] |= 0x80
        yield bytes(data)


def _fuzz_seeds() -> list[bytes]:
    return [
        _query_bytes("web"),
        _query_bytes("frontend.pye.test", "AAAA", use_edns=0, payload=1232),
        _query_bytes("2.0.52.10.in-addr.arpa", "PTR"),
        _query_bytes("www.example.test", "A", use_edns=0, want_dnssec=True),
        _query_bytes("nope", "MX"),
    ]


def test_fuzz_the_query_handler() -> None:
    """20 000 seeded random and mutated messages straight into the handler: never an
    exception, and every reply is well-formed DNS with the query's ID."""
    responder = DnsResponder(sample_table(), (RESPONDER_IP, 0), [], domain="pye.test")
    rng = random.Random(8053)
    messages = _mutations(rng, _fuzz_seeds())
    outcomes = {"reply": 0, "forward": 0, "dropped": 0}
    for _ in range(20_000):
        data = next(messages)
        for over_tcp in (False, True):
            result = responder.answer_locally(data, over_tcp)
            if result is None:
                outcomes["dropped"] += 1
            elif isinstance(result, bytes):
                outcomes["reply"] += 1
                reply = dns.message.from_wire(result)
                assert reply.id == struct.unpack_from("!H", data)[0]
                assert reply.flags & dns.flags.QR
                if not over_tcp:
                    assert len(result) <= 4096
            else:
                outcomes["forward"] += 1
    assert all(count > 0 for count in outcomes.values()), outcomes


def test_fuzz_over_the_wire_and_still_answering(
    start_responder: StartResponder, upstream: FakeUpstream
) -> None:
    """2 000 fuzzed datagrams and 100 fuzzed TCP messages at a live responder (forwarding to
    the fake upstream), then it still answers correctly."""
    responder = start_responder(sample_table(), [upstream.address], "pye.test", timeout=0.5)
    server = responder.address
    rng = random.Random(53)
    messages = _mutations(rng, _fuzz_seeds())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(server)
        for batch in range(40):
            for _ in range(50):
                sock.send(next(messages))
            sentinel = dns.message.make_query("web", "A")
            sentinel.id = 60000 + batch
            sock.send(sentinel.to_wire())
            while True:  # every reply before the sentinel's must be well-formed
                reply = dns.message.from_wire(sock.recv(65535))
                assert reply.flags & dns.flags.QR
                if reply.id == sentinel.id and reply.question == sentinel.question:
                    assert addresses(reply) == ["10.52.0.2"]
                    break
    for _ in range(100):
        payload = next(messages)
        with socket.create_connection(server, timeout=IO_TIMEOUT) as conn:
            conn.sendall(struct.pack("!H", len(payload)) + payload)
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65535):
                data += chunk
            if data:
                length = struct.unpack("!H", data[:2])[0]
                assert len(data) == 2 + length
                dns.message.from_wire(data[2:])
    assert addresses(udp_query(server, "web")) == ["10.52.0.2"]
    assert addresses(tcp_query(server, "frontend.pye.test", "AAAA")) == ["fd52::2"]
    assert addresses(udp_query(server, "www.example.test")) == ["198.18.0.10"]


# -- inside a network namespace ---------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    name = f"pyetest-dns-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _listening_in(netns_name: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns_name, "ss", "-Hlnut"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_responder_inside_a_network_namespace(
    netns: str, start_responder: StartResponder, upstream: FakeUpstream
) -> None:
    busybox = require_tool("busybox")
    table = sample_table()
    responder = start_responder(
        table, [upstream.address], listen=("127.0.0.11", 53), netns_path=f"/run/netns/{netns}"
    )
    listening = _listening_in(netns)
    assert "127.0.0.11:53" in listening
    assert listening.count("127.0.0.11:53") == 2  # UDP and TCP

    def nslookup(name: str) -> str:
        result = subprocess.run(
            ["ip", "netns", "exec", netns, busybox, "nslookup", name, "127.0.0.11"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout + result.stderr

    out = nslookup("web")
    assert "10.52.0.2" in out and "fd52::2" in out, out
    table.set("c9", ["late"], ["10.52.0.9"], [])
    assert "10.52.0.9" in nslookup("late")
    # Forwarded from the daemon's namespace to the upstream on the host's loopback.
    assert "198.18.0.10" in nslookup("www.example.test")
    assert ("udp", "www.example.test.") in upstream.seen
    assert "NXDOMAIN" in nslookup("nope")
    # TCP inside the namespace, from a socket made there.
    with netns_socket(netns) as conn:
        conn.connect(("127.0.0.11", 53))
        query = _query_bytes("frontend", "AAAA", qid=99)
        conn.sendall(struct.pack("!H", len(query)) + query)
        reply = _read_tcp_message(conn)
        assert reply.id == 99 and addresses(reply) == ["fd52::2"]
    assert responder.address == ("127.0.0.11", 53)


def test_netns_errors_leave_nothing_listening(netns: str, start_responder: StartResponder) -> None:
    with pytest.raises(NetdError, match="does not exist"):
        start_responder(NameTable(), netns_path="/run/netns/pyetest-dns-missing")
    first = start_responder(
        NameTable(), listen=("127.0.0.11", 53), netns_path=f"/run/netns/{netns}"
    )
    with pytest.raises(NetdError, match="cannot listen"):
        start_responder(NameTable(), listen=("127.0.0.11", 53), netns_path=f"/run/netns/{netns}")
    assert first.address == ("127.0.0.11", 53)
    assert _listening_in(netns).count("127.0.0.11:53") == 2  # only the first one's sockets


# -- the standalone runner --------------------------------------------------------------------


def test_standalone_runner(tmp_path: Path, upstream: FakeUpstream) -> None:
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"c1": {"names": ["web"], "ipv4": ["10.52.0.2"], "ipv6": []}}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netd.dns",
            "--listen",
            f"{RESPONDER_IP}:0",
            "--names-file",
            str(names),
            "--upstream",
            f"{upstream.host}:{upstream.port}",
            "--domain",
            "pye.test",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the runner did not start"
        line = proc.stdout.readline()
        assert line.startswith(f"listening on {RESPONDER_IP}:"), line
        server = (RESPONDER_IP, int(line.rsplit(":", 1)[1]))
        assert addresses(udp_query(server, "web.pye.test")) == ["10.52.0.2"]
        assert addresses(tcp_query(server, "www.example.test")) == ["198.18.0.10"]
        names.write_text(json.dumps({"c2": {"names": ["api"], "ipv4": ["10.52.0.5"]}}))
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):  # the reload is asynchronous: poll, bounded
            if udp_query(server, "api").rcode() == dns.rcode.NOERROR:
                break
        assert addresses(udp_query(server, "api")) == ["10.52.0.5"]
        assert udp_query(server, "web").rcode() == dns.rcode.NXDOMAIN
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_standalone_runner_rejects_a_missing_names_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "netd.dns",
            "--listen",
            f"{RESPONDER_IP}:0",
            "--names-file",
            str(tmp_path / "none.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr


def test_edns_padding_does_not_matter(start_responder: StartResponder) -> None:
    """EDNS options in a query (a cookie, padding) are skipped, not misread."""
    server = start_responder(sample_table()).address
    cookie = dns.edns.GenericOption(10, b"\x01" * 8)
    reply = udp_query(server, "web", "A", use_edns=0, options=[cookie])
    assert addresses(reply) == ["10.52.0.2"]


def test_ipv6_listener_and_upstream(start_responder: StartResponder) -> None:
    """A responder on ::1 forwarding to an upstream on ::1 (the family is the address's)."""
    fake = FakeUpstream("::1", answers={"www.example.test.": ["198.18.0.10"]})
    try:
        server = start_responder(sample_table(), [fake.address], listen=("::1", 0)).address
        assert server[0] == "::1"
        assert addresses(udp_query(server, "frontend", "AAAA")) == ["fd52::2"]
        assert addresses(tcp_query(server, "web")) == ["10.52.0.2"]
        assert addresses(udp_query(server, "www.example.test")) == ["198.18.0.10"]
        assert addresses(tcp_query(server, "www.example.test")) == ["198.18.0.10"]
        assert fake.seen == [("udp", "www.example.test."), ("tcp", "www.example.test.")]
    finally:
        fake.close()
