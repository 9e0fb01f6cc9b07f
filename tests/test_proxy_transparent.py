"""Transparent proxy mode through the real daemon: nginx in a container logs the address of a
client namespace (its own address on a LAN-like veth to the host) for a connection through the
userland proxy, in both firewall backends, over IPv4 and IPv6; a UDP echo sees the client's
address; a loopback client still works (from the bridge gateway); nothing is left of the return
path after ``rm -f`` and after the daemon stops.

The nftables daemon runs with ``--userland-proxy-mode=transparent``; the iptables one with the
default mode and the container label ``pyengine.proxy-mode=transparent``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from netd.returnpath import ReturnPath
from tests.conftest import Daemon, start_daemon, stop_daemon
from tests.netns_helpers import (
    ExternalHost,
    create_external_host,
    delete_external_host,
    firewall_installed,
    kernel_mappings,
    netns_socket,
    remove_firewall,
)

IO_TIMEOUT = 5.0
LAN = ("pyetr-lan", "pyetr-x0", "10.199.10.1/24", "10.199.10.2/24")
LAN6_HOST, LAN6_CLIENT = "fd00:199:10::1", "fd00:199:10::2"
UDP_ECHO = (
    "use Socket; use IO::Socket::INET;"
    ' my $s = IO::Socket::INET->new(LocalPort => 9, Proto => "udp") or die "bind: $!";'
    " while (1) { my $peer = $s->recv(my $m, 2048);"
    " my ($port, $addr) = unpack_sockaddr_in($peer);"
    ' $s->send(inet_ntoa($addr) . "\\n", 0, $peer); }'
)


@dataclass(frozen=True)
class Setup:
    backend: str
    bridge: str
    bip: str
    subnet6: str
    return_path: ReturnPath
    port: int
    by_label: bool  # transparent by container label (else the daemon's mode)

    @property
    def gateway(self) -> str:
        return self.bip.split("/")[0]

    def flag(self) -> str:
        rp = self.return_path
        return f"{rp.mark:#x}:{rp.table}:{rp.priority}"


SETUPS = {
    "nftables": Setup(
        "nftables", "pyetr0", "10.199.0.1/24", "fd00:199:0::/64",
        ReturnPath(0x1D190000, 25919, 25919), 28190, by_label=False,
    ),
    "iptables": Setup(
        "iptables", "pyetr1", "10.199.1.1/24", "fd00:199:1::/64",
        ReturnPath(0x1D1A0000, 25920, 25920), 28191, by_label=True,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def lan() -> Iterator[ExternalHost]:
    name, host_if, host_cidr, ext_cidr = LAN
    ext = create_external_host(name, host_if, host_cidr, ext_cidr)
    try:
        nodad = 0x02  # IFA_F_NODAD: usable at once, no duplicate address detection wait
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=index, address=LAN6_HOST, prefixlen=64, flags=nodad)
        with IPRoute(netns=name) as ns:
            index = ns.link_lookup(ifname=ext.ifname)[0]
            ns.addr("add", index=index, address=LAN6_CLIENT, prefixlen=64, flags=nodad)
        yield ext
    finally:
        delete_external_host(ext)


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    nginx_archive: Path,
    lan: ExternalHost,
) -> Iterator[tuple[Setup, Daemon]]:
    s = SETUPS[request.param]
    mode = "gateway" if s.by_label else "transparent"
    d = start_daemon(
        tmp_path_factory.mktemp(s.bridge), s.bridge, s.bip, True,
        "--firewall-backend", s.backend, "--ipv6", "--fixed-cidr-v6", s.subnet6,
        "--live-restore=false", f"--userland-proxy-mode={mode}",
        f"--userland-proxy-return-path={s.flag()}",
    )  # fmt: skip
    try:
        d.cli("load", "-i", str(nginx_archive), check=True)
        yield s, d
    finally:
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
        stop_daemon(d)
        s.return_path.remove()
        if firewall_installed(s.backend, s.bridge):
            remove_firewall(s.backend, s.bridge)
        if s.backend == "iptables":
            remove_mangle_chain(s.bridge.upper() + "-PREROUTING", s.bridge)
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=s.bridge):
                ipr.link("del", index=index)


def remove_mangle_chain(chain: str, tag: str) -> None:
    """The return path's iptables chain and its jump, after a failure (netns_helpers'
    remove_firewall knows the raw, nat and filter tables only)."""
    for tool in ("iptables", "ip6tables"):
        jump = ["PREROUTING", "-m", "comment", "--comment", tag, "-j", chain]
        for _ in range(10):  # one jump each, at most a few left by failed runs
            if subprocess.run([tool, "-t", "mangle", "-D", *jump], capture_output=True).returncode:
                break
        subprocess.run([tool, "-t", "mangle", "-F", chain], capture_output=True)
        subprocess.run([tool, "-t", "mangle", "-X", chain], capture_output=True)


def run_container(s: Setup, d: Daemon, *args: str) -> str:
    label = ["-l", "pyengine.proxy-mode=transparent"] if s.by_label else []
    result = d.cli("run", "-d", *label, *args, check=True)
    return result.stdout.strip()


def http_get(netns: str | None, ip: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with netns_socket(netns, family) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect((ip, port))
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode(errors="replace").split("\r\n")[0]


def udp_ask(netns: str | None, ip: str, port: int) -> str:
    with netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        for _ in range(3):  # the echo may not be listening yet
            sock.sendto(b"who?", (ip, port))
            try:
                return sock.recv(256).decode().strip()
            except TimeoutError:
                continue
    raise TimeoutError(f"no UDP echo from {ip}:{port}")


def logs_mention(d: Daemon, cid: str, needle: str, also: str = "", timeout: float = 5.0) -> bool:
    """Whether a line of the container's log holds ``needle`` (and ``also``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in d.cli("logs", cid).stdout.splitlines():
            if needle in line and also in line:
                return True
        time.sleep(0.1)
    return False


def hairpin_get(ip: str, port: int) -> str:
    """A perl one-liner (the nginx image has perl) asking ``ip:port`` for /hairpin."""
    return (
        "use IO::Socket::INET;"
        f' my $s = IO::Socket::INET->new(PeerAddr => "{ip}:{port}", Timeout => 5) or die $!;'
        ' print $s "GET /hairpin HTTP/1.0\\r\\n\\r\\n"; print scalar <$s>;'
    )


def return_path_rules(s: Setup) -> list[str]:
    """Our mark rules in the firewall and our ip rules and routes, as the kernel has them."""
    found = list(s.return_path.installed())
    if s.backend == "nftables":
        out = subprocess.run(
            ["nft", "list", "table", "inet", s.bridge], capture_output=True, text=True
        ).stdout
        found += [line.strip() for line in out.splitlines() if "socket transparent" in line]
    else:
        for save in ("iptables-save", "ip6tables-save"):
            out = subprocess.run([save, "-t", "mangle"], capture_output=True, text=True).stdout
            found += [line for line in out.splitlines() if s.bridge.upper() in line]
    return found


def wait_http(netns: str | None, ip: str, port: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(netns, ip, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_nginx_logs_the_lan_client_over_ipv4_and_ipv6(
    setup: tuple[Setup, Daemon], lan: ExternalHost
) -> None:
    s, d = setup
    cid = run_container(s, d, "-p", f"{s.port}:80", "nginx")
    try:
        assert return_path_rules(s), "no return path while a transparent port is published"
        # The proxy serves every client of a transparent port: the kernel does not DNAT it.
        assert [m for m in kernel_mappings(s.backend, s.bridge) if m[2] == s.port] == []
        assert wait_http(lan.netns, lan.host_ip, s.port).startswith("HTTP/1.1 200")
        assert logs_mention(d, cid, f"{lan.ip} - "), d.cli("logs", cid).stdout
        assert http_get(lan.netns, LAN6_HOST, s.port).startswith("HTTP/1.1 200")
        assert logs_mention(d, cid, f"{LAN6_CLIENT} - "), d.cli("logs", cid).stdout
        # Loopback cannot be answered by the container: the gateway's address, as before.
        assert http_get(None, "127.0.0.1", s.port).startswith("HTTP/1.1 200")
        assert logs_mention(d, cid, f"{s.gateway} - "), d.cli("logs", cid).stdout
        assert http_get(None, "::1", s.port).startswith("HTTP/1.1 200")
        # One of the host's own addresses is routed back to the host: the container sees it.
        assert http_get(None, lan.host_ip, s.port).startswith("HTTP/1.1 200")
        assert logs_mention(d, cid, f"{lan.host_ip} - "), d.cli("logs", cid).stdout
        # A container on the same bridge would be answered over the bridge: the gateway.
        hairpin = d.cli("run", "--rm", "nginx", "perl", "-e", hairpin_get(s.gateway, s.port))
        assert hairpin.stdout.startswith("HTTP/1.1 404"), hairpin.stderr  # answered
        assert logs_mention(d, cid, f"{s.gateway} - - [", "GET /hairpin"), d.cli("logs", cid).stdout
    finally:
        d.cli("rm", "-f", cid, check=True)
    assert return_path_rules(s) == []


def test_udp_echo_sees_the_lan_client(setup: tuple[Setup, Daemon], lan: ExternalHost) -> None:
    s, d = setup
    port = s.port + 10
    cid = run_container(s, d, "-p", f"{port}:9/udp", "nginx", "perl", "-e", UDP_ECHO)
    try:
        assert udp_ask(lan.netns, lan.host_ip, port) == lan.ip
        assert udp_ask(None, "127.0.0.1", port) == s.gateway
    finally:
        d.cli("rm", "-f", cid, check=True)
    assert return_path_rules(s) == []


def test_nothing_left_after_the_daemon_stops(
    setup: tuple[Setup, Daemon], lan: ExternalHost
) -> None:
    s, d = setup
    run_container(s, d, "-p", f"{s.port + 20}:80", "nginx")
    assert return_path_rules(s)
    stop_daemon(d)
    assert return_path_rules(s) == []
    records = d.data_root / "proxies"
    assert not (records.is_dir() and any(records.iterdir()))


def test_live_restore_keeps_the_mode(
    tmp_path: Path, nginx_archive: Path, lan: ExternalHost
) -> None:
    """Proxies outlive a daemon with live restore, and so does the return path; the next
    daemon adopts both, and removes the return path with the last transparent port."""
    bridge, bip, port = "pyetr2", "10.199.2.1/24", 28192
    rp = ReturnPath(0x1D1B0000, 25921, 25921)
    args = (
        "--live-restore=true", "--userland-proxy-mode=transparent",
        f"--userland-proxy-return-path={rp.mark:#x}:{rp.table}:{rp.priority}",
    )  # fmt: skip
    d = start_daemon(tmp_path, bridge, bip, True, *args)
    try:
        d.cli("load", "-i", str(nginx_archive), check=True)
        cid = d.cli("run", "-d", "-p", f"{port}:80", "nginx", check=True).stdout.strip()
        assert wait_http(lan.netns, lan.host_ip, port).startswith("HTTP/1.1 200")
        stop_daemon(d)
        assert rp.installed(), "the return path went with the daemon"
        assert http_get(lan.netns, lan.host_ip, port).startswith("HTTP/1.1 200")
        d = start_daemon(tmp_path, bridge, bip, True, *args)
        assert http_get(lan.netns, lan.host_ip, port).startswith("HTTP/1.1 200")
        logs = d.cli("logs", cid).stdout
        assert logs.count(f"{lan.ip} - ") >= 3, logs
        d.cli("rm", "-f", cid, check=True)
        assert rp.installed() == []
    finally:
        for left in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", left)
        stop_daemon(d)
        rp.remove()
        if firewall_installed("nftables", bridge):
            remove_firewall("nftables", bridge)
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=bridge):
                ipr.link("del", index=index)
