"""Hardening against crafted packets from a "LAN" host (Docker 28's defaults), on both firewall
backends and in both proxy modes.

A namespace ``pyehard-lan`` (198.18.7.2) is joined to the host (198.18.7.1 on ``pyehard-l0``)
by a veth. From it the test writes raw Ethernet frames, built with scapy, straight to the host's
veth MAC, and collects every packet that comes back to it:

(a) SYNs routed at a container's own address, to an unpublished port and to the container port
    behind a published one, get no answer ("direct routing"; dropped in raw prerouting);
(b) a port published on 127.0.0.1 is unreachable from the LAN, even by packets spoofed to
    127.0.0.1:port, and even with route_localnet=1 on the LAN link (moby#45610, moby#41872),
    which otherwise lets such packets be delivered locally;
(c) the published ports still answer: the same crafted SYN to a port published on every address
    gets its SYN-ACK (so the silence above is not an artefact of the probe), real connections
    succeed, and the loopback-bound port still serves the host itself.

Kernel objects: bridge ``pyehard0`` (10.186.42.1/24), nftables table ``inet pyehard`` or iptables
chains ``PYEHARD-*``, namespaces ``pyehard-<id>`` and ``pyehard-lan``, link ``pyehard-l0``.
Frames go out only on the LAN namespace's own interface, to the host end of the test's veth.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP, TCPerror, UDPerror
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from common.ports import parse_publish
from netd.controller import Endpoint, NetdConfig, NetworkController, PublishedPort
from netd.naming import host_veth_name, netns_name
from tests.conftest import require_root, require_tool
from tests.netns_helpers import (
    ExternalHost,
    create_external_host,
    delete_external_host,
    free_port_block,
    netns_socket,
    remove_firewall,
    remove_link,
    remove_netns,
    run,
    start_whoami_server,
    tcp_whoami,
    udp_whoami,
)

BRIDGE = "pyehard0"
TABLE = "pyehard"
GATEWAY = "10.186.42.1"
NETNS_PREFIX = "pyehard-"
LAN_NS = "pyehard-lan"
LAN_HOST_IF = "pyehard-l0"
LAN_IF = "pyehardlan"  # inside LAN_NS; no host interface has this name
HOST_IP = "198.18.7.1"
LAN_IP = "198.18.7.2"

BACKENDS = ("nftables", "iptables")
NETS = [(backend, proxy) for backend in BACKENDS for proxy in (True, False)]

ETH_P_ALL = 0x0003  # <linux/if_ether.h>
PACKET_OUTGOING = 4  # <linux/if_packet.h>: our own frames, looped back to the packet socket
PROBES = 3  # each crafted packet is sent this many times
LISTEN_WINDOW = 2.0  # seconds to collect answers; generous for a loaded 2-core machine


def net_id(param: tuple[str, bool]) -> str:
    backend, proxy = param
    return f"{backend}-{'proxy' if proxy else 'dnat'}"


@dataclass
class Lan:
    """The LAN host: its namespace and the MAC addresses a frame between it and the host uses."""

    ext: ExternalHost
    mac: str
    host_mac: str

    def probe(self, *packets: Packet, expect_answer: bool = False) -> list[list[Packet]]:
        """Send each IP packet ``PROBES`` times in a frame to the host's MAC, and return for each
        the packets that came back to its source port (ICMP errors quoting it included) within
        ``LISTEN_WINDOW``; with ``expect_answer``, stop once every packet has an answer."""
        sports = [_sport(p) for p in packets]
        assert len(set(sports)) == len(sports)
        frames = [bytes(Ether(src=self.mac, dst=self.host_mac) / p) for p in packets]
        answers: dict[int, list[Packet]] = {sport: [] for sport in sports}
        with netns_socket(
            self.ext.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
        ) as sock:
            sock.bind((self.ext.ifname, 0))
            start = time.monotonic()
            deadline = start + LISTEN_WINDOW
            rounds = 0
            while (now := time.monotonic()) < deadline:
                if expect_answer and all(answers.values()):
                    break
                due = start + rounds * LISTEN_WINDOW / (PROBES + 1)
                if rounds < PROBES and now >= due:
                    for frame in frames:
                        sock.send(frame)
                    rounds += 1
                    continue
                wake = due if rounds < PROBES else deadline
                sock.settimeout(max(0.01, min(wake, deadline) - now))
                try:
                    data, address = sock.recvfrom(65535)
                except TimeoutError:
                    continue
                if address[2] == PACKET_OUTGOING:
                    continue
                reply = Ether(data)
                if IP in reply and reply[IP].dst == self.ext.ip:
                    for sport in _ports_answered(reply):
                        if sport in answers:
                            answers[sport].append(reply)
        assert expect_answer or rounds == PROBES
        return [answers[sport] for sport in sports]


def _sport(packet: Packet) -> int:
    return packet[TCP].sport if TCP in packet else packet[UDP].sport


def _ports_answered(reply: Packet) -> list[int]:
    """The LAN ports ``reply`` answers: its destination port, or the source port of the packet
    an ICMP error quotes."""
    ports = [reply[layer].dport for layer in (TCP, UDP) if layer in reply]
    ports += [reply[layer].sport for layer in (TCPerror, UDPerror) if layer in reply]
    return ports


_used_sports: set[int] = set()


def _fresh_sport() -> int:
    while (sport := random.randint(20000, 40000)) in _used_sports:
        pass
    _used_sports.add(sport)
    return sport


def syn(dst: str, dport: int) -> Packet:
    return IP(src=LAN_IP, dst=dst) / TCP(sport=_fresh_sport(), dport=dport, flags="S")


def datagram(dst: str, dport: int) -> Packet:
    return IP(src=LAN_IP, dst=dst) / UDP(sport=_fresh_sport(), dport=dport) / b"spoofed"


def conntrack_entries(proto: str, dst: str, dport: int) -> list[str]:
    """Flows from the LAN host to ``dst:dport`` that conntrack confirmed: a packet dropped in
    raw prerouting (or by routing) never gets one, a delivered or forwarded one does."""
    result = subprocess.run(
        ["conntrack", "-L", "-p", proto, "-s", LAN_IP, "-d", dst, "--dport", str(dport)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def syn_acks(answers: list[Packet]) -> list[Packet]:
    return [p for p in answers if TCP in p and p[TCP].flags.S and p[TCP].flags.A]


def describe(answers: list[Packet]) -> list[str]:
    return [p.summary() for p in answers]


@dataclass
class Hardened:
    ctrl: NetworkController
    cfg: NetdConfig
    lan: Lan
    container_ids: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.cfg.firewall_backend

    @property
    def proxy(self) -> bool:
        return self.cfg.userland_proxy

    def endpoint(self) -> tuple[str, Endpoint]:
        cid = secrets.token_hex(32)
        self.container_ids.append(cid)
        return cid, self.ctrl.create_endpoint(cid)

    def publish(self, cid: str, ep: Endpoint, spec: str) -> PublishedPort:
        """The IPv4 port (with the proxy, a spec without address also gets an IPv6 twin)."""
        published, *_ipv6 = self.ctrl.publish(cid, ep, parse_publish(spec))
        return published

    def raw_drops(self) -> dict[str, int]:
        """Packets dropped so far by the raw-prerouting rules, read from the kernel's counters:
        "direct" (to container addresses) and "loopback" (to loopback-bound ports)."""
        counts = {"direct": 0, "loopback": 0}
        if self.backend == "nftables":
            for line in run("nft", "list", "chain", "inet", TABLE, "raw_prerouting").splitlines():
                found = re.search(r"counter packets (\d+) .* drop$", line.strip())
                if found:
                    kind = "loopback" if "127.0.0.0/8" in line else "direct"
                    counts[kind] += int(found.group(1))
        else:
            for line in run("iptables-save", "-c", "-t", "raw").splitlines():
                found = re.match(
                    rf"^\[(\d+):\d+\] -A {TABLE.upper()}-PREROUTING (.*) -j DROP$", line
                )
                if found:
                    kind = "loopback" if found.group(2).startswith("-d 127.") else "direct"
                    counts[kind] += int(found.group(1))
        return counts


def _lan_mac(netns: str, ifname: str) -> str:
    return json.loads(run("ip", "-n", netns, "-j", "link", "show", "dev", ifname))[0]["address"]


@pytest.fixture(params=NETS, ids=net_id)
def hard(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hardened]:
    require_root()
    for tool in ("ip", "nft", "iptables-restore", "iptables-save", "conntrack"):
        require_tool(tool)
    backend, proxy = request.param
    cfg = NetdConfig(
        data_root=tmp_path,
        bridge=BRIDGE,
        bridge_cidr=f"{GATEWAY}/24",
        table=TABLE,
        userland_proxy=proxy,
        firewall_backend=backend,
        netns_prefix=NETNS_PREFIX,
    )
    ctrl = NetworkController(cfg)
    ext = create_external_host(LAN_NS, LAN_HOST_IF, f"{HOST_IP}/30", f"{LAN_IP}/30", LAN_IF)
    harness: Hardened | None = None
    try:
        # The worst case: a host where loopback destinations may be routed in from the LAN
        # link (kube-proxy sets route_localnet=1 on every interface).
        Path(f"/proc/sys/net/ipv4/conf/{LAN_HOST_IF}/route_localnet").write_text("1\n")
        host_mac = Path(f"/sys/class/net/{LAN_HOST_IF}/address").read_text().strip()
        harness = Hardened(ctrl, cfg, Lan(ext, _lan_mac(LAN_NS, LAN_IF), host_mac))
        ctrl.setup()
        yield harness
    finally:
        try:
            ctrl.teardown()
        finally:
            for cid in harness.container_ids if harness else []:
                remove_link(host_veth_name(cid))
                remove_netns(netns_name(NETNS_PREFIX, cid))
            for name in BACKENDS:
                remove_firewall(name, TABLE)
            remove_link(BRIDGE)
            delete_external_host(ext)


# -- (a) direct routing ------------------------------------------------------------------------


def test_syns_routed_to_a_container_address_get_no_answer(hard: Hardened) -> None:
    cid, ep = hard.endpoint()
    port = free_port_block()
    hard.publish(cid, ep, f"{port}:80")
    with (
        start_whoami_server(ep.netns_name, "tcp", port=80),
        start_whoami_server(ep.netns_name, "tcp", port=81),
    ):
        before = hard.raw_drops()
        # 81 listens but is not published; 80 is the container port behind host port `port`.
        answers = hard.lan.probe(syn(ep.ip, 81), syn(ep.ip, 80))
        assert answers == [[], []], [describe(a) for a in answers]
        # Dropped in raw prerouting, before conntrack or routing saw them.
        assert hard.raw_drops()["direct"] - before["direct"] >= 2 * PROBES
        assert conntrack_entries("tcp", ep.ip, 80) == conntrack_entries("tcp", ep.ip, 81) == []

        # (c) The published port answers the very same kind of probe, and real clients.
        [answers] = hard.lan.probe(syn(HOST_IP, port), expect_answer=True)
        acks = syn_acks(answers)
        assert acks, describe(answers)
        assert all((p[IP].src, p[TCP].sport) == (HOST_IP, port) for p in acks)
        assert tcp_whoami(LAN_NS, HOST_IP, port) == LAN_IP


def test_udp_routed_to_a_container_address_gets_no_answer(hard: Hardened) -> None:
    cid, ep = hard.endpoint()
    port = free_port_block()
    hard.publish(cid, ep, f"{port}:53/udp")
    with start_whoami_server(ep.netns_name, "udp", port=53):
        before = hard.raw_drops()
        [answers] = hard.lan.probe(datagram(ep.ip, 53))
        assert answers == [], describe(answers)
        assert hard.raw_drops()["direct"] - before["direct"] >= PROBES
        assert conntrack_entries("udp", ep.ip, 53) == []
        # (c) Through the published port it answers.
        assert udp_whoami(LAN_NS, HOST_IP, port) == LAN_IP


# -- (b) ports published on 127.0.0.1 ------------------------------------------------------------


def test_loopback_bound_tcp_port_is_unreachable_from_the_lan(hard: Hardened) -> None:
    cid, ep = hard.endpoint()
    port = free_port_block()
    published = hard.publish(cid, ep, f"127.0.0.1:{port}:80")
    assert published.sock is not None
    if hard.proxy:
        published.sock.listen(8)  # what pyengine-proxy does with the handed-over socket
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        before = hard.raw_drops()
        spoofed, to_lan_address = hard.lan.probe(syn("127.0.0.1", port), syn(HOST_IP, port))
        assert spoofed == [], describe(spoofed)
        # Without the drop the SYN would be delivered (a SYN_RECV flow) even though the
        # SYN-ACK, sourced from 127.0.0.1, cannot leave through the LAN link.
        assert conntrack_entries("tcp", "127.0.0.1", port) == []
        assert hard.raw_drops()["loopback"] - before["loopback"] >= PROBES
        # The host's LAN address is not bound: at most a reset, never a handshake.
        assert syn_acks(to_lan_address) == [], describe(to_lan_address)

        # (c) The host itself still reaches it on loopback.
        if hard.proxy:
            with netns_socket(None) as client:
                client.connect(("127.0.0.1", port))
                conn, _peer = published.sock.accept()
                conn.close()
        else:
            assert tcp_whoami(None, "127.0.0.1", port) == GATEWAY


def test_loopback_bound_udp_port_is_unreachable_from_the_lan(hard: Hardened) -> None:
    cid, ep = hard.endpoint()
    port = free_port_block()
    published = hard.publish(cid, ep, f"127.0.0.1:{port}:53/udp")
    assert published.sock is not None
    with start_whoami_server(ep.netns_name, "udp", port=53):
        before = hard.raw_drops()
        [answers] = hard.lan.probe(datagram("127.0.0.1", port))
        assert answers == [], describe(answers)
        assert conntrack_entries("udp", "127.0.0.1", port) == []
        assert hard.raw_drops()["loopback"] - before["loopback"] >= PROBES
        if hard.proxy:
            # The proxy's socket (drop filter detached) got none of the spoofed datagrams...
            published.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                published.sock.recv(64)
            # ...and does get the host's own.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"from-host", ("127.0.0.1", port))
                published.sock.settimeout(5)
                assert published.sock.recv(64) == b"from-host"
        else:
            # (c) DNAT mode serves the host's loopback from the container.
            assert udp_whoami(None, "127.0.0.1", port) == GATEWAY
