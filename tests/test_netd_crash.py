"""Crash safety of netd: a process running a scripted sequence of network operations is killed
with SIGKILL at many points, and the next ``setup()`` must leave exactly the right kernel
objects: every network, endpoint, namespace and mapping the state describes, nothing else.

Two ways to pick the points, on both firewall backends:

* deterministic: the child kills itself right before its N-th side effect (a state write, a
  namespace, veth, bridge, route or firewall change), for N across the whole script;
* timed: the parent kills the child's process group N ms after it is ready, for N spread over
  every step's duration, so kills also land inside a side effect (between two netlink
  messages, in the middle of an iptables-restore run).

After each kill a fresh controller (the restarted daemon) runs ``setup()``; then the test checks
(1) the state equals what the script had reached before the step in flight, or after it: an
interrupted creation is rolled back, an interrupted removal is carried through; (2) the kernel
matches the state exactly: bridges with their address, bridge ports, namespaces and their
interfaces, addresses and default route, the veths, the NAT mappings and the bridges the
firewall names, and each published host port is held again; (3) nothing else carries the test's
prefix. Some kills are followed by a second kill during the recovering ``setup()`` itself.

Run as ``python -m tests.test_netd_crash '<json>'`` this module is the child.

Kernel objects: bridges ``pyecrash0`` (default, 10.58.0.1/24), ``pyecrash-a`` (automatic subnet
from 10.58.4.0/22), ``pyecrash-b`` (10.58.8.0/24), ``pyecrash-c`` (internal); namespaces
``pyecrash-<id>``; nftables table ``inet pyecrash`` or iptables chains ``PYECRASH-*``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.jsonstate import read_json
from common.ports import parse_publish
from netd import bridge as netd_bridge
from netd import sandbox as netd_sandbox
from netd.controller import NetdConfig, NetworkController
from netd.firewall import make_firewall
from netd.naming import host_veth_name
from netd.state import NetdState
from tests.conftest import require_root, require_tool
from tests.netns_helpers import (
    bridge_ports,
    firewall_installed,
    free_port_block,
    iptables_owned_lines,
    kernel_mappings,
    link_exists,
    links_with_prefix,
    netns_with_prefix,
    remove_firewall,
    remove_link,
    remove_netns,
    run,
)

REPO = Path(__file__).resolve().parent.parent
PREFIX = "pyecrash"
NETNS_PREFIX = "pyecrash-"
DEFAULT_BRIDGE = "pyecrash0"
TABLE = "pyecrash"
CONTAINERS = {
    "C1": "c1a55e01" * 8,
    "C2": "c2a55e02" * 8,
    "C3": "c3a55e03" * 8,
}
START_TIMEOUT = 60.0  # seconds for the child to import and set up
SCRIPT_TIMEOUT = 180.0  # seconds for a whole script run (a loaded 2-core machine)
DETERMINISTIC_KILLS = 16  # kill points before a side effect, per backend
SECOND_KILL_EVERY = 3  # every third kill also kills the recovering setup()

# The script: (operation, arguments). Host ports P1..P4 are filled in by the parent.
SCRIPT: list[tuple[str, dict[str, Any]]] = [
    (
        "create_network",
        {"name": "crash-a", "options": {"com.docker.network.bridge.name": "pyecrash-a"}},
    ),
    (
        "create_network",
        {
            "name": "crash-b",
            "subnet": "10.58.8.0/24",
            "options": {
                "com.docker.network.bridge.name": "pyecrash-b",
                "com.docker.network.bridge.enable_icc": "false",
            },
        },
    ),
    ("connect", {"container": "C1", "network": "crash-a"}),
    ("publish", {"container": "C1", "specs": ["{P1}:80", "127.0.0.1:{P2}:53/udp"]}),
    ("connect", {"container": "C1", "network": "crash-b"}),
    ("connect", {"container": "C2", "network": "crash-b", "ip": "10.58.8.50"}),
    ("create_endpoint", {"container": "C3"}),
    ("publish", {"container": "C3", "specs": ["{P3}:8080"]}),
    ("disconnect", {"container": "C1", "network": "crash-a"}),
    (
        "create_network",
        {
            "name": "crash-c",
            "internal": True,
            "options": {"com.docker.network.bridge.name": "pyecrash-c"},
        },
    ),
    ("connect", {"container": "C2", "network": "crash-c"}),
    ("delete_endpoint", {"container": "C3"}),
    ("publish", {"container": "C1", "specs": ["{P4}:81"]}),
    ("delete_endpoint", {"container": "C2"}),
    ("remove_network", {"ref": "crash-c"}),
    ("unpublish", {"container": "C1"}),
    ("remove_network", {"ref": "crash-a"}),
]  # fmt: skip


def config(data_root: Path, backend: str, proxy: bool) -> NetdConfig:
    return NetdConfig(
        data_root=data_root,
        bridge=DEFAULT_BRIDGE,
        bridge_cidr="10.58.0.1/24",
        table=TABLE,
        userland_proxy=proxy,
        firewall_backend=backend,
        netns_prefix=NETNS_PREFIX,
        address_pools=(("10.58.4.0/22", 24),),
    )


def run_step(ctrl: NetworkController, op: str, args: dict[str, Any], ports: dict[str, int]) -> None:
    cid = CONTAINERS.get(args.get("container", ""), "")
    if op == "create_network":
        ctrl.create_network(**args)
    elif op == "remove_network":
        ctrl.remove_network(args["ref"])
    elif op == "connect":
        ctrl.connect(cid, args["network"], ip=args.get("ip"))
    elif op == "create_endpoint":
        ctrl.create_endpoint(cid)
    elif op == "disconnect":
        ctrl.disconnect(cid, args["network"])
    elif op == "delete_endpoint":
        ctrl.delete_endpoint(cid)
    elif op == "publish":
        specs = [spec.format(**{k: v for k, v in ports.items()}) for spec in args["specs"]]
        [first, *_] = ctrl.container_endpoints(cid)
        ctrl.publish(cid, first, [b for spec in specs for b in parse_publish(spec)])
    elif op == "unpublish":
        ctrl.unpublish(cid)
    else:
        raise ValueError(op)


def logical_state(ctrl: NetworkController) -> dict[str, list[Any]]:
    """What the controller says exists, in terms stable across runs (names, not random ids)."""
    names = {v: k for k, v in CONTAINERS.items()}
    sandboxes = ctrl.sandboxes()
    return {
        "networks": sorted(
            [n.name, n.bridge, n.subnet, n.gateway, n.internal, n.enable_icc]
            for n in ctrl.networks()
        ),
        "sandboxes": sorted(names[cid] for cid in sandboxes),
        "endpoints": sorted(
            [names[cid], ep.network_name, ep.ifname, ep.ip]
            for cid in sandboxes
            for ep in ctrl.container_endpoints(cid)
        ),
        "ports": sorted(
            [names[cid], p.proto, p.host_ip, p.host_port, p.container_ip, p.container_port]
            for cid in sandboxes
            for p in ctrl.published(cid)
        ),
    }


# -- the child ---------------------------------------------------------------------------------


def _install_crash_hook(
    crash_at: int, progress: Callable[[str], None], firewall_class: type
) -> Callable[[], int]:
    """SIGKILL this process right before its ``crash_at``-th side effect (1-based; 0: never):
    a state write, or a namespace, link, route, bridge or firewall change. Returns a function
    counting the side effects so far."""
    calls = 0

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def hooked(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == crash_at:
                progress(f"crash {name}")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(owner, name, hooked)

    for name in (
        "create_netns",
        "delete_netns",
        "delete_link",
        "connect_netns_to_bridge",
        "plug_into_bridge",
        "set_default_route",
    ):
        wrap(netd_sandbox, name)
    for name in ("ensure_bridge", "delete_bridge"):
        wrap(netd_bridge, name)
    for name in ("install", "add_mappings", "remove_mappings"):
        wrap(firewall_class, name)
    wrap(NetdState, "save")
    return lambda: calls


def child_main(params: dict[str, Any]) -> None:
    fd = os.open(params["progress"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def progress(line: str) -> None:
        os.write(fd, f"{time.monotonic():.6f} {line}\n".encode())

    cfg = config(Path(params["data_root"]), params["backend"], params["proxy"])
    firewall_class = type(make_firewall(cfg.firewall_backend, cfg.table, cfg.userland_proxy))
    ctrl = NetworkController(cfg)
    if params["phase"] == "recover":
        # A second crash, inside the recovering setup() itself.
        _install_crash_hook(params["crash_at"], progress, firewall_class)
        progress("ready")
        ctrl.setup()
        progress("finished")
    else:
        ctrl.setup()
        effects = _install_crash_hook(params["crash_at"], progress, firewall_class)
        if params["snapshots"]:
            progress(f"snap -1 {json.dumps(logical_state(ctrl))}")
        progress("ready")
        for index, (op, args) in enumerate(SCRIPT):
            progress(f"start {index}")
            run_step(ctrl, op, args, params["ports"])
            progress(f"done {index}")
            if params["snapshots"]:
                progress(f"snap {index} {json.dumps(logical_state(ctrl))}")
        progress(f"effects {effects()}")
        progress("finished")
    # Hold the sockets like a daemon would, until the parent kills the process group.
    deadline = time.monotonic() + SCRIPT_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.5)


# -- the parent: running and killing children ------------------------------------------------


@dataclass
class Progress:
    """What a child reported before it died: (monotonic time, line) pairs."""

    lines: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Progress:
        lines = []
        if path.exists():
            for raw in path.read_text().splitlines():
                stamp, _, line = raw.partition(" ")
                lines.append((float(stamp), line))
        return cls(lines)

    def has(self, line: str) -> bool:
        return any(text == line for _t, text in self.lines)

    def time_of(self, line: str) -> float:
        return next(t for t, text in self.lines if text == line)

    @property
    def done(self) -> int:
        """How many script steps completed."""
        return sum(1 for _t, text in self.lines if text.startswith("done "))

    @property
    def in_flight(self) -> int | None:
        """The step that had started and not completed when the child died."""
        started = sum(1 for _t, text in self.lines if text.startswith("start "))
        return started - 1 if started > self.done else None

    def snapshots(self) -> list[dict[str, Any]]:
        result = []
        for _t, text in self.lines:
            if text.startswith("snap "):
                _snap, _index, payload = text.split(" ", 2)
                result.append(json.loads(payload))
        return result


def _wait_for(path: Path, line: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the child reported ``line`` within ``timeout`` (False if it died first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Progress.read(path).has(line):
            return True
        if proc.poll() is not None:
            return Progress.read(path).has(line)
        time.sleep(0.01)
    raise AssertionError(f"the child did not report {line!r} within {timeout} s")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child and every helper it forked (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def run_child(
    tmp: Path,
    data_root: Path,
    backend: str,
    proxy: bool,
    ports: dict[str, int],
    phase: str = "script",
    crash_at: int = 0,
    kill_after: float | None = None,
    snapshots: bool = False,
) -> Progress:
    """Run the child until it crashes itself (``crash_at``), is killed ``kill_after``
    seconds after it is ready, or finishes (then it is killed as well)."""
    progress_file = tmp / f"progress-{time.monotonic_ns()}"
    params = {
        "data_root": str(data_root),
        "backend": backend,
        "proxy": proxy,
        "ports": ports,
        "phase": phase,
        "crash_at": crash_at,
        "progress": str(progress_file),
        "snapshots": snapshots,
    }
    log = open(tmp / "child.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_netd_crash", json.dumps(params)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if _wait_for(progress_file, "ready", proc, START_TIMEOUT):
            if kill_after is not None:
                time.sleep(kill_after)
            else:
                _wait_for(progress_file, "finished", proc, SCRIPT_TIMEOUT)
    finally:
        _kill_group(proc)
        log.close()
    progress = Progress.read(progress_file)
    crashed = any(text.startswith("crash ") for _t, text in progress.lines)
    if not crashed and kill_after is None and not progress.has("finished"):
        raise AssertionError(f"the child failed:\n{(tmp / 'child.log').read_text()[-3000:]}")
    return progress


# -- the parent: what the kernel must hold -----------------------------------------------------


def _addresses(netns: str | None, ifname: str | None = None) -> dict[str, list[str]]:
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "addr", "show"]
    if ifname:
        argv += ["dev", ifname]
    return {
        link["ifname"]: [
            f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"
        ]
        for link in json.loads(run(*argv))
    }


def _default_routes(netns: str) -> list[tuple[str, str]]:
    routes = json.loads(run("ip", "-n", netns, "-j", "route", "show", "default"))
    return [(r["gateway"], r["dev"]) for r in routes]


def _veth_candidates() -> set[str]:
    """Every host veth name the script's containers can have."""
    return {host_veth_name(cid, index) for cid in CONTAINERS.values() for index in range(4)}


def _port_is_held(proto: str, host_ip: str, port: int) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    with socket.socket(family, kind) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host_ip, port))
        except OSError:
            return True
    return False


def _firewall_names(backend: str, bridge: str) -> bool:
    """Whether the installed rules mention ``bridge`` (read with nft / iptables-save)."""
    if backend == "nftables":
        return f'"{bridge}"' in run("nft", "list", "table", "inet", TABLE)
    owned = "\n".join(iptables_owned_lines(TABLE))
    return re.search(rf"-[io] {re.escape(bridge)}( |$)", owned, re.M) is not None


def assert_kernel_matches(ctrl: NetworkController, cfg: NetdConfig) -> None:
    """The kernel holds exactly what the controller's state describes, and nothing else with
    the test's names."""
    networks = ctrl.networks()
    sandboxes = ctrl.sandboxes()
    endpoints = [ep for cid in sandboxes for ep in ctrl.container_endpoints(cid)]
    by_network = {n.id: n for n in networks}

    assert links_with_prefix(PREFIX) == sorted(n.bridge for n in networks)
    for net in networks:
        link = json.loads(run("ip", "-j", "link", "show", "dev", net.bridge))[0]
        assert "UP" in link["flags"], net.bridge
        assert _addresses(None, net.bridge) == {net.bridge: [str(net.interface)]}
        assert bridge_ports(net.bridge) == sorted(
            ep.host_veth for ep in endpoints if ep.network_id == net.id
        )
    assert {v for v in _veth_candidates() if link_exists(v)} == {ep.host_veth for ep in endpoints}
    for ep in endpoints:
        brport = Path(f"/sys/class/net/{ep.host_veth}/brport")
        isolated = "0" if by_network[ep.network_id].enable_icc else "1"
        assert (brport / "isolated").read_text().strip() == isolated
        hairpin = "0" if cfg.userland_proxy else "1"
        assert (brport / "hairpin_mode").read_text().strip() == hairpin

    assert netns_with_prefix(NETNS_PREFIX) == sorted(sb.netns_name for sb in sandboxes.values())
    for cid, sb in sandboxes.items():
        mine = ctrl.container_endpoints(cid)
        assert _addresses(sb.netns_name) == {
            "lo": ["127.0.0.1/8"],
            **{ep.ifname: [f"{ep.ip}/{ep.prefixlen}"] for ep in mine},
        }
        routed = [ep for ep in mine if not by_network[ep.network_id].internal]
        expected_route = [(routed[0].gateway, routed[0].ifname)] if routed else []
        assert _default_routes(sb.netns_name) == expected_route

    ports = [p for cid in sandboxes for p in ctrl.published(cid)]
    assert kernel_mappings(cfg.firewall_backend, TABLE) == sorted(
        (p.host_ip, p.proto, p.host_port, p.container_ip, p.container_port)
        for p in ports
        if p.in_firewall  # the [::] twins are the proxy's (tests/test_netd_ipv6.py)
    )
    for p in ports:
        assert p.sock is not None and _port_is_held(p.proto, p.host_ip, p.host_port)
    bridges = {n.bridge for n in networks}
    for name in (DEFAULT_BRIDGE, "pyecrash-a", "pyecrash-b", "pyecrash-c"):
        assert _firewall_names(cfg.firewall_backend, name) == (name in bridges), name

    state = read_json(cfg.data_root / "network" / "endpoints.json")
    records = [*state["networks"].values(), *state["endpoints"].values()]
    assert all(r["state"] == "ready" for r in [*records, *state["sandboxes"].values()])
    for nid, raw in state["networks"].items():
        assert sorted(raw["ipam"]["allocations"]) == sorted(
            ep.ip for ep in endpoints if ep.network_id == nid
        )


def assert_nothing_left(backend: str) -> None:
    assert links_with_prefix(PREFIX) == []
    assert netns_with_prefix(NETNS_PREFIX) == []
    assert [v for v in _veth_candidates() if link_exists(v)] == []
    assert not firewall_installed(backend, TABLE)


def sweep() -> None:
    """Remove every object with the test's names (a failed test's leftovers)."""
    for name in netns_with_prefix(NETNS_PREFIX):
        remove_netns(name)
    for name in [*links_with_prefix(PREFIX), *_veth_candidates()]:
        remove_link(name)
    for backend in ("nftables", "iptables"):
        remove_firewall(backend, TABLE)


# -- the test ----------------------------------------------------------------------------------

MODES = [("nftables", True), ("iptables", False)]


@dataclass
class Reference:
    """The uninterrupted run: the logical state before and after each step, when each step
    ran, and how many side effects the script has."""

    snapshots: list[dict[str, Any]]  # [0]: before the first step; [i + 1]: after step i
    steps: list[tuple[float, float]]  # (start, end) of each step, seconds after "ready"
    effects: int


@pytest.fixture
def clean() -> Iterator[None]:
    require_root()
    for tool in ("ip", "nft", "iptables-restore", "iptables-save"):
        require_tool(tool)
    sweep()
    try:
        yield
    finally:
        sweep()


def _recover_and_check(
    data_root: Path, backend: str, proxy: bool, progress: Progress, reference: Reference
) -> str:
    """The restarted daemon's setup(), then every check; returns what the kill interrupted."""
    cfg = config(data_root, backend, proxy)
    ctrl = NetworkController(cfg)
    done, in_flight = progress.done, progress.in_flight
    try:
        ctrl.setup()
        allowed = [reference.snapshots[done]]
        if in_flight is not None:
            allowed.append(reference.snapshots[done + 1])
        state = logical_state(ctrl)
        assert state in allowed, (progress.lines[-3:], state, allowed)
        assert_kernel_matches(ctrl, cfg)
        ctrl.setup()  # a second setup() changes nothing
        assert logical_state(ctrl) == state
        assert_kernel_matches(ctrl, cfg)
    finally:
        ctrl.teardown(remove_networks=True)
    assert_nothing_left(backend)
    if in_flight is None:
        return f"{done} steps done, killed between steps"
    outcome = "rolled back" if state == allowed[0] else "carried through"
    return f"{done} steps done, killed in {SCRIPT[in_flight][0]} (step {in_flight}): {outcome}"


@pytest.mark.parametrize(("backend", "proxy"), MODES, ids=[m[0] for m in MODES])
def test_sigkill_at_many_points_then_setup_restores_exactly(
    backend: str, proxy: bool, tmp_path: Path, clean: None
) -> None:
    first = free_port_block(4)
    ports = {f"P{i + 1}": first + i for i in range(4)}

    # The reference run: every step completes (and is checked like any other point).
    progress = run_child(tmp_path, tmp_path / "reference", backend, proxy, ports, snapshots=True)
    ready = progress.time_of("ready")
    reference = Reference(
        progress.snapshots(),
        [
            (progress.time_of(f"start {i}") - ready, progress.time_of(f"done {i}") - ready)
            for i in range(len(SCRIPT))
        ],
        int(next(t.split()[1] for _s, t in progress.lines if t.startswith("effects "))),
    )
    assert len(reference.snapshots) == len(SCRIPT) + 1
    outcomes = [
        "reference: "
        + _recover_and_check(tmp_path / "reference", backend, proxy, progress, reference)
    ]

    # Deterministic: right before the N-th side effect, N spread over the whole script.
    stride = max(1, reference.effects // DETERMINISTIC_KILLS)
    for n, crash_at in enumerate(range(1, reference.effects + 1, stride)):
        data_root = tmp_path / f"effect-{crash_at}"
        progress = run_child(tmp_path, data_root, backend, proxy, ports, crash_at=crash_at)
        assert any(text.startswith("crash ") for _t, text in progress.lines)
        if n % SECOND_KILL_EVERY == 1:
            # The recovering setup() crashes too, before its n-th side effect.
            run_child(tmp_path, data_root, backend, proxy, ports, phase="recover", crash_at=n)
        outcomes.append(
            f"before effect {crash_at}: "
            + _recover_and_check(data_root, backend, proxy, progress, reference)
        )

    # Timed: N ms after "ready", N at the middle of every step (timings of the reference run).
    for index, (start, end) in enumerate(reference.steps):
        kill_after = (start + end) / 2
        data_root = tmp_path / f"timed-{index}"
        progress = run_child(tmp_path, data_root, backend, proxy, ports, kill_after=kill_after)
        if index % SECOND_KILL_EVERY == 2:
            run_child(tmp_path, data_root, backend, proxy, ports, phase="recover",
                      kill_after=0.02 * index)  # fmt: skip
        outcomes.append(
            f"after {kill_after * 1000:.0f} ms: "
            + _recover_and_check(data_root, backend, proxy, progress, reference)
        )
    print("\n".join(outcomes))
    # Most kills did interrupt an operation, not only the gaps between them.
    interrupted = sum(" killed in " in line for line in outcomes)
    assert interrupted >= len(outcomes) // 2, outcomes


def main() -> None:
    child_main(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
