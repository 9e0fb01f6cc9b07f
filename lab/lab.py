"""The namespace lab: docs/lab.md's two-machine topology on one machine, and its exercises.

    python -m lab up | down | status | exercise NAME     (pyengine lab ... does the same)

``up`` builds, on the machine it runs on (the *engine host*):

* a ``client`` network namespace standing in for a machine on the LAN, joined to the host by a
  veth pair: ``<prefix>-veth`` on the host (198.18.200.1/24) and ``eth0`` inside
  (198.18.200.2/24), with routes to the lab's bridges through the host;
* two pyengined daemons of the lab's own, one per proxy mode, side by side, so every exercise
  compares them: ``proxy`` (``--userland-proxy=true``, bridge ``<prefix>-proxy``
  10.201.0.1/24) and ``dnat`` (``--userland-proxy=false``, bridge ``<prefix>-dnat``
  10.201.1.1/24). Each has its own socket, data root, log and firewall table under the lab
  directory; a pyengined the user already runs is never touched;
* the nginx and busybox images loaded into both.

``exercise NAME`` runs the shell commands of one exercise of docs/lab.md against the lab and
prints each command with its output: exactly what a reader types, with the lab's names filled
in. ``down`` removes every container, daemon, link and namespace the lab made. Every kernel
object the lab itself creates is named after its prefix (default ``pyelab``); 198.18.0.0/15 is
RFC 2544's benchmarking range, so the client's addresses collide with no real network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import click

from common.jsonstate import read_json, write_json_atomic
from engine.runtime.rootfs import mounts_under
from netd.firewall import BACKENDS, make_firewall

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_DIR = Path("/var/lib/pyengine-lab")
STATE_FILE = "lab.json"
IMAGE_CACHE = Path(os.environ.get("IMAGE_CACHE", "/var/cache/pyengine/images"))
LAB_IMAGES = ("nginx", "busybox")
WEB = "web"  # the container every exercise publishes

# "pyelab" plus up to three letters or digits: the longest name made from it,
# "<prefix>-proxy", must fit IFNAMSIZ - 1 = 15 characters (<linux/if.h>).
_PREFIX = re.compile(r"^pyelab[a-z0-9]{0,3}$")
ROLES = ("proxy", "dnat")

DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 60.0
COMMAND_TIMEOUT = 120.0
CAPTURE_READY_TIMEOUT = 10.0
CAPTURE_TIMEOUT = 20.0


class LabError(Exception):
    """The lab could not do what was asked; the message says why in one line."""


# -- state ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientLink:
    """The client namespace and the veth pair that joins it to the engine host."""

    netns: str
    host_if: str  # the host's end
    subnet: str
    host_ip: str  # the engine host's address on the link: what the client connects to
    client_ip: str
    ifname: str = "eth0"  # the client's end, inside the namespace

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen


@dataclass
class LabDaemon:
    """One pyengined of the lab, under the lab's directory and names."""

    role: str  # "proxy" | "dnat"
    userland_proxy: bool
    bridge: str
    bip: str  # gateway address / prefix length
    table: str  # nftables table, or prefix of the iptables chains
    port: int  # the host port the exercises publish nginx's port 80 on
    root: str  # directory holding data/, <role>.sock and <role>.log
    pid: int = 0

    @property
    def socket_path(self) -> Path:
        return Path(self.root) / f"{self.role}.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def data_root(self) -> Path:
        return Path(self.root) / "data"

    @property
    def log_path(self) -> Path:
        return Path(self.root) / f"{self.role}.log"

    @property
    def gateway(self) -> str:
        return str(ipaddress.IPv4Interface(self.bip).ip)

    @property
    def subnet(self) -> str:
        return str(ipaddress.IPv4Interface(self.bip).network)

    @property
    def mode(self) -> str:
        return "userland proxy" if self.userland_proxy else "kernel DNAT"

    @property
    def flag(self) -> str:
        return f"--userland-proxy={'true' if self.userland_proxy else 'false'}"

    def pyengine(self) -> list[str]:
        return [str(BIN / "pyengine"), "-H", self.host]


@dataclass
class LabState:
    """Everything ``up`` made, persisted as <dir>/lab.json before the kernel is touched."""

    prefix: str
    directory: str
    firewall_backend: str
    client: ClientLink | None
    daemons: list[LabDaemon] = field(default_factory=list)
    ready: bool = False  # False while ``up`` runs (``down`` then cleans up what exists)

    def daemon(self, role: str) -> LabDaemon:
        for d in self.daemons:
            if d.role == role:
                return d
        raise LabError(f"the lab has no {role} daemon")

    def save(self) -> None:
        write_json_atomic(Path(self.directory) / STATE_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: Path) -> LabState:
        raw = read_json(directory / STATE_FILE, None)
        if raw is None:
            raise LabError(f"no lab is up in {directory} (python -m lab up)")
        try:
            client = ClientLink(**raw["client"]) if raw.get("client") else None
            daemons = [LabDaemon(**d) for d in raw["daemons"]]
            return cls(
                prefix=raw["prefix"],
                directory=raw["directory"],
                firewall_backend=raw["firewall_backend"],
                client=client,
                daemons=daemons,
                ready=bool(raw.get("ready")),
            )
        except (KeyError, TypeError) as exc:
            raise LabError(f"{directory / STATE_FILE} is not a lab state file: {exc}") from None


@dataclass(frozen=True)
class LabOptions:
    """What ``up`` is asked for (the defaults are the names docs/lab.md shows)."""

    directory: Path = DEFAULT_DIR
    prefix: str = "pyelab"
    client_subnet: str = "198.18.200.0/24"
    proxy_bip: str = "10.201.0.1/24"
    dnat_bip: str = "10.201.1.1/24"
    proxy_port: int = 8081
    dnat_port: int = 8082
    firewall_backend: str = "nftables"
    with_client: bool = True


# -- running commands -----------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The exercises' environment: this Python's ``pyengine`` and ``python`` first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=_env(),
            cwd=REPO,
        )
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None


def _check(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> str:
    result = _run(argv, timeout)
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {why[-1] if why else f'exit {result.returncode}'}")
    return result.stdout


def _say(echo: Callable[[str], None], argv: list[str]) -> str:
    """Run a set-up command and show it, so ``up`` doubles as a listing of what it does."""
    echo("+ " + " ".join(argv))
    return _check(argv)


# -- checks before anything is made ---------------------------------------------------------


def _host_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """Every IPv4 route and address of the host, with where it comes from."""
    found: list[tuple[ipaddress.IPv4Network, str]] = []
    for route in json.loads(_check(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                net = ipaddress.IPv4Network(dst, strict=False)
                found.append((net, f"route {dst} dev {route.get('dev', '?')}"))
    for link in json.loads(_check(["ip", "-j", "-4", "addr"]) or "[]"):
        for addr in link.get("addr_info", []):
            net = ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
            found.append((net, f"address {addr['local']} on {link.get('ifname', '?')}"))
    return found


def _check_free_subnets(subnets: dict[str, ipaddress.IPv4Network]) -> None:
    names = list(subnets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if subnets[a].overlaps(subnets[b]):
                raise LabError(f"{a} {subnets[a]} overlaps {b} {subnets[b]}")
    for what, net in subnets.items():
        for used, where in _host_networks():
            if net.overlaps(used):
                raise LabError(f"{what} {net} overlaps the host's {where}; choose another")


def _check_free_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As netd reserves ports: connections in TIME_WAIT on the port do not block it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LabError(f"host port {port} is in use; choose another") from None
            raise LabError(f"cannot bind host port {port}: {exc.strerror}") from None


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=_env()["PATH"]) is None]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)} (apt-get install {' '.join(missing)})")


def plan(options: LabOptions) -> LabState:
    """The lab ``options`` describe, checked for consistency (nothing is touched)."""
    if not _PREFIX.fullmatch(options.prefix):
        raise LabError(f'invalid prefix "{options.prefix}" (pyelab, then at most 3 of a-z0-9)')
    if options.firewall_backend not in BACKENDS:
        raise LabError(f'unknown firewall backend "{options.firewall_backend}"')
    if options.proxy_port == options.dnat_port:
        raise LabError("the two daemons need different host ports")
    client = None
    if options.with_client:
        try:
            subnet = ipaddress.IPv4Network(options.client_subnet)
        except ValueError as exc:
            raise LabError(f"invalid client subnet: {exc}") from None
        if subnet.prefixlen > 30:
            raise LabError(f"client subnet {subnet} is too small (a /30 or larger)")
        host_ip, client_ip = (str(a) for a in list(subnet.hosts())[:2])
        client = ClientLink(
            netns=f"{options.prefix}-client",
            host_if=f"{options.prefix}-veth",
            subnet=str(subnet),
            host_ip=host_ip,
            client_ip=client_ip,
        )
    directory = options.directory.resolve()
    daemons = []
    for role, bip, port in (
        ("proxy", options.proxy_bip, options.proxy_port),
        ("dnat", options.dnat_bip, options.dnat_port),
    ):
        try:
            iface = ipaddress.IPv4Interface(bip)
        except ValueError as exc:
            raise LabError(f"invalid --{role}-bip: {exc}") from None
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise LabError(f"--{role}-bip {bip} must be a host address of its subnet")
        daemons.append(
            LabDaemon(
                role=role,
                userland_proxy=role == "proxy",
                bridge=f"{options.prefix}-{role}",
                bip=bip,
                table=f"{options.prefix}_{role}",
                port=port,
                root=str(directory / role),
            )
        )
    return LabState(options.prefix, str(directory), options.firewall_backend, client, daemons)


# -- up ---------------------------------------------------------------------------------------


def _create_client(link: ClientLink, routes: list[str], echo: Callable[[str], None]) -> None:
    _say(echo, ["ip", "netns", "add", link.netns])
    _say(
        echo,
        ["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.ifname]
        + ["netns", link.netns],
    )
    _say(echo, ["ip", "addr", "add", f"{link.host_ip}/{link.prefixlen}", "dev", link.host_if])
    _say(echo, ["ip", "link", "set", link.host_if, "up"])
    inside = ["ip", "-n", link.netns]
    _say(echo, [*inside, "link", "set", "lo", "up"])
    _say(echo, [*inside, "addr", "add", f"{link.client_ip}/{link.prefixlen}", "dev", link.ifname])
    _say(echo, [*inside, "link", "set", link.ifname, "up"])
    # As a LAN host whose router is the engine host: the bridges are reachable, nothing else.
    for subnet in routes:
        _say(echo, [*inside, "route", "add", subnet, "via", link.host_ip])


def _delete_client(link: ClientLink) -> None:
    if _link_exists(link.host_if):
        _run(["ip", "link", "del", link.host_if])
    if _netns_exists(link.netns):
        _run(["ip", "netns", "del", link.netns])


def _daemon_argv(d: LabDaemon, backend: str) -> list[str]:
    return [
        str(BIN / "pyengined"),
        "-H",
        d.host,
        "--data-root",
        str(d.data_root),
        "--bridge",
        d.bridge,
        "--bip",
        d.bip,
        "--firewall-table",
        d.table,
        "--firewall-backend",
        backend,
        d.flag,
    ]


def _start_daemon(d: LabDaemon, backend: str, echo: Callable[[str], None]) -> int:
    argv = _daemon_argv(d, backend)
    Path(d.root).mkdir(parents=True, exist_ok=True)
    echo("+ " + " ".join(argv) + f" >{d.log_path} 2>&1 &")
    with open(d.log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=_env(),
        )
    return process.pid


def _answers(d: LabDaemon) -> bool:
    if not d.socket_path.exists():
        return False
    return _run([*d.pyengine(), "version"], timeout=10).returncode == 0


def _is_ours(d: LabDaemon) -> bool:
    """Whether ``d.pid`` is still that daemon (and not a recycled pid)."""
    if d.pid <= 0:
        return False
    try:
        args = Path(f"/proc/{d.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return d.host.encode() in args and b"zombie" not in _proc_state(d.pid)


def _proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().split(b"State:")[1].split(b"\n")[0]
    except (OSError, IndexError):
        return b""


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return bool(state) and b"zombie" not in state


def _reap(pid: int) -> None:
    """Collect the exit status when the daemon is this process's child (``up`` in-process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait_ready(d: LabDaemon) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        _reap(d.pid)
        # Not _is_ours(): right after exec(2), /proc/PID/cmdline can still read empty.
        if not _alive(d.pid):
            tail = d.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise LabError(f"pyengined ({d.role}) exited at start: {' | '.join(tail)}")
        if _answers(d):
            return
        time.sleep(0.1)
    raise LabError(f"pyengined ({d.role}) did not answer within {DAEMON_START_TIMEOUT:.0f} s")


def _image_archive(name: str, echo: Callable[[str], None]) -> Path:
    path = IMAGE_CACHE / f"{name}-oci.tar"
    if not path.exists():
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        _say(echo, [sys.executable, "-m", "engine.images.build", name, "--out", str(path)])
    return path


def up(options: LabOptions, echo: Callable[[str], None] = click.echo) -> LabState:
    """Build the lab; on any failure remove what was made and raise LabError."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, pyengined)")
    _require_tools("ip", "runc", "curl")
    lab = plan(options)
    directory = Path(lab.directory)
    if (directory / STATE_FILE).exists():
        raise LabError(f"a lab is already up in {directory} (python -m lab down)")
    subnets = {f"{d.role} bridge": ipaddress.IPv4Network(d.subnet) for d in lab.daemons}
    names = [d.bridge for d in lab.daemons]
    if lab.client is not None:
        subnets["client subnet"] = ipaddress.IPv4Network(lab.client.subnet)
        names.append(lab.client.host_if)
        if _netns_exists(lab.client.netns):
            raise LabError(f"network namespace {lab.client.netns} exists already")
    for name in names:
        if _link_exists(name):
            raise LabError(f"interface {name} exists already")
    _check_free_subnets(subnets)
    for d in lab.daemons:
        _check_free_port(d.port)
    archives = [_image_archive(name, echo) for name in LAB_IMAGES]

    directory.mkdir(parents=True, exist_ok=True)
    lab.save()  # the intent first: a failed or interrupted ``up`` is undone by ``down``
    try:
        if lab.client is not None:
            _create_client(lab.client, [d.subnet for d in lab.daemons], echo)
        for d in lab.daemons:
            d.pid = _start_daemon(d, lab.firewall_backend, echo)
            lab.save()
        for d in lab.daemons:
            _wait_ready(d)
        for d in lab.daemons:
            for archive in archives:
                _say(echo, ["pyengine", "-H", d.host, "load", "-i", str(archive)])
        lab.ready = True
        lab.save()
    except BaseException:
        down(directory, echo=lambda _line: None)
        raise
    return lab


# -- down -------------------------------------------------------------------------------------


def _stop_daemon(d: LabDaemon) -> list[str]:
    """Remove the daemon's containers, then stop it; returns the containers' short ids."""
    if not _is_ours(d):
        return []
    ids: list[str] = []
    if _answers(d):
        ids = _run([*d.pyengine(), "ps", "-a", "-q"]).stdout.split()
        if ids:
            _run([*d.pyengine(), "rm", "-f", *ids])
    os.kill(d.pid, signal.SIGTERM)
    deadline = time.monotonic() + DAEMON_STOP_TIMEOUT
    while time.monotonic() < deadline:
        _reap(d.pid)
        if not _is_ours(d):
            return ids
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(d.pid, signal.SIGKILL)
    _reap(d.pid)
    return ids


def _processes_under(root: Path) -> list[int]:
    """The daemon and container monitors working under ``root`` (their arguments name it)."""
    prefix = str(root)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ours = any(a.endswith("/pyengined") for a in args[:2]) or "engine.runtime.monitor" in args
        paths = (a.removeprefix("unix://") for a in args)
        if ours and any(a == prefix or a.startswith(f"{prefix}/") for a in paths):
            found.append(int(entry.name))
    return found


def _restart_for_shutdown(lab: LabState, d: LabDaemon) -> None:
    """A daemon that died leaves containers, namespaces and rules behind; the daemon's own
    recovery (netd's setup(), the engine's recover()) knows them, so start it once more and
    let the normal shutdown remove them."""
    if not d.data_root.exists():
        return
    d.pid = _start_daemon(d, lab.firewall_backend, lambda _line: None)
    try:
        _wait_ready(d)
    except LabError:
        _stop_daemon(d)


def _remove_daemon_leftovers(lab: LabState, d: LabDaemon) -> None:
    """What a daemon that could not shut down cleanly left: its containers' processes, its
    bridge, its firewall and its mounts (all named after the lab or under its directory)."""
    runc_root = d.data_root / "runc"
    if runc_root.is_dir():
        for container in _run(["runc", "--root", str(runc_root), "list", "-q"]).stdout.split():
            _run(["runc", "--root", str(runc_root), "delete", "--force", container])
    for pid in _processes_under(Path(d.root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if _link_exists(d.bridge):
        _run(["ip", "link", "del", d.bridge])
    with contextlib.suppress(Exception):
        firewall = make_firewall(lab.firewall_backend, d.table, d.userland_proxy)
        if firewall.installed():
            firewall.uninstall()
    for point in mounts_under(Path(d.root)):
        _run(["umount", "-l", point])


def leftovers(lab: LabState, containers: Iterable[str] = ()) -> list[str]:
    """Kernel objects and processes of the lab that still exist; ``containers``: ids of the
    lab's containers, whose namespaces and veths pyengined names after them (netd/naming.py)."""
    found = []
    for short_id in containers:
        if _netns_exists(f"pyengine-{short_id[:12]}"):
            found.append(f"netns pyengine-{short_id[:12]}")
        if _link_exists(f"pye{short_id[:10]}"):
            found.append(f"link pye{short_id[:10]}")
    links = json.loads(_check(["ip", "-j", "link"]) or "[]")
    for link in links:
        if link.get("ifname", "").startswith(f"{lab.prefix}-"):
            found.append(f"link {link['ifname']}")
    for ns in json.loads(_check(["ip", "-j", "netns", "list"]) or "[]"):
        if ns.get("name", "").startswith(f"{lab.prefix}-"):
            found.append(f"netns {ns['name']}")
    for d in lab.daemons:
        with contextlib.suppress(Exception):
            if make_firewall(lab.firewall_backend, d.table, d.userland_proxy).installed():
                found.append(f"{lab.firewall_backend} {d.table}")
        found += [f"process {pid} of {d.role}" for pid in _processes_under(Path(d.root))]
        found += [f"mount {m}" for m in mounts_under(Path(d.root))]
    return found


def down(directory: Path, echo: Callable[[str], None] = click.echo) -> list[str]:
    """Remove the lab in ``directory``: containers, daemons, client, files. Returns what could
    not be removed (empty: everything is gone)."""
    directory = directory.resolve()
    lab = LabState.load(directory)
    containers: list[str] = []
    for d in lab.daemons:
        echo(f"stopping pyengined ({d.role}) and its containers")
        if d.pid and not _is_ours(d):
            echo(f"pyengined ({d.role}) is not running: starting it again to clean up")
            _restart_for_shutdown(lab, d)
        containers += _stop_daemon(d)
        _remove_daemon_leftovers(lab, d)
    if lab.client is not None:
        echo(f"removing {lab.client.netns} and {lab.client.host_if}")
        _delete_client(lab.client)
    left = leftovers(lab, containers)
    if left:
        return left
    for d in lab.daemons:
        shutil.rmtree(d.root, ignore_errors=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()  # only when nothing else is in it
    return []


# -- status -----------------------------------------------------------------------------------


def status_text(lab: LabState) -> str:
    out = [f"lab {lab.prefix} in {lab.directory} ({lab.firewall_backend})"]
    if not lab.ready:
        out.append("  NOT READY: 'up' did not finish; run 'down'")
    c = lab.client
    if c is None:
        out.append("client: none (--no-client: the client is another machine)")
    else:
        ns_ok = "present" if _netns_exists(c.netns) else "MISSING"
        if_ok = "present" if _link_exists(c.host_if) else "MISSING"
        out.append(f"client: netns {c.netns} ({ns_ok}), {c.ifname} {c.client_ip}/{c.prefixlen}")
        out.append(f"  host end: {c.host_if} {c.host_ip}/{c.prefixlen} ({if_ok})")
    for d in lab.daemons:
        alive = _is_ours(d)
        answering = alive and _answers(d)
        state = "answering" if answering else ("NOT ANSWERING" if alive else "NOT RUNNING")
        out.append(f"{d.role}: pyengined {d.flag} pid {d.pid} {state}")
        bridge = "present" if _link_exists(d.bridge) else "MISSING"
        out.append(f"  bridge {d.bridge} {d.bip} ({bridge}), table {d.table}, port {d.port}")
        out.append(f"  pyengine -H {d.host}")
        out.append(f"  data root {d.data_root}, log {d.log_path}")
        if answering:
            ps = _run([*d.pyengine(), "ps"]).stdout.rstrip()
            out += ["  " + line for line in ps.splitlines()]
    return "\n".join(out) + "\n"


# -- exercises --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A shell command of an exercise, a template filled from the lab (``{c.host_ip}``,
    ``{d.port}``, ``{d.web_ip}`` ...). Several lines run in one bash, as one terminal would."""

    text: str
    quiet: bool = False  # run, but show neither it nor its output (waiting for readiness)
    may_fail: bool = False  # a non-zero exit status is part of the lesson
    backend: str | None = None  # only in a lab of this firewall backend


@dataclass(frozen=True)
class Capture:
    """``tcpdump`` (with ``-c N``: it stops by itself) started first and running while
    ``traffic`` runs; its output is shown before the traffic's commands, as in a terminal of
    its own."""

    tcpdump: str
    traffic: tuple[Command, ...]


Step = Command | Capture


@dataclass(frozen=True)
class Section:
    title: str
    steps: tuple[Step, ...]
    role: str | None = None  # the daemon ``{d}`` stands for
    needs_client: bool = False


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str
    sections: tuple[Section, ...]
    tools: tuple[str, ...] = ("curl",)  # on PATH, checked before anything runs


@dataclass
class StepResult:
    commands: list[str]  # the shell lines, filled in
    output: str
    returncode: int


@dataclass
class SectionResult:
    title: str
    steps: list[StepResult] = field(default_factory=list)
    skipped: str = ""


class DaemonView:
    """``{d.…}`` in a template: the daemon's fields, plus its web container's address."""

    def __init__(self, daemon: LabDaemon) -> None:
        self._daemon = daemon

    def __getattr__(self, name: str) -> Any:
        return getattr(self._daemon, name)

    @property
    def pyengine(self) -> str:
        return f"pyengine -H {self._daemon.host}"

    @property
    def iptables_prefix(self) -> str:
        return self._daemon.table.upper()

    @cached_property
    def web_ip(self) -> str:
        result = _run([*self._daemon.pyengine(), "inspect", WEB])
        if result.returncode != 0:
            raise LabError(
                f"no {WEB} container in the {self._daemon.role} daemon: "
                "run 'python -m lab exercise publish' first"
            )
        data = json.loads(result.stdout)
        return str(data[0]["NetworkSettings"]["IPAddress"])


# Stands for the client in titles when the client is another machine (``up --no-client``).
_ELSEWHERE = ClientLink("(client)", "(link)", "0.0.0.0/0", "<engine address>", "<client address>")


def _fill(text: str, lab: LabState, daemon: LabDaemon | None) -> str:
    return text.format(
        c=lab.client or _ELSEWHERE,
        d=DaemonView(daemon) if daemon else None,
        lab=lab,
        proxy=DaemonView(lab.daemon("proxy")),
        dnat=DaemonView(lab.daemon("dnat")),
    )


def _shell(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
        cwd=REPO,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, int]:
    try:
        out, _ = process.communicate(timeout=timeout)
        return out, process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return out + f"\n(stopped after {timeout:.0f} s)\n", -signal.SIGKILL


def run_shell(script: str) -> StepResult:
    """Run ``script`` in bash as an exercise does (PATH, working directory, time limit)."""
    out, rc = _finish(_shell(script), COMMAND_TIMEOUT)
    return StepResult(script.splitlines(), out, rc)


@contextlib.contextmanager
def _tcpdump(command: str) -> Iterator[Callable[[], StepResult]]:
    """Start ``command`` (a tcpdump) and wait until it listens; yield a function that waits
    for it to stop (after its ``-c`` packets) and returns what it printed."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    stderr_lines: list[str] = []
    listening = threading.Event()

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            stderr_lines.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()  # EOF: it exited, whatever the reason

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()

    def collect() -> StepResult:
        try:
            out, _ = process.communicate(timeout=CAPTURE_TIMEOUT)
            note = ""
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            out, _ = process.communicate()
            note = f"(tcpdump stopped after {CAPTURE_TIMEOUT:.0f} s: fewer packets than -c)\n"
        reader.join(timeout=5)
        rc = process.returncode if not note else 1
        if rc != 0:
            out += "".join(stderr_lines)
        return StepResult([command], out + note, rc)

    try:
        if not listening.wait(CAPTURE_READY_TIMEOUT) or process.poll() is not None:
            process.kill()
            process.wait()
            raise LabError(f"tcpdump did not start: {''.join(stderr_lines).strip()}")
        yield collect
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_section(lab: LabState, section: Section) -> SectionResult:
    daemon = lab.daemon(section.role) if section.role else None
    title = _fill(section.title, lab, daemon)
    result = SectionResult(title)
    if section.needs_client and lab.client is None:
        result.skipped = "no client namespace in this lab (--no-client): run it on the client"
        return result
    for step in section.steps:
        if isinstance(step, Command) and step.backend not in (None, lab.firewall_backend):
            continue
        if isinstance(step, Command):
            done = run_shell(_fill(step.text, lab, daemon))
            if not step.quiet:
                result.steps.append(done)
            if done.returncode != 0 and not step.may_fail:
                raise ExerciseFailed(result, done)
            continue
        _require_tools("tcpdump")
        with _tcpdump(_fill(step.tcpdump, lab, daemon)) as collect:
            traffic = []
            for command in step.traffic:
                done = run_shell(_fill(command.text, lab, daemon))
                traffic.append(done)
                if done.returncode != 0 and not command.may_fail:
                    result.steps += traffic
                    raise ExerciseFailed(result, done)
            captured = collect()
        result.steps.append(captured)
        result.steps += traffic
        if captured.returncode != 0:
            raise ExerciseFailed(result, captured)
    return result


class ExerciseFailed(LabError):
    def __init__(self, partial: SectionResult, step: StepResult) -> None:
        super().__init__(f"{step.commands[0]} exited {step.returncode}")
        self.partial = partial
        self.step = step


def render_step(step: StepResult) -> str:
    lines = [f"$ {line}" for line in step.commands]
    body = step.output.rstrip("\n")
    return "\n".join(lines) + ("\n" + body if body else "") + "\n"


def render_section(section: SectionResult) -> str:
    out = [f"## {section.title}", ""]
    if section.skipped:
        return "\n".join(out + [f"({section.skipped})", ""])
    for step in section.steps:
        out.append(render_step(step))
    return "\n".join(out)


def run_exercise(
    lab: LabState, exercise: Exercise, echo: Callable[[str], None] = click.echo
) -> list[SectionResult]:
    """Run every section, echoing each as it completes; raise ExerciseFailed on a failure."""
    if not lab.ready:
        raise LabError("the lab is not ready ('up' did not finish); run 'down', then 'up'")
    _require_tools(*exercise.tools)
    echo(f"# {exercise.name}: {exercise.title}\n")
    results = []
    for section in exercise.sections:
        try:
            done = run_section(lab, section)
        except ExerciseFailed as failed:
            echo(render_section(failed.partial))
            raise
        results.append(done)
        echo(render_section(done))
    return results


# -- the exercises of docs/lab.md -------------------------------------------------------------

_WAIT_FOR_WEB = Command(
    "for i in $(seq 300); do "
    "curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:{d.port}/ && break; sleep 0.1; done",
    quiet=True,
)
_SYN_FILTER = "'tcp[tcpflags] & tcp-syn != 0 and (tcp port {d.port} or net {d.subnet})'"


def _per_mode(
    title: str, steps: Callable[[str], tuple[Step, ...]], needs_client: bool = False
) -> tuple[Section, ...]:
    return tuple(
        Section(title, steps(role), role=role, needs_client=needs_client) for role in ROLES
    )


def _publish_steps(role: str) -> tuple[Step, ...]:
    return (
        Command("{d.pyengine} rm -f web", quiet=True, may_fail=True),
        Command("{d.pyengine} run -d --name web -p {d.port}:80 nginx"),
        _WAIT_FOR_WEB,
        Command("{d.pyengine} ps"),
        Command("{d.pyengine} port web"),
        Command("{d.pyengine} inspect web | grep -m1 '\"IPAddress\"'"),
    )


def _reach_steps(role: str) -> tuple[Step, ...]:
    fmt = "'%{{http_code}} from %{{remote_ip}}:%{{remote_port}}\\n'"
    return (
        Command(
            f"ip netns exec {{c.netns}} curl -sS -o /dev/null -w {fmt} "
            "http://{c.host_ip}:{d.port}/"
        ),
        Command(f"curl -sS -o /dev/null -w {fmt} http://127.0.0.1:{{d.port}}/"),
    )


PUBLISH = Exercise(
    "publish",
    "publish nginx's port 80 in each proxy mode",
    _per_mode("{d.mode} (pyengined {d.flag}): publish", _publish_steps)
    + _per_mode("{d.mode}: reach it from the client and from the host", _reach_steps, True),
)

_CURL_CLIENT = Command("ip netns exec {c.netns} curl -sS -o /dev/null http://{c.host_ip}:{d.port}/")
_CURL_LOOPBACK = Command("curl -sS -o /dev/null http://127.0.0.1:{d.port}/")

PACKETS = Exercise(
    "packets",
    "watch the SYN and SYN-ACK of one connection on every interface",
    (
        Section(
            "{d.mode}: the client connects to {c.host_ip}:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 6 {_SYN_FILTER}", (_CURL_CLIENT,)),),
            role="dnat",
            needs_client=True,
        ),
        Section(
            "{d.mode}: the client connects to {c.host_ip}:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 6 {_SYN_FILTER}", (_CURL_CLIENT,)),),
            role="proxy",
            needs_client=True,
        ),
        Section(
            "{d.mode}: the host connects to 127.0.0.1:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 6 {_SYN_FILTER}", (_CURL_LOOPBACK,)),),
            role="proxy",
        ),
        Section(
            "{d.mode}: the host connects to 127.0.0.1:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 4 {_SYN_FILTER}", (_CURL_LOOPBACK,)),),
            role="dnat",
        ),
    ),
    tools=("curl", "tcpdump"),
)


def _tracked(flow: str, traffic: Command, *also: str) -> tuple[Step, ...]:
    """Forget the earlier entries of ``flow`` (conntrack(8) filters), make one connection,
    then list its entry and those of the ``also`` filters."""
    return (
        Command(f"conntrack -D -p tcp {flow} 2>&1 >/dev/null | tail -n 1"),
        *(Command(f"conntrack -D -p tcp {more} 2>&1 >/dev/null | tail -n 1") for more in also),
        traffic,
        Command(f"conntrack -L -p tcp {flow} 2>/dev/null"),
        *(Command(f"conntrack -L -p tcp {more} 2>/dev/null") for more in also),
    )


CONNTRACK = Exercise(
    "conntrack",
    "the connection tracking entries behind each path",
    (
        Section(
            "{d.mode}: the client's connection, DNATed",
            _tracked("--orig-src {c.client_ip} --dport {d.port}", _CURL_CLIENT),
            role="dnat",
            needs_client=True,
        ),
        Section(
            "{d.mode}: a loopback connection, DNATed and masqueraded",
            _tracked("--orig-src 127.0.0.1 --dport {d.port}", _CURL_LOOPBACK),
            role="dnat",
        ),
        Section(
            "{d.mode}: a loopback connection is two connections, with no NAT",
            _tracked(
                "--orig-src 127.0.0.1 --dport {d.port}",
                _CURL_LOOPBACK,
                "--orig-dst {d.web_ip} --dport 80",
            ),
            role="proxy",
        ),
    ),
    tools=("curl", "conntrack"),
)


_NETD_STATUS = Command("python -m netd status --data-root {d.data_root}")
_FIREWALL_COUNTERS = (
    Command("nft list chain inet {d.table} raw_prerouting", backend="nftables"),
    Command("iptables -t raw -L {d.iptables_prefix}-PREROUTING -v -n", backend="iptables"),
    Command("iptables -t nat -L {d.iptables_prefix}-DNAT -v -n", backend="iptables"),
)

COUNTERS = Exercise(
    "counters",
    "the firewall netd installed, and its counters",
    (
        Section("{d.mode}: what netd installed, live from the kernel", (_NETD_STATUS,), "dnat"),
        Section(
            "{d.mode}: the client routes straight to the container: dropped, and counted",
            (
                _CURL_CLIENT,
                Command(
                    "ip netns exec {c.netns} curl -sS --max-time 2 -o /dev/null http://{d.web_ip}/",
                    may_fail=True,
                ),
                *_FIREWALL_COUNTERS,
            ),
            role="dnat",
            needs_client=True,
        ),
        Section("{d.mode}: what netd installed, live from the kernel", (_NETD_STATUS,), "proxy"),
    ),
    tools=("curl",),
)

_HOLD_CONNECTION = (
    "exec 3<>/dev/tcp/127.0.0.1/{d.port}\n"
    "printf 'GET / HTTP/1.1\\r\\nHost: lab\\r\\n\\r\\n' >&3\n"
    'read -r status <&3; echo "$status"\n'
    "ss -tnp state established "
    "'( sport = :{d.port} or dport = :{d.port} or dst {d.web_ip} )' 3<&-\n"
    "exec 3<&-"
)

PROXY = Exercise(
    "proxy",
    "who holds the published port, and the proxy's connections",
    _per_mode(
        "{d.mode}: listening sockets, then one kept-alive HTTP connection over 127.0.0.1",
        lambda role: (
            Command("ss -tlnp '( sport = :{d.port} )'"),
            Command(_HOLD_CONNECTION),
        ),
    ),
    tools=("ss",),
)


def _address_steps(role: str) -> tuple[Step, ...]:
    return (
        Command(
            "ip netns exec {c.netns} curl -sS -o /dev/null -A lab-client-netns "
            "http://{c.host_ip}:{d.port}/"
        ),
        Command("curl -sS -o /dev/null -A lab-host-loopback http://127.0.0.1:{d.port}/"),
        Command("curl -sS -o /dev/null -A lab-host-veth http://{c.host_ip}:{d.port}/"),
        Command(
            "{d.pyengine} run --rm busybox wget -q -O /dev/null -U lab-container "
            "http://{c.host_ip}:{d.port}/"
        ),
        Command("{d.pyengine} logs web 2>/dev/null | grep ' \"lab-' | tail -n 4"),
    )


CLIENT_ADDRESS = Exercise(
    "client-address",
    "the client address nginx logs, per client and per mode",
    _per_mode("{d.mode}: four clients, then nginx's access log", _address_steps, True),
)


def _bench_steps(role: str) -> tuple[Step, ...]:
    ab = "ab -q -t 2 -n 1000000 -c 4 {url} 2>&1 | grep -E '^(Complete|Failed|Requests per)'"
    return (
        Command(ab.format(url="http://127.0.0.1:{d.port}/")),
        Command("ip netns exec {c.netns} " + ab.format(url="http://{c.host_ip}:{d.port}/")),
    )


BENCH = Exercise(
    "bench",
    "a short load on each path (ab, 2 s each)",
    _per_mode("{d.mode}: from the host's loopback, then from the client", _bench_steps, True),
    tools=("ab",),
)

EXERCISES: dict[str, Exercise] = {
    e.name: e for e in (PUBLISH, PACKETS, CONNTRACK, COUNTERS, PROXY, CLIENT_ADDRESS, BENCH)
}


# -- the command line -------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dir",
    "directory",
    envvar="PYENGINE_LAB_DIR",
    default=str(DEFAULT_DIR),
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the lab keeps its state, daemons' data, sockets and logs (PYENGINE_LAB_DIR).",
)
@click.pass_context
def main(ctx: click.Context, directory: Path) -> None:
    """The namespace lab: a client namespace and two pyengined daemons (userland proxy and
    kernel DNAT) on this machine, for the exercises of docs/lab.md."""
    ctx.obj = directory


@main.command("up")
@click.option("--prefix", default=LabOptions.prefix, show_default=True, help="Names' prefix.")
@click.option("--client-subnet", default=LabOptions.client_subnet, show_default=True)
@click.option("--proxy-bip", default=LabOptions.proxy_bip, show_default=True)
@click.option("--dnat-bip", default=LabOptions.dnat_bip, show_default=True)
@click.option("--proxy-port", type=int, default=LabOptions.proxy_port, show_default=True)
@click.option("--dnat-port", type=int, default=LabOptions.dnat_port, show_default=True)
@click.option(
    "--firewall-backend",
    type=click.Choice(BACKENDS),
    default=LabOptions.firewall_backend,
    show_default=True,
)
@click.option(
    "--no-client", is_flag=True, help="No client namespace (the client is another machine)."
)
@click.pass_context
def up_command(
    ctx: click.Context,
    prefix: str,
    client_subnet: str,
    proxy_bip: str,
    dnat_bip: str,
    proxy_port: int,
    dnat_port: int,
    firewall_backend: str,
    no_client: bool,
) -> None:
    """Create the client namespace, start both daemons and load the images."""
    options = LabOptions(
        directory=ctx.obj,
        prefix=prefix,
        client_subnet=client_subnet,
        proxy_bip=proxy_bip,
        dnat_bip=dnat_bip,
        proxy_port=proxy_port,
        dnat_port=dnat_port,
        firewall_backend=firewall_backend,
        with_client=not no_client,
    )
    try:
        lab = up(options)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo()
    click.echo(status_text(lab), nl=False)


@main.command("down")
@click.pass_context
def down_command(ctx: click.Context) -> None:
    """Remove the lab's containers, daemons, namespace, links and files."""
    try:
        left = down(ctx.obj)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    if left:
        raise click.ClickException("still there: " + ", ".join(left))
    click.echo("lab removed")


@main.command("status")
@click.pass_context
def status_command(ctx: click.Context) -> None:
    """Show the lab's namespace, links, daemons and containers."""
    try:
        click.echo(status_text(LabState.load(ctx.obj)), nl=False)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("exercise")
@click.argument("name", type=click.Choice([*EXERCISES, "all"]))
@click.pass_context
def exercise_command(ctx: click.Context, name: str) -> None:
    """Run one exercise of docs/lab.md (or all, in order) and show commands and output."""
    try:
        lab = LabState.load(ctx.obj)
        for exercise in EXERCISES.values() if name == "all" else [EXERCISES[name]]:
            run_exercise(lab, exercise)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main(prog_name="python -m lab")
