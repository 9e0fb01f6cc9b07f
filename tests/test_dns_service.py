"""The embedded DNS service (netd.dns.service.EmbeddedDns): per-container responders on
127.0.0.11:53 inside real network namespaces, each scoped to the networks its container is on.

Two "networks" A and B (name tables only, no links): c1 is on A, c2 on A and B, c3 on B; each
container is a ``pyedns-<pid>-cN`` namespace with lo up and an attached responder, queried from
a socket created inside that namespace. Forwarded names go to a fake upstream this test runs on
127.0.55.2 in the test's own namespace (the service forwards from there). Traffic goes only to
127.0.0.11 inside those namespaces and to 127.0.55.0/24.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rcode
import dns.reversename
import pytest

from netd.dns.records import NameTable, ScopedNames
from netd.dns.resolvconf import EMBEDDED_DNS
from netd.dns.service import EmbeddedDns
from netd.errors import NetdError
from tests.conftest import REPO, require_root, require_tool
from tests.netns_helpers import netns_socket
from tests.test_dns import FakeUpstream, LoopThread, _recv_exactly

UPSTREAM_IP = "127.0.55.2"
NET_A = "net-a"
NET_B = "net-b"
DOMAIN = "pye.test"
BENCH_SMOKE_TIMEOUT = 120  # seconds; the smoke run itself is about 8 s


# -- offline: the scoped view -------------------------------------------------------------------


def test_scoped_names_merge_only_the_tables_in_scope() -> None:
    a, b, c = NameTable(), NameTable(), NameTable()
    a.set("c1", ["one"], ["10.53.0.2"], [])
    a.set("c2", ["two", "db"], ["10.53.0.3"], [])
    b.set("c2", ["two"], ["10.54.0.3"], ["fd54::3"])
    c.set("c9", ["hidden"], ["10.55.0.9"], [])
    scope: list[NameTable] = [a, b]
    view = ScopedNames(lambda: scope)
    assert view.lookup("two", "A") == ["10.53.0.3", "10.54.0.3"]  # union, in joining order
    assert view.lookup("TWO.", "AAAA") == ["fd54::3"]
    assert view.lookup("one", "AAAA") == []  # known, no address of that family: NODATA
    assert view.lookup("db", "MX") == []
    assert view.lookup("hidden", "A") is None  # a table out of scope answers nothing
    assert view.lookup("10.54.0.3.in-addr.arpa", "PTR") is None  # not the form of a PTR name
    assert view.lookup("3.0.54.10.in-addr.arpa", "PTR") == ["two"]
    scope.remove(a)  # the view asks for its tables on every lookup
    assert view.lookup("two", "A") == ["10.54.0.3"]
    assert view.lookup("one", "A") is None
    scope.clear()
    assert view.lookup("two", "A") is None


def test_set_endpoint_rejects_a_bad_record_and_changes_nothing() -> None:
    service = EmbeddedDns(upstreams=[])
    service.set_endpoint(NET_A, "c1", ["one"], ["10.53.0.2"])
    with pytest.raises(NetdError, match="invalid DNS name"):
        service.set_endpoint(NET_B, "c1", ["bad name"], ["10.54.0.2"])
    with pytest.raises(NetdError, match="not an IPv4 address"):
        service.set_endpoint(NET_A, "c1", ["one"], ["fd53::2"])
    with pytest.raises(NetdError, match="network id"):
        service.set_endpoint("", "c1", ["one"], ["10.53.0.2"])
    assert service.networks_of("c1") == [NET_A]
    view = ScopedNames(lambda: service._tables_of("c1"))
    assert view.lookup("one", "A") == ["10.53.0.2"]
    service.forget("c1")
    assert service.networks_of("c1") == []
    assert view.lookup("one", "A") is None


# -- real namespaces ----------------------------------------------------------------------------


@dataclass
class World:
    service: EmbeddedDns
    loop: LoopThread
    upstream: FakeUpstream
    netns: dict[str, str]  # container id -> namespace name

    def path(self, container_id: str) -> str:
        return f"/run/netns/{self.netns[container_id]}"

    def attach(self, container_id: str, netns_path: str | None = None) -> None:
        self.loop.run(self.service.attach(container_id, netns_path or self.path(container_id)))

    def detach(self, container_id: str) -> None:
        self.loop.run(self.service.detach(container_id))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _add_netns(name: str) -> None:
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")


def _listening_in(netns_name: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, "ss", "-Hlnut"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [line for line in out.splitlines() if f"{EMBEDDED_DNS}:53" in line]


@pytest.fixture
def world() -> Iterator[World]:
    require_root()
    require_tool("ip")
    require_tool("ss")
    prefix = f"pyedns-{os.getpid()}"
    created: list[str] = []
    loop = LoopThread()
    upstream = FakeUpstream(UPSTREAM_IP, answers={"www.example.test.": ["198.18.0.10"]})
    service = EmbeddedDns(upstreams=[upstream.address], domain=DOMAIN)
    try:
        netns = {cid: f"{prefix}-{cid}" for cid in ("c1", "c2", "c3")}
        for name in netns.values():
            created.append(name)
            _add_netns(name)
        service.set_endpoint(NET_A, "c1", ["one", "c1"], ["10.53.0.2"])
        service.set_endpoint(NET_A, "c2", ["two", "db", "c2"], ["10.53.0.3"])
        service.set_endpoint(NET_B, "c2", ["two", "c2"], ["10.54.0.3"], ["fd54::3"])
        service.set_endpoint(NET_B, "c3", ["three", "c3"], ["10.54.0.4"])
        world = World(service, loop, upstream, netns)
        for cid in netns:
            world.attach(cid)
        yield world
    finally:
        loop.run(service.close())
        loop.stop()
        upstream.close()
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def ask(netns_name: str, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    """A query to 127.0.0.11:53 from a socket made inside ``netns_name``."""
    query = dns.message.make_query(name, rdtype)
    wire = query.to_wire()
    if tcp:
        with netns_socket(netns_name, socket.AF_INET, socket.SOCK_STREAM) as conn:
            conn.connect((EMBEDDED_DNS, 53))
            conn.sendall(struct.pack("!H", len(wire)) + wire)
            length = struct.unpack("!H", _recv_exactly(conn, 2))[0]
            reply = dns.message.from_wire(_recv_exactly(conn, length))
    else:
        with netns_socket(netns_name, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((EMBEDDED_DNS, 53))
            sock.send(wire)
            reply = dns.message.from_wire(sock.recv(65535))
    assert query.is_response(reply)
    return reply


def resolve(world: World, container_id: str, name: str, rdtype: str = "A") -> list[str] | str:
    """The sorted answers, or the rcode's name when it is not NOERROR."""
    reply = ask(world.netns[container_id], name, rdtype)
    if reply.rcode() != dns.rcode.NOERROR:
        return dns.rcode.to_text(reply.rcode())
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def test_each_container_resolves_only_the_names_of_its_networks(world: World) -> None:
    # c1 (A): c2 by name, alias and short id at its A address; c3 does not exist for it.
    assert resolve(world, "c1", "two") == ["10.53.0.3"]
    assert resolve(world, "c1", "db.pye.test.") == ["10.53.0.3"]
    assert resolve(world, "c1", "C2") == ["10.53.0.3"]
    assert resolve(world, "c1", "one") == ["10.53.0.2"]
    assert resolve(world, "c1", "two", "AAAA") == []  # c2 has IPv6 only on B
    assert resolve(world, "c1", "three") == "NXDOMAIN"
    assert resolve(world, "c1", "c3.pye.test") == "NXDOMAIN"
    # c2 (A and B): both, and itself on both networks.
    assert resolve(world, "c2", "one") == ["10.53.0.2"]
    assert resolve(world, "c2", "three") == ["10.54.0.4"]
    assert resolve(world, "c2", "two") == ["10.53.0.3", "10.54.0.3"]
    assert resolve(world, "c2", "two", "AAAA") == ["fd54::3"]
    # c3 (B): c2 at its B address only, not its A alias; c1 does not exist for it.
    assert resolve(world, "c3", "two") == ["10.54.0.3"]
    assert resolve(world, "c3", "db") == "NXDOMAIN"
    assert resolve(world, "c3", "one") == "NXDOMAIN"
    # Reverse lookups are scoped too: c1 does not know 10.54.0.4, so it is forwarded.
    pointer = dns.reversename.from_address("10.54.0.4").to_text()
    assert resolve(world, "c2", pointer, "PTR") == ["three.pye.test."]
    assert resolve(world, "c1", pointer, "PTR") == "NXDOMAIN"
    assert ("udp", pointer) in world.upstream.seen
    assert not any(name.startswith("three") for _, name in world.upstream.seen)


def test_rename_disconnect_and_reconnect_apply_at_once(world: World) -> None:
    service = world.service
    service.set_endpoint(NET_A, "c2", ["renamed", "c2"], ["10.53.0.3"])  # docker rename
    assert resolve(world, "c1", "renamed") == ["10.53.0.3"]
    assert resolve(world, "c1", "two") == "NXDOMAIN"
    assert resolve(world, "c3", "two") == ["10.54.0.3"]  # B's record is its own
    service.remove_endpoint(NET_A, "c2")  # docker network disconnect A c2
    assert resolve(world, "c1", "renamed") == "NXDOMAIN"
    assert resolve(world, "c2", "one") == "NXDOMAIN"  # c2 no longer sees A either
    assert resolve(world, "c2", "three") == ["10.54.0.4"]
    assert service.networks_of("c2") == [NET_B]
    service.set_endpoint(NET_A, "c2", ["two", "c2"], ["10.53.0.7"])  # docker network connect
    assert resolve(world, "c1", "two") == ["10.53.0.7"]
    assert resolve(world, "c2", "one") == ["10.53.0.2"]
    assert service.networks_of("c2") == [NET_B, NET_A]
    service.forget("c3")  # docker rm c3
    assert resolve(world, "c2", "three") == "NXDOMAIN"
    assert service.networks_of("c3") == []
    assert resolve(world, "c3", "two") == "NXDOMAIN"  # its responder still runs, scope empty


def test_forwarding_over_udp_and_tcp(world: World) -> None:
    assert resolve(world, "c3", "www.example.test") == ["198.18.0.10"]
    reply = ask(world.netns["c1"], "www.example.test", tcp=True)
    assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["198.18.0.10"]
    assert ("udp", "www.example.test.") in world.upstream.seen
    assert ("tcp", "www.example.test.") in world.upstream.seen
    assert resolve(world, "c1", "missing.example.test") == "NXDOMAIN"  # the upstream's answer
    reply = ask(world.netns["c2"], "three", tcp=True)  # a local name over TCP
    assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["10.54.0.4"]
    stats = world.service.responders()["c3"].stats
    assert stats.forwarded >= 1


def test_attach_is_idempotent_and_detach_closes_the_port(world: World) -> None:
    first = world.service.responders()["c1"]
    world.attach("c1")
    assert world.service.responders()["c1"] is first
    assert len(_listening_in(world.netns["c1"])) == 2  # one UDP and one TCP socket, no more
    world.detach("c1")
    world.detach("c1")  # idempotent
    assert "c1" not in world.service.responders()
    assert _listening_in(world.netns["c1"]) == []
    # On loopback the port-unreachable ICMP is never rate-limited: refused at once.
    with pytest.raises(ConnectionRefusedError):
        ask(world.netns["c1"], "two")
    with pytest.raises(ConnectionRefusedError):
        ask(world.netns["c1"], "two", tcp=True)
    assert resolve(world, "c2", "one") == ["10.53.0.2"]  # the others are untouched
    world.attach("c1")
    assert resolve(world, "c1", "two") == ["10.53.0.3"]


def test_failed_attach_leaves_nothing_and_keeps_the_previous_responder(world: World) -> None:
    with pytest.raises(NetdError, match="does not exist"):
        world.attach("c4", f"/run/netns/pyedns-{os.getpid()}-missing")
    # A namespace where 127.0.0.11:53 is taken (over UDP): the TCP socket must not stay open.
    busy = f"pyedns-{os.getpid()}-busy"
    _add_netns(busy)
    try:
        with netns_socket(busy, socket.AF_INET, socket.SOCK_DGRAM) as squatter:
            squatter.bind((EMBEDDED_DNS, 53))
            with pytest.raises(NetdError, match="cannot listen"):
                world.attach("c4", f"/run/netns/{busy}")
            with pytest.raises(NetdError, match="cannot listen"):
                world.attach("c1", f"/run/netns/{busy}")  # c1 "restarted" into it
            assert len(_listening_in(busy)) == 1  # the squatter's socket only
        assert "c4" not in world.service.responders()
        assert resolve(world, "c1", "two") == ["10.53.0.3"]  # c1's responder was kept
    finally:
        subprocess.run(["ip", "netns", "del", busy], check=False, timeout=30)


def test_a_namespace_recreated_at_the_same_path_gets_a_new_responder(world: World) -> None:
    old = world.service.responders()["c1"]
    name = world.netns["c1"]
    _ip("netns", "del", name)  # the old responder's sockets keep the old namespace alive
    _add_netns(name)
    assert _listening_in(name) == []
    world.attach("c1")
    new = world.service.responders()["c1"]
    assert new is not old
    with pytest.raises(NetdError, match="not started"):
        _ = old.address  # closed once the new one listened
    assert len(_listening_in(name)) == 2
    assert resolve(world, "c1", "two") == ["10.53.0.3"]


def test_close_closes_every_responder(world: World) -> None:
    world.loop.run(world.service.close())
    assert world.service.responders() == {}
    for name in world.netns.values():
        assert _listening_in(name) == []
    assert world.service.networks_of("c2") == [NET_A, NET_B]  # records are not the responders'


# -- the benchmark, smoke run -------------------------------------------------------------------


def test_dns_bench_smoke_run(tmp_path: Path) -> None:
    require_root()
    require_tool("dnsmasq")
    out = tmp_path / "dns.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.dns",
            "--duration",
            "1",
            "--repeat",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BENCH_SMOKE_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["config"]["repeat"] == 1
    cells = {(s["scenario"], s["server"]): s for s in doc["samples"]}
    assert set(cells) == {
        (scenario, server)
        for scenario in ("local", "forwarded")
        for server in ("pyengine", "dnsmasq")
    }
    for sample in cells.values():
        assert sample["answered"] > 0 and sample["errors"] == 0, sample
        assert sample["qps"] > 0 and 0 < sample["p50_ms"] <= sample["p99_ms"]
    for scenario in ("local", "forwarded"):
        assert doc["summary"][scenario]["ratio"]["qps"] > 0
    assert "pyengine ÷ dnsmasq" in result.stdout
    assert doc["leftovers"] == []
