"""IPv6 and dual-stack publishing, Docker 28's semantics for a container with an IPv4 address
only: a port without a host address is published on 0.0.0.0 and [::] (the same port on both)
with the userland proxy, on 0.0.0.0 alone without it; an explicit IPv6 host address needs the
proxy; IPv6 ports never reach the firewall.

Kernel objects: bridges ``pyev6t0`` (10.83.0.1/24) and ``pyev6t1`` (10.83.1.0/24, a
user-defined network), nftables table ``inet pyev6t`` or iptables chains ``PYEV6T-*``,
namespaces ``pyev6-<id>`` and ``pyev6-noip6-<hex>``; daemons on ``pyev6p0`` (10.85.0.1/24,
userland proxy) and ``pyev6d0`` (10.84.0.1/24, kernel DNAT). Traffic goes to loopback and to
the test's own namespaces only.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.output import format_ports, join_host_port
from common.ports import parse_publish
from netd.control.ports import publish_addresses
from netd.controller import (
    Endpoint,
    NetdConfig,
    NetdError,
    NetworkController,
    PublishedPort,
)
from netd.naming import host_veth_name, netns_name
from netd.network import Network
from netd.portmap import host_addresses_overlap
from netd.state import NetdState, firewall_mappings
from proxy.supervisor import ProxySpec, ProxySupervisor
from tests.conftest import (
    Daemon,
    assert_nothing_left,
    image_archive,
    require_root,
    require_tool,
    start_daemon,
)
from tests.conftest import stop_daemon as stop_test_daemon
from tests.netns_helpers import (
    free_port_block,
    kernel_mappings,
    netns_socket,
    remove_firewall,
    remove_link,
    remove_netns,
    run,
    start_whoami_server,
)

REPO = Path(__file__).resolve().parent.parent
BRIDGE = "pyev6t0"
GATEWAY = "10.83.0.1"
TABLE = "pyev6t"
NETNS_PREFIX = "pyev6-"
USER_BRIDGE = "pyev6t1"
USER_SUBNET = "10.83.1.0/24"
IO_TIMEOUT = 10.0

# -- pure logic -------------------------------------------------------------------------------


OVERLAPS = [
    ("0.0.0.0", "0.0.0.0", True),
    ("0.0.0.0", "127.0.0.1", True),
    ("127.0.0.1", "127.0.0.2", False),
    ("::", "::", True),
    ("::", "::1", True),
    ("::1", "::", True),
    ("::1", "fd00::1", False),
    ("0.0.0.0", "::", False),
    ("::", "127.0.0.1", False),
    ("::1", "0.0.0.0", False),
]


@pytest.mark.parametrize(("a", "b", "clash"), OVERLAPS)
def test_host_addresses_clash_within_one_family_only(a: str, b: str, clash: bool) -> None:
    assert host_addresses_overlap(a, b) is clash
    assert host_addresses_overlap(b, a) is clash


ADDRESSES = [
    # (host ip, network's host_binding_ipv4, userland proxy) -> addresses published on
    ("", "0.0.0.0", True, ["0.0.0.0", "::"]),
    ("", "0.0.0.0", False, ["0.0.0.0"]),
    ("", "127.0.0.1", True, ["127.0.0.1"]),
    ("", "127.0.0.1", False, ["127.0.0.1"]),
    ("0.0.0.0", "0.0.0.0", True, ["0.0.0.0"]),
    ("127.0.0.1", "0.0.0.0", True, ["127.0.0.1"]),
    ("::", "0.0.0.0", True, ["::"]),
    ("::1", "127.0.0.1", True, ["::1"]),
    ("0:0::1", "0.0.0.0", True, ["::1"]),
]


@pytest.mark.parametrize(("host_ip", "binding", "proxy", "expected"), ADDRESSES)
def test_publish_addresses_follow_docker_28(
    host_ip: str, binding: str, proxy: bool, expected: list[str]
) -> None:
    assert publish_addresses(host_ip, binding, proxy) == expected


@pytest.mark.parametrize("host_ip", ["::1", "::", "fd00::5"])
def test_ipv6_address_without_proxy_is_refused(host_ip: str) -> None:
    with pytest.raises(NetdError) as info:
        publish_addresses(host_ip, "0.0.0.0", False)
    assert str(info.value) == (
        f'cannot publish on IPv6 address "{host_ip}": the container has no IPv6 address '
        "and the userland proxy is disabled"
    )


def test_ipv4_mapped_and_invalid_addresses_are_refused() -> None:
    with pytest.raises(NetdError, match='invalid host IP "::ffff:127.0.0.1": use the IPv4'):
        publish_addresses("::ffff:127.0.0.1", "0.0.0.0", True)
    with pytest.raises(NetdError, match='invalid host IP "nope"'):
        publish_addresses("nope", "0.0.0.0", True)


def test_ipv6_ports_are_not_given_to_the_firewall() -> None:
    ports = [
        PublishedPort("tcp", "0.0.0.0", 8080, "10.83.0.2", 80),
        PublishedPort("tcp", "::", 8080, "10.83.0.2", 80),
        PublishedPort("udp", "::1", 53, "10.83.0.2", 53),
        PublishedPort("udp", "127.0.0.1", 53, "10.83.0.2", 53),
    ]
    assert [p.in_firewall for p in ports] == [True, False, False, True]
    assert firewall_mappings(ports) == [ports[0].mapping(), ports[3].mapping()]


def test_state_round_trips_ipv6_ports(tmp_path: Path) -> None:
    default = Network(
        id="a" * 64, name="bridge", bridge=BRIDGE, subnet="10.83.0.0/24", gateway=GATEWAY,
        default=True,
    )  # fmt: skip
    state = NetdState()
    state.add_network(default)
    cid = "c" * 64
    state.ports[cid] = [
        PublishedPort("tcp", "0.0.0.0", 8080, "10.83.0.2", 80, default.id),
        PublishedPort("tcp", "::", 8080, "10.83.0.2", 80, default.id),
        PublishedPort("udp", "::1", 5353, "10.83.0.2", 53, default.id),
    ]
    path = tmp_path / "endpoints.json"
    state.save(path)
    saved = json.loads(path.read_text())["ports"][cid]
    assert [(p["host_ip"], p["host_port"]) for p in saved] == [
        ("0.0.0.0", 8080),
        ("::", 8080),
        ("::1", 5353),
    ]
    loaded = NetdState.load(path, default, tmp_path / "ipam.json")
    assert loaded.ports == state.ports


def test_cli_shows_ipv6_bindings_as_docker_does() -> None:
    assert join_host_port("0.0.0.0", 8080) == "0.0.0.0:8080"
    assert join_host_port("::", "8080") == "[::]:8080"
    ports = [
        {"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"},
        {"IP": "::", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"},
        {"PrivatePort": 443, "Type": "tcp"},
    ]
    assert format_ports(ports) == "0.0.0.0:8080->80/tcp, [::]:8080->80/tcp, 443/tcp"


# -- a controller on a test bridge -------------------------------------------------------------


@dataclass
class V6Net:
    ctrl: NetworkController
    cfg: NetdConfig
    container_ids: list[str] = field(default_factory=list)

    @property
    def proxy(self) -> bool:
        return self.cfg.userland_proxy

    @property
    def backend(self) -> str:
        return self.cfg.firewall_backend

    def endpoint(self) -> tuple[str, Endpoint]:
        cid = secrets.token_hex(32)
        self.container_ids.append(cid)
        return cid, self.ctrl.create_endpoint(cid)

    def publish(self, cid: str, ep: Endpoint, *specs: str) -> list[PublishedPort]:
        return self.ctrl.publish(cid, ep, [b for spec in specs for b in parse_publish(spec)])

    def mappings(self) -> list[tuple[str, str, int, str, int]]:
        return kernel_mappings(self.backend, TABLE)


def _config(data_root: Path, backend: str, proxy: bool) -> NetdConfig:
    return NetdConfig(
        data_root=data_root,
        bridge=BRIDGE,
        bridge_cidr=f"{GATEWAY}/24",
        table=TABLE,
        userland_proxy=proxy,
        firewall_backend=backend,
        netns_prefix=NETNS_PREFIX,
    )


BACKENDS = ("nftables", "iptables")
NETS = [(backend, proxy) for backend in BACKENDS for proxy in (True, False)]


def net_id(param: tuple[str, bool]) -> str:
    backend, proxy = param
    return f"{backend}-{'proxy' if proxy else 'dnat'}"


def _privileged() -> None:
    require_root()
    for tool in ("ip", "nft", "iptables-restore", "iptables-save"):
        require_tool(tool)


@pytest.fixture(params=NETS, ids=net_id)
def v6net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[V6Net]:
    _privileged()
    backend, proxy = request.param
    cfg = _config(tmp_path, backend, proxy)
    ctrl = NetworkController(cfg)
    harness = V6Net(ctrl, cfg)
    try:
        ctrl.setup()
        yield harness
    finally:
        try:
            ctrl.teardown(remove_networks=True)
        finally:
            for cid in harness.container_ids:
                for index in range(2):
                    remove_link(host_veth_name(cid, index))
                remove_netns(netns_name(NETNS_PREFIX, cid))
            for name in BACKENDS:
                remove_firewall(name, TABLE)
            remove_link(BRIDGE)
            remove_link(USER_BRIDGE)


PROXY_ONLY = pytest.mark.parametrize("v6net", [n for n in NETS if n[1]], indirect=True, ids=net_id)
DNAT_ONLY = pytest.mark.parametrize(
    "v6net", [n for n in NETS if not n[1]], indirect=True, ids=net_id
)


def _can_bind(family: socket.AddressFamily, ip: str, port: int, kind: int) -> bool:
    with socket.socket(family, kind) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((ip, port))
        except OSError:
            return False
        return True


def port_free(port: int, proto: str = "tcp") -> dict[str, bool]:
    """Whether a plain bind (no SO_REUSEADDR) of ``port`` succeeds on 0.0.0.0 and on ::."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    return {
        "0.0.0.0": _can_bind(socket.AF_INET, "0.0.0.0", port, kind),
        "::": _can_bind(socket.AF_INET6, "::", port, kind),
    }


def free_dual_port(count: int = 1) -> int:
    """First of ``count`` consecutive ports free for TCP and UDP on both families."""
    for _ in range(100):
        first = free_port_block(count)
        ports = range(first, first + count)
        if all(all(port_free(p, proto).values()) for p in ports for proto in ("tcp", "udp")):
            return first
    raise RuntimeError("no port free on both families")


def v6_only(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def connect_refused(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(IO_TIMEOUT)
        try:
            client.connect((ip, port))
        except ConnectionRefusedError:
            return True
        return False


# -- bindings and sockets per family ----------------------------------------------------------


def test_port_without_host_address(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    port = free_dual_port()
    published = v6net.publish(cid, ep, f"{port}:80")
    got = [(p.proto, p.host_ip, p.host_port, p.container_ip, p.container_port) for p in published]
    v4 = ("tcp", "0.0.0.0", port, ep.ip, 80)
    # Without the proxy nothing could carry [::] to an IPv4-only container.
    assert got == ([v4, ("tcp", "::", port, ep.ip, 80)] if v6net.proxy else [v4])
    assert v6net.mappings() == [("0.0.0.0", "tcp", port, ep.ip, 80)]
    assert port_free(port) == {"0.0.0.0": False, "::": not v6net.proxy}
    if v6net.proxy:
        v6 = published[1]
        assert v6.sock is not None and v6.sock.family == socket.AF_INET6 and v6_only(v6.sock)
        assert v6.sock.getsockname()[:2] == ("::", port)
        # Reserved, not listening: refused until the proxy listens on the very same socket.
        assert connect_refused("::1", port)
        v6.sock.listen(1)
        with netns_socket(None, socket.AF_INET6) as client:
            client.connect(("::1", port))
            conn, _peer = v6.sock.accept()
            conn.close()
        # V6ONLY: IPv4 loopback still reaches the IPv4 socket, which does not listen.
        assert connect_refused("127.0.0.1", port)
    else:
        assert connect_refused("::1", port)  # nothing of ours on IPv6


def test_unpublish_releases_both_families(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    port = free_dual_port()
    ports = v6net.publish(cid, ep, f"{port}:80", f"{port}:53/udp")
    assert len(ports) == (4 if v6net.proxy else 2)
    v6net.ctrl.unpublish(cid)
    assert all(p.sock is None for p in ports)
    assert v6net.mappings() == []
    assert port_free(port, "tcp") == {"0.0.0.0": True, "::": True}
    assert port_free(port, "udp") == {"0.0.0.0": True, "::": True}


@PROXY_ONLY
def test_ephemeral_port_is_the_same_on_both_families(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    tcp4, tcp6, udp4, udp6 = v6net.publish(cid, ep, "80", "53/udp")
    assert (tcp4.host_ip, tcp6.host_ip, udp4.host_ip, udp6.host_ip) == ("0.0.0.0", "::") * 2
    assert tcp4.host_port == tcp6.host_port and low <= tcp4.host_port <= high
    assert udp4.host_port == udp6.host_port and low <= udp4.host_port <= high
    for p in (tcp6, udp6):
        assert p.sock is not None and p.sock.getsockname()[1] == p.host_port


@PROXY_ONLY
def test_range_takes_the_first_port_free_on_both_families(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    first = free_dual_port(3)
    # Someone else holds [::]:first only; first is free on IPv4 but not on both.
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        other.bind(("::", first))
        other.listen(1)
        [v4, v6] = v6net.publish(cid, ep, f"{first}-{first + 2}:80")
        assert (v4.host_port, v6.host_port) == (first + 1, first + 1)
        # A fixed port busy on :: alone fails, and leaves its IPv4 half unreserved.
        with pytest.raises(NetdError) as info:
            v6net.publish(cid, ep, f"{first + 2}:81", f"{first}:82")
        assert str(info.value) == f"port {first}/tcp on :: is already in use"
        assert port_free(first + 2) == {"0.0.0.0": True, "::": True}
        assert port_free(first)["0.0.0.0"]
        [w4, w6] = v6net.publish(cid, ep, f"{first}-{first + 2}:83")
        assert (w4.host_port, w6.host_port) == (first + 2, first + 2)
        with pytest.raises(NetdError) as info:
            v6net.publish(cid, ep, f"{first}-{first + 2}:84")
        assert str(info.value) == f"no free port in {first}-{first + 2}/tcp on 0.0.0.0 and ::"
    assert len(v6net.ctrl.published(cid)) == 4


@DNAT_ONLY
def test_dnat_mode_ignores_ipv6_for_ports_without_address(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    first = free_dual_port(2)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        other.bind(("::", first))
        other.listen(1)
        [only] = v6net.publish(cid, ep, f"{first}-{first + 1}:80")
    assert (only.host_ip, only.host_port) == ("0.0.0.0", first)


# -- explicit IPv6 host addresses ----------------------------------------------------------------


@PROXY_ONLY
def test_explicit_ipv6_address_is_the_proxys(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    port = free_dual_port()
    loopback, anywhere = v6net.publish(cid, ep, f"[::1]:{port}:80", f"[::]:{port}:53/udp")
    assert (loopback.proto, loopback.host_ip, loopback.host_port) == ("tcp", "::1", port)
    assert (anywhere.proto, anywhere.host_ip, anywhere.host_port) == ("udp", "::", port)
    for p in (loopback, anywhere):
        assert p.sock is not None and p.sock.family == socket.AF_INET6 and v6_only(p.sock)
        assert (p.container_ip, p.in_firewall) == (ep.ip, False)
    assert v6net.mappings() == []  # IPv4 is untouched: nothing published there
    assert port_free(port, "tcp")["0.0.0.0"] and port_free(port, "udp")["0.0.0.0"]


@DNAT_ONLY
@pytest.mark.parametrize("spec", ["[::1]:{port}:80", "[::]:{port}:53/udp"])
def test_explicit_ipv6_address_without_proxy_applies_nothing(v6net: V6Net, spec: str) -> None:
    cid, ep = v6net.endpoint()
    port, spare = free_dual_port(), free_dual_port()
    host_ip = "::1" if spec.startswith("[::1]") else "::"
    with pytest.raises(NetdError) as info:
        v6net.publish(cid, ep, f"{spare}:81", spec.format(port=port))
    assert str(info.value) == (
        f'cannot publish on IPv6 address "{host_ip}": the container has no IPv6 address '
        "and the userland proxy is disabled"
    )
    assert v6net.ctrl.published(cid) == []
    assert v6net.mappings() == []
    assert port_free(spare) == {"0.0.0.0": True, "::": True}
    assert port_free(port, "udp") == {"0.0.0.0": True, "::": True}


# -- conflicts ----------------------------------------------------------------------------------


@PROXY_ONLY
def test_conflicts_within_a_family_only(v6net: V6Net) -> None:
    cid_a, a = v6net.endpoint()
    cid_b, b = v6net.endpoint()
    port, other = free_dual_port(), free_dual_port()
    v6net.publish(cid_a, a, f"[::1]:{port}:80")
    # IPv4 is independent of IPv6 (the kernel agrees: the IPv6 sockets are V6ONLY).
    [b4] = v6net.publish(cid_b, b, f"0.0.0.0:{port}:80")
    assert b4.host_ip == "0.0.0.0"
    # "::" clashes with any IPv6 address of the same port, and the other way round.
    with pytest.raises(NetdError, match=f"^port {port}/tcp on :: is already in use$"):
        v6net.publish(cid_b, b, f"[::]:{port}:81")
    with pytest.raises(NetdError, match=f"^port {port}/tcp on 0.0.0.0 is already in use$"):
        v6net.publish(cid_b, b, f"{port}:81")
    v6net.publish(cid_a, a, f"[::]:{other}:80")
    with pytest.raises(NetdError, match=f"^port {other}/tcp on ::1 is already in use$"):
        v6net.publish(cid_b, b, f"[::1]:{other}:80")
    with pytest.raises(NetdError, match=f"^port {other}/tcp on :: is already in use$"):
        v6net.publish(cid_b, b, f"{other}:80")  # free on IPv4, not on IPv6
    assert port_free(other)["0.0.0.0"]  # that attempt's IPv4 half was released
    # Another protocol is another port.
    assert len(v6net.publish(cid_b, b, f"{other}:80/udp")) == 2
    # Inside one request too.
    third = free_dual_port()
    with pytest.raises(NetdError, match=f"^port {third}/tcp on ::1 is already in use$"):
        v6net.publish(cid_b, b, f"{third}:80", f"[::1]:{third}:81")
    assert port_free(third) == {"0.0.0.0": True, "::": True}


# -- restart, status, conntrack -----------------------------------------------------------------


def test_restart_re_reserves_both_families(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    port, explicit = free_dual_port(), free_dual_port()
    specs = [f"{port}:80"] + ([f"[::1]:{explicit}:53/udp"] if v6net.proxy else [])
    before = v6net.publish(cid, ep, *specs)
    saved = json.loads((v6net.cfg.data_root / "network" / "endpoints.json").read_text())
    assert [(p["host_ip"], p["host_port"]) for p in saved["ports"][cid]] == [
        (p.host_ip, p.host_port) for p in before
    ]
    for p in v6net.ctrl.published(cid):  # the old daemon process exits
        assert p.sock is not None
        p.sock.close()
    assert port_free(port) == {"0.0.0.0": True, "::": True}

    restarted = NetworkController(v6net.cfg)
    restarted.setup()
    try:
        after = restarted.published(cid)
        assert after == before
        for p in after:
            assert p.sock is not None and p.sock.getsockname()[:2] == (p.host_ip, p.host_port)
            if p.host_ip != "0.0.0.0":
                assert p.sock.family == socket.AF_INET6 and v6_only(p.sock)
        assert port_free(port) == {"0.0.0.0": False, "::": not v6net.proxy}
        assert v6net.mappings() == [("0.0.0.0", "tcp", port, ep.ip, 80)]
    finally:
        restarted.teardown()


@PROXY_ONLY
def test_status_shows_ipv6_ports_as_the_proxys(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    port = free_dual_port()
    v6net.publish(cid, ep, f"{port}:80")
    out = subprocess.run(
        [sys.executable, "-m", "netd", "status", "--data-root", str(v6net.cfg.data_root)],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    assert "Published ports (2)" in out
    rows = [
        re.split(r"\s{2,}", line.strip())
        for line in out.splitlines()
        if line.startswith(f"  {cid[:12]}  ") and "->" in line
    ]
    assert rows == [
        [cid[:12], f"tcp 0.0.0.0:{port} -> {ep.ip}:80", "yes"],
        [cid[:12], f"tcp [::]:{port} -> {ep.ip}:80", "no (proxy only)"],
    ]
    assert "in the kernel but not in the state" not in out


def _conntrack_v6_udp(port: int) -> str:
    return subprocess.run(
        ["conntrack", "-L", "-f", "ipv6", "-p", "udp", "--orig-port-dst", str(port)],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip


@pytest.mark.parametrize("v6net", [("nftables", True)], indirect=True, ids=net_id)
def test_udp_publish_flushes_ipv6_conntrack_for_the_host_port(v6net: V6Net) -> None:
    require_tool("conntrack")
    cid, ep = v6net.endpoint()
    port, source_port = free_dual_port(), free_dual_port()
    # The inet table's ct expressions make the kernel track IPv6 flows in this namespace.
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as early:
        early.bind(("::1", source_port))
        early.sendto(b"early", ("::1", port))
    assert f"dport={port}" in _conntrack_v6_udp(port)
    v6net.publish(cid, ep, f"{port}:53/udp")
    assert f"dport={port}" not in _conntrack_v6_udp(port)


# -- the IPv6 half reaches the container through pyengine-proxy -----------------------------------


@PROXY_ONLY
def test_ipv6_half_is_proxied_to_the_ipv4_container(v6net: V6Net) -> None:
    cid, ep = v6net.endpoint()
    port = free_dual_port()
    published = v6net.publish(cid, ep, f"{port}:80", f"{port}:53/udp")
    ipv6 = [p for p in published if p.host_ip == "::"]
    assert [(p.proto, p.host_port) for p in ipv6] == [("tcp", port), ("udp", port)]

    async def exercise() -> list[str]:
        supervisor = ProxySupervisor()
        try:
            for p in ipv6:
                spec = ProxySpec(p.proto, p.host_ip, p.host_port, p.container_ip, p.container_port)
                assert p.sock is not None
                await supervisor.start(f"{cid}/{p.proto}", spec, p.sock)
            return [
                await asyncio.to_thread(_tcp_whoami6, "::1", port),
                await asyncio.to_thread(_udp_whoami6, "::1", port),
            ]
        finally:
            await supervisor.stop_all()

    with (
        start_whoami_server(ep.netns_name, "tcp", port=80),
        start_whoami_server(ep.netns_name, "udp", port=53),
    ):
        # The proxy connects from the host: the container sees the gateway.
        assert asyncio.run(exercise()) == [GATEWAY, GATEWAY]


def _tcp_whoami6(ip: str, port: int) -> str:
    with socket.create_connection((ip, port), timeout=IO_TIMEOUT) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def _udp_whoami6(ip: str, port: int) -> str:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.sendto(b"who?", (ip, port))
        data, peer = sock.recvfrom(256)
        assert peer[:2] == (ip, port)  # the reply comes from the address the client used
        return data.decode().strip()


# -- a network bound to one IPv4 address, a host without IPv6 -----------------------------------


@PROXY_ONLY
def test_host_binding_ipv4_option_means_ipv4_only(v6net: V6Net) -> None:
    net = v6net.ctrl.create_network(
        "pyev6-bound",
        subnet=USER_SUBNET,
        options={
            "com.docker.network.bridge.name": USER_BRIDGE,
            "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
        },
    )
    cid = secrets.token_hex(32)
    v6net.container_ids.append(cid)
    ep = v6net.ctrl.connect(cid, net)
    port = free_dual_port()
    [only] = v6net.publish(cid, ep, f"{port}:80")
    assert (only.host_ip, only.host_port) == ("127.0.0.1", port)
    assert only.sock is not None and only.sock.getsockname() == ("127.0.0.1", port)
    assert port_free(port)["::"]


_RESERVE_IN_NETNS = """
import json, socket
from netd.portmap import host_has_ipv6, reserve_dual_stack_port
held = reserve_dual_stack_port("tcp", 0, 0, lambda proto, ip, port: False)
print(json.dumps({
    "host_has_ipv6": host_has_ipv6(),
    "reserved": [[r.host_ip, r.sock.family == socket.AF_INET] for r in held],
}))
"""


def test_host_without_ipv6_publishes_ipv4_only() -> None:
    _privileged()
    name = f"{NETNS_PREFIX}noip6-{secrets.token_hex(3)}"
    remove_netns(name)
    run("ip", "netns", "add", name)
    try:
        run("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        run("ip", "-n", name, "link", "set", "lo", "up")
        out = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", _RESERVE_IN_NETNS],
            capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
        ).stdout  # fmt: skip
    finally:
        remove_netns(name)
    assert json.loads(out) == {"host_has_ipv6": False, "reserved": [["0.0.0.0", True]]}


# -- end to end: pyengined, pyengine and nginx --------------------------------------------------

E2E_MODES = {True: ("pyev6p0", "10.85.0.1/24"), False: ("pyev6d0", "10.84.0.1/24")}


@pytest.fixture(scope="module", params=[True, False], ids=["userland-proxy", "kernel-dnat"])
def v6daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    require_root()
    proxy: bool = request.param
    name, bip = E2E_MODES[proxy]
    archive = image_archive("nginx")
    d = start_daemon(tmp_path_factory.mktemp(name), name, bip, proxy)
    try:
        d.cli("load", "-i", str(archive), check=True)
        yield d
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
        stop_test_daemon(d)
        assert_nothing_left(d)
    finally:
        stop_test_daemon(d)
        for table_backend in BACKENDS:
            remove_firewall(table_backend, name)
        remove_link(name)


def http_status(host: str, port: int) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=IO_TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_http(host: str, port: int, deadline_s: float = 30) -> int:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return http_status(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def nginx_run(v6daemon: Daemon) -> Iterator[list[str]]:
    """Containers started by the test (removed at the end)."""
    started: list[str] = []
    yield started
    for cid in started:
        v6daemon.cli("rm", "-f", cid)


def run_nginx(d: Daemon, started: list[str], *publish: str) -> str:
    args = [arg for spec in publish for arg in ("-p", spec)]
    cid = d.cli("run", "-d", *args, "nginx", check=True).stdout.strip()
    started.append(cid)
    return cid


def test_e2e_port_without_address(v6daemon: Daemon, nginx_run: list[str]) -> None:
    port = free_dual_port()
    cid = run_nginx(v6daemon, nginx_run, f"{port}:80")
    assert wait_http("127.0.0.1", port) == 200
    lines = v6daemon.cli("port", cid, check=True).stdout.splitlines()
    ps = v6daemon.cli("ps", check=True).stdout
    info = json.loads(v6daemon.cli("inspect", cid, check=True).stdout)[0]
    if v6daemon.userland_proxy:
        assert http_status("::1", port) == 200
        assert lines == [f"80/tcp -> 0.0.0.0:{port}", f"80/tcp -> [::]:{port}"]
        assert v6daemon.cli("port", cid, "80", check=True).stdout.splitlines() == [
            f"0.0.0.0:{port}",
            f"[::]:{port}",
        ]
        assert f"0.0.0.0:{port}->80/tcp, [::]:{port}->80/tcp" in ps
        assert info["NetworkSettings"]["Ports"]["80/tcp"] == [
            {"HostIp": "0.0.0.0", "HostPort": str(port)},
            {"HostIp": "::", "HostPort": str(port)},
        ]
    else:
        assert connect_refused("::1", port)
        assert lines == [f"80/tcp -> 0.0.0.0:{port}"]
        assert f"0.0.0.0:{port}->80/tcp" in ps and "[::]" not in ps
        assert info["NetworkSettings"]["Ports"]["80/tcp"] == [
            {"HostIp": "0.0.0.0", "HostPort": str(port)}
        ]


def test_e2e_ephemeral_port_is_one_number(v6daemon: Daemon, nginx_run: list[str]) -> None:
    cid = run_nginx(v6daemon, nginx_run, "80")
    lines = v6daemon.cli("port", cid, "80", check=True).stdout.splitlines()
    ports = {line.rpartition(":")[2] for line in lines}
    assert len(ports) == 1 and len(lines) == (2 if v6daemon.userland_proxy else 1)
    port = int(ports.pop())
    assert wait_http("127.0.0.1", port) == 200
    if v6daemon.userland_proxy:
        assert http_status("::1", port) == 200


def test_e2e_explicit_ipv6_address(v6daemon: Daemon, nginx_run: list[str]) -> None:
    port = free_dual_port()
    if v6daemon.userland_proxy:
        cid = run_nginx(v6daemon, nginx_run, f"[::1]:{port}:80")
        assert wait_http("::1", port) == 200
        assert connect_refused("127.0.0.1", port)
        assert v6daemon.cli("port", cid, check=True).stdout == f"80/tcp -> [::1]:{port}\n"
        return
    result = v6daemon.cli("run", "-d", "--name", "pyev6-refused", "-p", f"[::1]:{port}:80", "nginx")
    nginx_run.append("pyev6-refused")
    assert result.returncode != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert (
        'cannot publish on IPv6 address "::1": the container has no IPv6 address '
        "and the userland proxy is disabled"
    ) in message
    assert port_free(port) == {"0.0.0.0": True, "::": True}
    assert v6daemon.cli("ps", "-q", check=True).stdout.strip() == ""
