"""Network hardening against hostile containers (issue 13), on a real pyengined in kernel-DNAT
mode, on both firewall backends, with real packets:

* a container on an ``--internal`` network gets no answer from the upstream resolvers for
  names outside its networks, and the upstream sees no query (CVE-2024-29018), while container
  names still resolve there and a container on a normal network gets the upstream's answer;
* ``route_localnet=1`` on the bridge does not let a container reach a service the host runs on
  127.0.0.1 by routing a crafted packet through its gateway (CVE-2020-8558), while a port
  published on 127.0.0.1 still answers the host;
* a container flooding the embedded DNS (UDP queries for names a silent upstream never answers,
  and TCP connections held open) costs the daemon a bounded number of descriptors, and another
  container still resolves names meanwhile; the daemon raised its soft RLIMIT_NOFILE (the test
  starts it with a soft limit of 1,024);
* when pyengined turns ``net.ipv4.ip_forward`` on itself, two namespace "hosts" routed through
  this host stop reaching each other (containers still reach an "outside" host through
  masquerade), also after a restart that finds forwarding on, and reach each other again with
  ``--ip-forward-no-drop``; the iptables FORWARD policy is back as it was once the daemon
  stops.

Kernel objects: bridges ``pyes4a`` (nftables, 10.174.0.1/24) and ``pyes4b`` (iptables,
10.175.0.1/24), user networks in 10.176.0.0/16, namespaces and links ``pyes4-*``, the fake
upstream resolver on 127.0.0.174:53. Traffic goes only to loopback, to the bridges the daemons
create and to the namespaces the test creates. The forwarding test sets ``ip_forward`` to 0 just
before each daemon starts and restores the value it found in any case.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
from dnslib import DNSRecord
from pyroute2 import IPRoute, netns
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    require_tool,
    start_daemon,
    stop_daemon,
)
from tests.dns_helpers import FakeUpstream
from tests.netns_helpers import (
    IO_TIMEOUT,
    netns_socket,
    remove_link,
    remove_netns,
    run,
    start_whoami_server,
)

BACKENDS = {"nftables": ("pyes4a", "10.174.0.1/24"), "iptables": ("pyes4b", "10.175.0.1/24")}
UPSTREAM = "127.0.0.174"
OUTSIDE_ANSWER = "198.18.74.74"  # the fake upstream's answer; never contacted
SLOW_PREFIX = "pyes4slow"  # names the fake upstream never answers
DAEMON_SOFT_NOFILE = 1024  # the soft limit the daemon is started with
ETH_P_ALL = 0x0003  # <linux/if_ether.h>
PACKET_OUTGOING = 4  # <linux/if_packet.h>
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

_subnets = iter(range(1, 100))


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream(UPSTREAM, OUTSIDE_ANSWER, SLOW_PREFIX)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE lowered to ``limit`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def cleanup(d: Daemon) -> None:
    for cid in d.cli("ps", "-a", "-q").stdout.split():
        d.cli("rm", "-f", cid)
    for net in d.cli("network", "ls", "-q", "--filter", "type=custom").stdout.split():
        d.cli("network", "rm", net)
    stop_daemon(d)


@pytest.fixture(scope="module", params=list(BACKENDS))
def d(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    busybox_archive: Path,
    upstream: FakeUpstream,
) -> Iterator[Daemon]:
    backend: str = request.param
    name, bip = BACKENDS[backend]
    tmp = tmp_path_factory.mktemp(name)
    with soft_nofile(DAEMON_SOFT_NOFILE):
        daemon = start_daemon(
            tmp, name, bip, False, "--firewall-backend", backend, "--dns", UPSTREAM
        )
    try:
        daemon.cli("load", "-i", str(busybox_archive), check=True)
        yield daemon
    finally:
        cleanup(daemon)
    assert_nothing_left(daemon)


def inspect(d: Daemon, ref: str, kind: str = "container") -> dict:
    return json.loads(d.cli("inspect", "--type", kind, ref, check=True).stdout)[0]


def netns_of(d: Daemon, container: str) -> str:
    """The name under /run/netns of the container's network namespace."""
    key = inspect(d, container)["NetworkSettings"]["SandboxKey"]
    assert key.startswith("/run/netns/"), key
    return os.path.basename(key)


def new_network(d: Daemon, name: str, *options: str) -> None:
    subnet = f"10.176.{next(_subnets)}.0/24"
    d.cli("network", "create", "--subnet", subnet, *options, name, check=True)


def lookup(d: Daemon, network: str, name: str) -> str:
    """busybox nslookup's output for ``name`` from a new container on ``network``."""
    result = d.cli("run", "--rm", "--network", network, "busybox", "nslookup", "-type=a", name)
    return result.stdout + result.stderr


def dns_query(netns_name: str, name: str, timeout: float = IO_TIMEOUT) -> DNSRecord:
    """One A query to 127.0.0.11:53 from inside ``netns_name``."""
    with netns_socket(netns_name, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(DNSRecord.question(name, "A").pack(), ("127.0.0.11", 53))
        return DNSRecord.parse(sock.recvfrom(4096)[0])


# ---- internal networks: no upstream forwarding ---------------------------------------------


def test_internal_network_gets_no_upstream_forwarding(d: Daemon, upstream: FakeUpstream) -> None:
    tag = f"{d.bridge}-{random.randrange(1 << 30)}"
    internal, normal = f"{tag}-int", f"{tag}-ext"
    new_network(d, internal, "--internal")
    new_network(d, normal)
    try:
        d.cli("run", "-d", "--name", f"{tag}-db", "--network", internal, "busybox", "sleep", "60")
        leaked = f"{tag}-int.example.test"
        out = lookup(d, internal, leaked)
        assert OUTSIDE_ANSWER not in out, out
        assert f"{leaked}." not in upstream.queries, "the upstream saw the internal query"
        # Names of the internal network's own containers still resolve there.
        ip = inspect(d, f"{tag}-db")["NetworkSettings"]["Networks"][internal]["IPAddress"]
        assert ip in lookup(d, internal, f"{tag}-db")
        # The control: the same kind of name from a normal network reaches the upstream.
        forwarded = f"{tag}-ext.example.test"
        out = lookup(d, normal, forwarded)
        assert OUTSIDE_ANSWER in out, out
        assert f"{forwarded}." in upstream.queries
    finally:
        d.cli("rm", "-f", f"{tag}-db")
        d.cli("network", "rm", internal)
        d.cli("network", "rm", normal)


# ---- route_localnet: the host's loopback stays the host's ----------------------------------


def link_mac(netns_name: str | None, ifname: str) -> str:
    with IPRoute(netns=netns_name) if netns_name else IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")


def syn_answers(netns_name: str, src: str, gw_mac: str, dst: str, dport: int) -> list[TCP]:
    """Send a crafted SYN from the container's eth0 to ``dst``:``dport`` through its gateway
    (the bridge's MAC), three times over one second, and return the TCP segments that come
    back to its source port within two seconds."""
    sport = random.randint(20000, 30000)
    frame = bytes(
        Ether(src=link_mac(netns_name, "eth0"), dst=gw_mac)
        / IP(src=src, dst=dst)
        / TCP(sport=sport, dport=dport, flags="S", seq=random.randrange(1 << 31))
    )
    answers: list[TCP] = []
    with netns_socket(
        netns_name, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
    ) as sock:
        sock.bind(("eth0", 0))
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) < start + 2.0:
            if sent < 3 and now >= start + sent * 0.4:
                sock.send(frame)
                sent += 1
            sock.settimeout(0.1)
            try:
                data, address = sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] == PACKET_OUTGOING:
                continue
            packet = Ether(data)
            if TCP in packet and packet[TCP].dport == sport:
                answers.append(packet[TCP])
    return answers


def test_container_cannot_reach_host_loopback_through_its_gateway(d: Daemon) -> None:
    gateway = d.gateway
    assert Path(f"/proc/sys/net/ipv4/conf/{d.bridge}/route_localnet").read_text().strip() == "1", (
        "kernel-DNAT mode sets route_localnet on the bridge"
    )
    published = free_port()
    name = f"{d.bridge}-lo-{random.randrange(1 << 30)}"
    d.cli(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{published}:80", "busybox",
        "httpd", "-f", "-p", "80", "-h", "/etc",
        check=True,
    )  # fmt: skip
    try:
        ns = netns_of(d, name)
        ip = inspect(d, name)["NetworkSettings"]["IPAddress"]
        gw_mac = link_mac(None, d.bridge)
        with (
            start_whoami_server(None, "tcp", "127.0.0.1") as loopback_service,
            start_whoami_server(None, "tcp", gateway) as gateway_service,
        ):
            # The probe works: the same crafted SYN to the gateway's own address is answered.
            control = syn_answers(ns, ip, gw_mac, gateway, gateway_service.port)
            assert any(seg.flags.S and seg.flags.A for seg in control), control
            answers = syn_answers(ns, ip, gw_mac, "127.0.0.1", loopback_service.port)
            assert answers == [], [seg.summary() for seg in answers]
        # A port published on 127.0.0.1 still serves the host itself.
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", published), timeout=2) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    assert conn.recv(64).startswith(b"HTTP/1."), "no HTTP reply"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        d.cli("rm", "-f", name)


# ---- the embedded DNS under a flood ---------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limits(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    assert found, text
    return int(found.group(1)), int(found.group(2))


def test_dns_flood_is_bounded_and_others_still_resolve(d: Daemon) -> None:
    pid = d.process.pid
    soft, hard = nofile_limits(pid)
    assert soft == hard > DAEMON_SOFT_NOFILE, (soft, hard)
    tag = f"{d.bridge}-{random.randrange(1 << 30)}"
    net = f"{tag}-net"
    new_network(d, net)
    flooder, victim = f"{tag}-flood", f"{tag}-victim"
    try:
        for name in (flooder, victim):
            d.cli("run", "-d", "--name", name, "--network", net, "busybox", "sleep", "120",
                  check=True)  # fmt: skip
        flood_ns, victim_ns = netns_of(d, flooder), netns_of(d, victim)
        flooder_ip = inspect(d, flooder)["NetworkSettings"]["Networks"][net]["IPAddress"]
        assert [str(rr.rdata) for rr in dns_query(victim_ns, flooder).rr] == [flooder_ip]
        baseline = fd_count(pid)
        peak = baseline
        tcp_clients: list[socket.socket] = []
        with netns_socket(flood_ns, socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            start = time.monotonic()
            sent = 0
            while time.monotonic() < start + 2.0 and sent < 4000:
                query = DNSRecord.question(f"{SLOW_PREFIX}{sent}.example.test", "A").pack()
                with contextlib.suppress(BlockingIOError):
                    udp.sendto(query, ("127.0.0.11", 53))
                sent += 1
                if sent % 10 == 0 and len(tcp_clients) < 300:
                    conn = netns_socket(flood_ns, socket.AF_INET, socket.SOCK_STREAM)
                    conn.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        conn.connect(("127.0.0.11", 53))
                    tcp_clients.append(conn)
                if sent % 50 == 0:
                    peak = max(peak, fd_count(pid))
                    time.sleep(0.005)
            # While the flood's forwards wait for the silent upstream: another container's
            # queries are answered at once.
            answer = dns_query(victim_ns, flooder, timeout=2.0)
            assert [str(rr.rdata) for rr in answer.rr] == [flooder_ip]
            for _ in range(10):
                peak = max(peak, fd_count(pid))
                time.sleep(0.05)
        for conn in tcp_clients:
            conn.close()
        # Per container: at most 128 forwards and 16 TCP clients (netd/dns/server.py), and the
        # few descriptors the daemon opens meanwhile for anything else.
        assert peak - baseline <= 128 + 16 + 40, (baseline, peak, sent, len(tcp_clients))
    finally:
        for name in (flooder, victim):
            d.cli("rm", "-f", name)
        d.cli("network", "rm", net)


# ---- forwarding between the host's other links ----------------------------------------------


@dataclass
class Peer:
    """A namespace "host" on a link of its own to this host, routed through it."""

    netns: str
    host_if: str
    ip: str


def make_peer(name: str, host_cidr: str, peer_cidr: str) -> Peer:
    host_if, peer_if = IPv4Interface(host_cidr), IPv4Interface(peer_cidr)
    remove_link(name)
    remove_netns(name)
    netns.create(name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            index = ipr.link_lookup(ifname=name)[0]
            ipr.addr(
                "add", index=index, address=str(host_if.ip), prefixlen=host_if.network.prefixlen
            )
            ipr.link("set", index=index, state="up")
        with IPRoute(netns=name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=str(peer_if.ip), prefixlen=peer_if.network.prefixlen)
            ns.link("set", index=eth0, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=str(host_if.ip))
    except BaseException:
        remove_link(name)
        remove_netns(name)
        raise
    return Peer(name, name, str(peer_if.ip))


def reaches(src: Peer, dst_ip: str, port: int) -> bool:
    with contextlib.suppress(OSError):
        with netns_socket(src.netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.5)
            sock.connect((dst_ip, port))
            return True
    return False


def start_with_forwarding_off(tmp: Path, name: str, bip: str, extra: list[str]) -> Daemon:
    """A daemon started while ip_forward is 0, so that it turns forwarding on itself. Another
    daemon on this host (another test's) may turn it on in between: then this one found it on,
    recorded nothing, and is started again."""
    for attempt in range(5):
        (tmp / str(attempt)).mkdir(parents=True)
        IP_FORWARD.write_text("0\n")
        d = start_daemon(tmp / str(attempt), name, bip, False, *extra)
        if (d.data_root / "network" / "forwarding.json").exists():
            return d
        cleanup(d)
        assert_nothing_left(d)
    raise AssertionError("ip_forward was turned on by someone else at every attempt")


def outside_sees(d: Daemon, ip: str, port: int) -> str:
    """The address the whoami server at ``ip``:``port`` sees a container connect from (two
    tries: a first SYN can be lost while the host's other tests change their own rules)."""
    out = None
    for _ in range(2):
        out = d.cli("run", "--rm", "busybox", "nc", "-w", "3", ip, str(port))
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    assert out is not None
    return out.stdout + out.stderr


def forward_policy() -> str:
    return run("iptables", "-S", "FORWARD").splitlines()[0]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_forwarding_turned_on_by_pyengined_drops_other_traffic(
    backend: str, tmp_path: Path, busybox_archive: Path
) -> None:
    require_tool("iptables")
    name, bip = BACKENDS[backend]
    saved = IP_FORWARD.read_text().strip()
    policy_before = forward_policy()
    peers = [
        ("pyes4-h1", "10.176.201.1/24", "10.176.201.2/24"),
        ("pyes4-h2", "10.176.202.1/24", "10.176.202.2/24"),
        ("pyes4-out", "10.176.203.1/24", "10.176.203.2/24"),
    ]
    made: list[Peer] = []
    try:
        for peer in peers:
            made.append(make_peer(*peer))
        h1, h2, outside = made
        with (
            start_whoami_server(h2.netns, "tcp", h2.ip) as h2_service,
            start_whoami_server(outside.netns, "tcp", outside.ip) as outside_service,
        ):
            for no_drop in (False, True):
                tmp = tmp_path / f"no-drop-{no_drop}"
                extra = ["--firewall-backend", backend, "--dns", UPSTREAM]
                if no_drop:
                    extra.append("--ip-forward-no-drop")
                d = start_with_forwarding_off(tmp, name, bip, extra)
                try:
                    assert IP_FORWARD.read_text().strip() == "1"
                    assert reaches(h1, h2.ip, h2_service.port) is no_drop
                    if backend == "iptables":
                        expected = policy_before if no_drop else "-P FORWARD DROP"
                        assert forward_policy() == expected
                    if not no_drop:
                        d.cli("load", "-i", str(busybox_archive), check=True)
                        # Masqueraded: the outside host sees this host's address on its link.
                        assert outside_sees(d, outside.ip, outside_service.port) == "10.176.203.1"
                    if not no_drop and backend == "nftables":
                        # Another pyengine daemon's bridge is in the same interface group: the
                        # drop leaves its containers' traffic to its own table.
                        (tmp / "other").mkdir()
                        other = start_daemon(
                            tmp / "other", "pyes4o", "10.177.0.1/24", False, "--dns", UPSTREAM
                        )
                        try:
                            other.cli("load", "-i", str(busybox_archive), check=True)
                            seen = outside_sees(other, outside.ip, outside_service.port)
                            assert seen == "10.176.203.1"
                        finally:
                            cleanup(other)
                        assert_nothing_left(other)
                finally:
                    cleanup(d)
                assert_nothing_left(d)
                assert forward_policy() == policy_before, "the FORWARD policy was not restored"
                if not no_drop:
                    # ip_forward stays on after the daemon stops; started again on the same
                    # data root, the daemon remembers that it turned it on, and drops again.
                    log_dir = d.log_path.parent
                    d = start_daemon(log_dir, name, bip, False, *extra)
                    try:
                        assert not reaches(h1, h2.ip, h2_service.port)
                    finally:
                        cleanup(d)
                    assert_nothing_left(d)
    finally:
        IP_FORWARD.write_text(saved + "\n")
        for peer in made:
            remove_link(peer.host_if)
            remove_netns(peer.netns)
        for peer_name, _host, _peer in peers:
            remove_link(peer_name)
            remove_netns(peer_name)
    assert forward_policy() == policy_before
