"""Test helpers for real network namespaces: privilege checks, sockets created inside a named
namespace, an "external host" namespace joined to the host by a veth, and tiny servers that
answer with the address they see the client as.

Everything here creates only ``pye``-prefixed objects and sends traffic only to loopback or to
addresses of namespaces/veths the test made. Privilege checks live in ``tests/conftest.py``.
The firewall helpers at the end read what a backend installed straight from the kernel (``nft``,
``iptables-save``), independently of the code under test, and remove it after a failed test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface

from pyroute2 import IPRoute, netns

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
IO_TIMEOUT = 5.0  # seconds; bounds every blocking socket call in these helpers

_libc = ctypes.CDLL(None, use_errno=True)


def run(*argv: str) -> str:
    """Run an inspection command (``ip``, ``nft``) and return its stdout; raise on failure."""
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


# -- namespaces -----------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def remove_netns(name: str) -> None:
    if netns_exists(name):
        netns.remove(name)


def link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def remove_link(ifname: str) -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=ifname):
            ipr.link("del", index=index)


def netns_socket(
    name: str | None, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in network namespace ``name`` (None: the caller's namespace).

    setns(2) with CLONE_NEWNET switches only the calling thread, so a throwaway thread enters
    the namespace and creates the socket; a socket stays in the namespace it was created in.
    """
    if name is None:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(IO_TIMEOUT)
        return sock
    result: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind, proto))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    sock = result[0]
    sock.settimeout(IO_TIMEOUT)
    return sock


@dataclass
class ExternalHost:
    """A namespace standing in for a machine on the host's network, joined by a veth pair."""

    netns: str
    host_ifname: str
    host_ip: str
    ip: str
    ifname: str = "eth0"  # its interface, inside the namespace


def create_external_host(
    name: str = "pyetest-ext",
    host_ifname: str = "pyetest-x0",
    host_cidr: str = "198.18.0.1/30",
    ext_cidr: str = "198.18.0.2/30",
    ifname: str = "eth0",
) -> ExternalHost:
    """``name`` gets ``ifname`` = ``ext_cidr``; the host end ``host_ifname`` gets ``host_cidr``."""
    host_if, ext_if = IPv4Interface(host_cidr), IPv4Interface(ext_cidr)
    remove_link(host_ifname)
    remove_netns(name)
    netns.create(name)
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add", ifname=host_ifname, kind="veth", peer={"ifname": ifname, "net_ns_fd": name}
            )
            index = ipr.link_lookup(ifname=host_ifname)[0]
            ipr.addr(
                "add", index=index, address=str(host_if.ip), prefixlen=host_if.network.prefixlen
            )
            ipr.link("set", index=index, state="up")
        with IPRoute(netns=name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            eth0 = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=eth0, address=str(ext_if.ip), prefixlen=ext_if.network.prefixlen)
            ns.link("set", index=eth0, state="up")
    except BaseException:
        remove_link(host_ifname)
        remove_netns(name)
        raise
    return ExternalHost(name, host_ifname, str(host_if.ip), str(ext_if.ip), ifname)


def delete_external_host(ext: ExternalHost) -> None:
    remove_link(ext.host_ifname)
    remove_netns(ext.netns)


# -- servers and clients --------------------------------------------------------------------


@dataclass
class WhoamiServer:
    """Answers every TCP connection / UDP datagram with the client's address as seen here
    (``"<ip>\\n"``), from a thread. Use as a context manager or call ``stop()``."""

    sock: socket.socket
    proto: str
    port: int
    _thread: threading.Thread = field(init=False)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.proto == "tcp":
                    conn, peer = self.sock.accept()
                    with conn:
                        conn.settimeout(IO_TIMEOUT)
                        conn.sendall(f"{peer[0]}\n".encode())
                else:
                    _data, peer = self.sock.recvfrom(2048)
                    self.sock.sendto(f"{peer[0]}\n".encode(), peer)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=IO_TIMEOUT)
        self.sock.close()

    def __enter__(self) -> WhoamiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_whoami_server(
    netns_name: str | None, proto: str = "tcp", ip: str = "0.0.0.0", port: int = 0
) -> WhoamiServer:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = netns_socket(netns_name, socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        if proto == "tcp":
            sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return WhoamiServer(sock, proto, sock.getsockname()[1])


def tcp_whoami(netns_name: str | None, ip: str, port: int, timeout: float | None = None) -> str:
    """Connect from ``netns_name`` (over IPv6 when ``ip`` is an IPv6 address) and return the
    address the server saw (raises ConnectionRefusedError / TimeoutError like a plain socket)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with netns_socket(netns_name, family, socket.SOCK_STREAM) as sock:
        if timeout is not None:
            sock.settimeout(timeout)
        sock.connect((ip, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def udp_whoami(
    netns_name: str | None, ip: str, port: int, source_port: int = 0, timeout: float = IO_TIMEOUT
) -> str:
    """Send one datagram from ``netns_name`` (optionally from a fixed source port) and return
    the reply; raises TimeoutError when none comes within ``timeout``."""
    with netns_socket(netns_name, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        if source_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", source_port))
        sock.sendto(b"who?", (ip, port))
        data, _peer = sock.recvfrom(256)
        return data.decode().strip()


# -- ports ----------------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def free_port_block(count: int = 1, low: int = 61000, high: int = 65000) -> int:
    """First port of ``count`` consecutive ports free for TCP and UDP on every address, chosen
    above the default ephemeral range so the kernel is unlikely to hand them out meanwhile."""
    for _ in range(200):
        start = random.randint(low, high - count)
        if all(_port_is_free(p) for p in range(start, start + count)):
            return start
    raise RuntimeError(f"no {count} consecutive free ports in {low}-{high}")


@contextlib.contextmanager
def listening_socket(ip: str, port: int) -> Iterator[socket.socket]:
    """A plain TCP listener occupying ``ip:port`` for the duration of the block."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, port))
        sock.listen(1)
        yield sock


# -- firewall state, read independently of netd -----------------------------------------------

IPTABLES_TABLES = ("raw", "nat", "filter")
# One DNAT rule per mapping, as iptables-save prints the rules netd writes.
_IPTABLES_DNAT = re.compile(
    r"^-A (?P<chain>\S+) (?:-d (?P<ip>[\d.]+)/32 )?-p (?P<proto>tcp|udp) -m (?:tcp|udp) "
    r"--dport (?P<port>\d+) -j DNAT --to-destination (?P<cip>[\d.]+):(?P<cport>\d+)$"
)

Mapping = tuple[str, str, int, str, int]  # host ip, proto, host port, container ip, port


def nft_map_elements(table: str, name: str) -> list[tuple[list, list]]:
    """Elements of an nftables map of ``inet table`` as (key parts, value parts)."""
    data = json.loads(run("nft", "-j", "list", "map", "inet", table, name))
    for item in data["nftables"]:
        if "map" in item:
            return [(k["concat"], v["concat"]) for k, v in item["map"].get("elem", [])]
    raise AssertionError(f"map {name} not listed")


def kernel_mappings(backend: str, table: str) -> list[Mapping]:
    """The published-port mappings the kernel holds for netd's ``table``, sorted."""
    found: list[Mapping] = []
    if backend == "nftables":
        for key, (cip, cport) in nft_map_elements(table, "published_on_addr"):
            ip, proto, port = key
            found.append((ip, proto, int(port), cip, int(cport)))
        for (proto, port), (cip, cport) in nft_map_elements(table, "published_on_any"):
            found.append(("0.0.0.0", proto, int(port), cip, int(cport)))
    else:
        chain = f"{table.upper()}-DNAT"
        for line in run("iptables-save", "-t", "nat").splitlines():
            match = _IPTABLES_DNAT.match(line)
            if match and match["chain"] == chain:
                found.append(
                    (
                        match["ip"] or "0.0.0.0",
                        match["proto"],
                        int(match["port"]),
                        match["cip"],
                        int(match["cport"]),
                    )
                )
    return sorted(found)


def iptables_owned_lines(table: str) -> list[str]:
    """Every iptables-save line that declares, fills or jumps to a ``<TABLE>-*`` chain."""
    prefix = f"{table.upper()}-"
    lines = []
    for line in run("iptables-save").splitlines():
        if line.startswith(f":{prefix}") or f"-A {prefix}" in line or f"-j {prefix}" in line:
            lines.append(line)
    return lines


def firewall_installed(backend: str, table: str) -> bool:
    if backend == "nftables":
        result = subprocess.run(
            ["nft", "list", "table", "inet", table], capture_output=True, timeout=30
        )
        return result.returncode == 0
    return bool(iptables_owned_lines(table))


def remove_firewall(backend: str, table: str) -> None:
    """Delete what netd's ``backend`` made for ``table`` (a test's cleanup after a failure)."""
    if backend == "nftables":
        if firewall_installed(backend, table):
            run("nft", "delete", "table", "inet", table)
        return
    prefix = f"{table.upper()}-"
    for ipt_table in IPTABLES_TABLES:
        chains = []
        for line in run("iptables-save", "-t", ipt_table).splitlines():
            if line.startswith(f":{prefix}"):
                chains.append(line[1:].split()[0])
            elif line.startswith("-A ") and f"-j {prefix}" in line:
                builtin, _, spec = line[3:].partition(" ")
                if not builtin.startswith(prefix):
                    run("iptables", "-t", ipt_table, "-D", builtin, *shlex.split(spec))
        for chain in chains:
            run("iptables", "-t", ipt_table, "-F", chain)
        for chain in chains:
            run("iptables", "-t", ipt_table, "-X", chain)


# -- raw frames -----------------------------------------------------------------------------

ETH_P_ALL = 0x0003  # <linux/if_ether.h>
PACKET_OUTGOING = 4  # <linux/if_packet.h>: frames this host sent, looped back to packet sockets


def link_mac(netns_name: str | None, ifname: str) -> str:
    """The MAC address of ``ifname`` (in ``netns_name``; None: the caller's namespace)."""
    if netns_name is None:
        with open(f"/sys/class/net/{ifname}/address") as f:
            return f.read().strip()
    return json.loads(run("ip", "-n", netns_name, "-j", "link", "show", "dev", ifname))[0][
        "address"
    ]


def send_frames(netns_name: str | None, ifname: str, frames: list[bytes]) -> None:
    """Write raw Ethernet frames out of ``ifname``, bypassing the namespace's routing, ARP and
    firewall: what a compromised container (or a LAN host) can put on the wire."""
    with netns_socket(
        netns_name, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
    ) as sock:
        sock.bind((ifname, 0))
        for frame in frames:
            sock.send(frame)


class FrameCapture:
    """Every frame arriving on ``ifname`` inside ``netns_name``, collected by a thread from
    creation to ``stop()`` (frames the namespace itself sent are left out). A context manager."""

    def __init__(self, netns_name: str | None, ifname: str) -> None:
        self.sock = netns_socket(
            netns_name, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
        )
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.05)
        self._frames: list[bytes] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                data, address = self.sock.recvfrom(65535)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            if address[2] != PACKET_OUTGOING:
                with self._lock:
                    self._frames.append(data)

    def frames(self) -> list[bytes]:
        with self._lock:
            return list(self._frames)

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float) -> bool:
        """Whether a frame matching ``predicate`` arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if any(predicate(frame) for frame in self.frames()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=IO_TIMEOUT)
        self.sock.close()

    def __enter__(self) -> FrameCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- kernel objects named after a test's prefix -----------------------------------------------


def netns_with_prefix(prefix: str) -> list[str]:
    """Network namespaces in /run/netns whose name starts with ``prefix``."""
    if not os.path.isdir(NETNS_DIR):
        return []
    return sorted(name for name in os.listdir(NETNS_DIR) if name.startswith(prefix))


def links_with_prefix(prefix: str) -> list[str]:
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(name for name in names if name.startswith(prefix))


def bridge_ports(bridge: str) -> list[str]:
    """The interfaces enslaved to ``bridge`` (empty when it does not exist)."""
    path = f"/sys/class/net/{bridge}/brif"
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@contextlib.contextmanager
def loopback_echo_server(backlog: int = 128, timeout: float = 10.0) -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1 (a thread per connection) for as long as the block runs;
    its (address, port)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
    listener.settimeout(0.2)
    stopping = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(timeout)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stopping.set()
        thread.join(timeout=10)
        listener.close()
