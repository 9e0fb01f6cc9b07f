"""Hostile timing against the real daemon: lifecycle requests that race, huge logs, a PROXY
protocol label carried across a restart into kernel-DNAT mode, and a SIGKILL while proxies are
being forked.

Every daemon here has names of its own (bridges and nft tables ``pyes5a``..``pyes5d``, subnets
inside 10.181.0.0/16 and 10.182.0.0/16) and host ports in 29500-29999.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.http import UnixHTTPConnection
from engine.runtime.rootfs import mounts_under, unmount
from tests.api_helpers import Answer, RawApi
from tests.conftest import (
    Daemon,
    assert_nothing_left,
    require_tool,
    start_daemon,
    stop_daemon,
)

MODES = {
    True: ("pyes5a", "10.181.0.1/24"),
    False: ("pyes5b", "10.182.0.1/24"),
}
RESTART_BRIDGE, RESTART_BIP = "pyes5c", "10.181.1.1/24"
ORPHAN_BRIDGE, ORPHAN_BIP = "pyes5d", "10.182.1.1/24"
PROXY_MARKER_ENV = "PYENGINE_PROXY_OWNER"


# ---- the Engine API over the daemon's unix socket ------------------------------------------------


def api(d: Daemon, method: str, path: str, body: Any = None, timeout: float = 60) -> Answer:
    return RawApi(d.host, timeout).request(method, path, body=body)


def create(d: Daemon, *, ports: dict[str, int] | None = None, **config: Any) -> str:
    bindings = {k: [{"HostPort": str(v)}] for k, v in (ports or {}).items()}
    body = {"Image": "busybox", "Cmd": ["sleep", "60"], **config}
    body["HostConfig"] = {"PortBindings": bindings, **body.get("HostConfig", {})}
    answer = api(d, "POST", "/containers/create", body)
    assert answer.status == 201, (answer.status, answer.message)
    return str(answer.json()["Id"])


def listed(d: Daemon) -> set[str]:
    answer = api(d, "GET", "/containers/json?all=1")
    assert answer.status == 200, answer.message
    return {c["Id"] for c in answer.json()}


def runc_containers(d: Daemon) -> set[str]:
    runc = require_tool("runc")
    out = subprocess.run(
        [runc, "--root", str(d.data_root / "runc"), "list", "-q"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return set(out.split())


def records(d: Daemon) -> set[str]:
    root = d.data_root / "containers"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def port_is_free(port: int) -> bool:
    """Whether nothing holds ``port`` (TCP, IPv4 and IPv6 wildcard): no proxy, no reservation."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, port))
            except OSError:
                return False
    return True


def nft_table(name: str) -> str:
    return subprocess.run(
        ["nft", "list", "table", "inet", name], capture_output=True, text=True, timeout=30
    ).stdout


def marked_proxies(state_dir: Path) -> set[int]:
    """Proxies that carry the marker of the daemon whose proxy records are in ``state_dir``
    (what the daemon's stray scan looks for; its fork server carries it too, but is no
    proxy: a forked proxy names itself pyengine-proxy at once)."""
    wanted = f"{PROXY_MARKER_ENV}={state_dir}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != "pyengine-proxy":
                continue
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
    return found


def assert_no_orphan(d: Daemon, ports: list[int]) -> None:
    """No runc container, record, proxy, port reservation or firewall element is left of a
    container the daemon does not list."""
    known = listed(d)
    assert runc_containers(d) <= known, f"runc runs unlisted containers: {runc_containers(d)}"
    assert records(d) <= known, f"records of unlisted containers: {records(d) - known}"
    busy = [p for p in ports if not port_is_free(p)]
    assert not busy, f"ports still held: {busy}"
    table = nft_table(d.table)
    for port in ports:
        assert f" {port} " not in table and f" {port}\n" not in table, f"{port} left in nft"
    assert not marked_proxies(d.data_root / "proxies"), "proxies left running"


def tear_down(d: Daemon) -> None:
    """Stop the daemon and whatever it ran, even what a failing test left behind it: the
    containers it lists, then any runc container of its root it did not (an orphan), then,
    if its network is still up, one more start and stop without live restore."""
    with contextlib.suppress(Exception):
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
    stop_daemon(d)
    runc = require_tool("runc")
    for cid in runc_containers(d):
        subprocess.run(
            [runc, "--root", str(d.data_root / "runc"), "delete", "-f", cid],
            capture_output=True,
            timeout=30,
        )
    for mount_point in mounts_under(d.data_root):
        with contextlib.suppress(OSError):
            unmount(Path(mount_point))
    if d.bridge in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout:
        tmp = d.data_root.parent
        again = start_daemon(tmp, d.bridge, d.bip, d.userland_proxy, "--live-restore=false")
        for cid in again.cli("ps", "-a", "-q").stdout.split():
            again.cli("rm", "-f", cid)
        stop_daemon(again)


# ---- one daemon per proxy mode -------------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["userland-proxy", "kernel-dnat"])
def race_daemon(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    busybox_archive: Path,
) -> Iterator[Daemon]:
    userland_proxy: bool = request.param
    name, bip = MODES[userland_proxy]
    tmp = tmp_path_factory.mktemp(name)
    d = start_daemon(tmp, name, bip, userland_proxy)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        yield d
    finally:
        tear_down(d)
    assert_nothing_left(d)


def restart(d: Daemon, *extra_args: str) -> Daemon:
    stop_daemon(d)
    tmp = d.data_root.parent
    return start_daemon(tmp, d.bridge, d.bip, d.userland_proxy, *extra_args)


# ---- start, stop and rm -f at the same moment ----------------------------------------------------

ROUNDS = 50  # per proxy mode: 100 in all
PARALLEL = 5  # containers raced at once


def _race_one(d: Daemon, cid: str, barrier: threading.Barrier, errors: list[str]) -> None:
    def call(method: str, path: str) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=30)
        answer = api(d, method, path)
        if answer.status >= 500:
            errors.append(f"{method} {path}: {answer.status} {answer.message}")

    threads = [
        threading.Thread(target=call, args=("POST", f"/containers/{cid}/start")),
        threading.Thread(target=call, args=("DELETE", f"/containers/{cid}?force=1")),
        threading.Thread(target=call, args=("POST", f"/containers/{cid}/stop?t=1")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def test_start_stop_rm_race_leaves_no_orphan(race_daemon: Daemon) -> None:
    """Rounds of create, then start + rm -f + stop fired at once: whatever the order they
    run in, no container runs, holds a port, a rule or a proxy, or has a record without being
    listed, before and after a daemon restart (moby issue 20813's class of races)."""
    d = race_daemon
    base = 29500 if d.userland_proxy else 29550
    ports = [base + i for i in range(PARALLEL)]
    errors: list[str] = []
    deadline = time.monotonic() + 120
    for _ in range(ROUNDS // PARALLEL):
        assert time.monotonic() < deadline, "the rounds took too long"
        cids = [create(d, ports={"80/tcp": port}) for port in ports]
        barrier = threading.Barrier(3 * PARALLEL)
        threads = [
            threading.Thread(target=_race_one, args=(d, cid, barrier, errors)) for cid in cids
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        # rm -f always wins in the end: nothing of these containers is left.
        leftover = listed(d) & set(cids)
        assert not leftover, f"rm -f answered but the container is still listed: {leftover}"
    assert not errors, errors
    assert_no_orphan(d, ports)
    d = restart(d)
    try:
        assert_no_orphan(d, ports)
    finally:
        race_daemon.process = d.process  # the fixture stops the daemon that runs now


# ---- a PROXY protocol label after a restart in kernel-DNAT mode ----------------------------------

PROXY_LABEL_PORT = 29600


def test_proxy_protocol_label_checked_at_start(tmp_path: Path, busybox_archive: Path) -> None:
    """Created in proxy mode with a PROXY protocol label, the container cannot start once the
    daemon runs with --userland-proxy=false (the backend trusts PROXY headers; DNAT would
    hand it the client's raw bytes): a 4xx naming the label, and no port published."""
    d = start_daemon(tmp_path, RESTART_BRIDGE, RESTART_BIP, True)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        cid = create(
            d,
            ports={"80/tcp": PROXY_LABEL_PORT},
            Labels={"pyengine.proxy-protocol": "v2"},
        )
        stop_daemon(d)  # the same data root, now in kernel-DNAT mode
        d = start_daemon(tmp_path, RESTART_BRIDGE, RESTART_BIP, False)
        answer = api(d, "POST", f"/containers/{cid}/start")
        assert 400 <= answer.status < 500, (answer.status, answer.message)
        assert "pyengine.proxy-protocol" in answer.message
        assert "\n" not in answer.message
        inspect = api(d, "GET", f"/containers/{cid}/json").json()
        assert not inspect["State"]["Running"]
        assert port_is_free(PROXY_LABEL_PORT)
        assert str(PROXY_LABEL_PORT) not in nft_table(RESTART_BRIDGE)
        assert not runc_containers(d)
        result = d.cli("start", cid)
        assert result.returncode != 0
        assert "pyengine.proxy-protocol" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert api(d, "DELETE", f"/containers/{cid}?force=1").status == 204
    finally:
        tear_down(d)
    assert_nothing_left(d)


def test_proxy_protocol_container_not_adopted_in_dnat_mode(
    tmp_path: Path, busybox_archive: Path
) -> None:
    """Left running by a proxy-mode daemon with live restore, a container whose label asks
    for PROXY protocol is not adopted by the next daemon in kernel-DNAT mode: it is stopped,
    and its port is neither DNATed nor held."""
    d = start_daemon(tmp_path, RESTART_BRIDGE, RESTART_BIP, True)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        cid = create(
            d,
            ports={"80/tcp": PROXY_LABEL_PORT},
            Labels={"pyengine.proxy-protocol": "v1"},
        )
        assert api(d, "POST", f"/containers/{cid}/start").status == 204
        stop_daemon(d)  # live restore: the container keeps running
        assert runc_containers(d) == {cid}
        d = start_daemon(tmp_path, RESTART_BRIDGE, RESTART_BIP, False)
        inspect = api(d, "GET", f"/containers/{cid}/json").json()
        assert not inspect["State"]["Running"], "adopted into kernel-DNAT mode"
        assert not runc_containers(d)
        assert str(PROXY_LABEL_PORT) not in nft_table(RESTART_BRIDGE)
        assert port_is_free(PROXY_LABEL_PORT)
        assert "pyengine.proxy-protocol" in d.log()
    finally:
        tear_down(d)
    assert_nothing_left(d)


# ---- a large log: the tail is read from the end, the whole log off the event loop ----------------

LOG_BRIDGE, LOG_BIP = "pyes5e", "10.181.2.1/24"
LOG_LINES = 400_000  # ~30 MB of json-file log, ~75 bytes an entry


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def unframe(stream: bytes) -> bytes:
    """The payloads of a multiplexed log stream (8-byte headers: stream, 0, 0, 0, size)."""
    payloads, at = [], 0
    while at < len(stream):
        size = int.from_bytes(stream[at + 4 : at + 8], "big")
        payloads.append(stream[at + 8 : at + 8 + size])
        at += 8 + size
    return b"".join(payloads)


def ping_latencies(d: Daemon, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        began = time.monotonic()
        assert api(d, "GET", "/_ping", timeout=30).status == 200
        out.append(time.monotonic() - began)
        time.sleep(0.02)


def test_large_log_tail_and_stream(tmp_path: Path, busybox_archive: Path) -> None:
    """``logs --tail 1`` of a ~30 MB log answers with the last line without the daemon's
    memory growing by the log's size, and ``/_ping`` answers at once while the whole log
    streams to a client."""
    d = start_daemon(tmp_path, LOG_BRIDGE, LOG_BIP, False)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        cid = d.cli("run", "-d", "busybox", "seq", str(LOG_LINES), check=True).stdout.strip()
        deadline = time.monotonic() + 60
        while api(d, "GET", f"/containers/{cid}/json").json()["State"]["Running"]:
            assert time.monotonic() < deadline, "seq did not finish in 60 s"
            time.sleep(0.2)
        log_size = (d.data_root / "containers" / cid / "container.log").stat().st_size
        assert log_size > 25 << 20, log_size
        pid = d.process.pid
        peak_before = memory_kib(pid, "VmHWM")
        began = time.monotonic()
        tail = d.cli("logs", "--tail", "1", cid, check=True).stdout
        took = time.monotonic() - began
        assert tail == f"{LOG_LINES}\n"
        grown = memory_kib(pid, "VmHWM") - peak_before
        print(f"log {log_size >> 20} MiB: --tail 1 in {took:.2f} s, peak RSS +{grown} KiB")
        assert grown < 16 << 10, f"the daemon's peak RSS grew by {grown} KiB for --tail 1"
        assert took < 5

        # The whole log, read slowly by the client, while /_ping is timed.
        stop, latencies = threading.Event(), []
        pinger = threading.Thread(target=ping_latencies, args=(d, stop, latencies))
        conn = UnixHTTPConnection(d.host.removeprefix("unix://"), 60)
        try:
            conn.request("GET", f"/v1.41/containers/{cid}/logs?stdout=1&stderr=1")
            response = conn.getresponse()
            assert response.status == 200
            pinger.start()
            chunks = []
            while chunk := response.read(1 << 20):
                chunks.append(chunk)
                time.sleep(0.01)
        finally:
            stop.set()
            conn.close()
            if pinger.is_alive():
                pinger.join(timeout=60)
        stream = b"".join(chunks)
        assert unframe(stream) == "".join(f"{n}\n" for n in range(1, LOG_LINES + 1)).encode()
        worst = max(latencies)
        slowest = f"{len(latencies)} pings, the slowest {worst:.3f} s"
        print(f"streamed {len(stream) >> 20} MiB; {slowest}")
        assert len(latencies) >= 5
        assert worst < 0.5, f"/_ping took {worst:.2f} s while the log streamed"
    finally:
        tear_down(d)
    assert_nothing_left(d)


# ---- SIGKILL of the daemon while it forks proxies ------------------------------------------------

ORPHAN_PORTS = list(range(29700, 29900))  # 200 ports published by one container
# SIGKILL once this many proxies are forked (a container's proxies start as one batch and are
# recorded together once all run: until then, every one forked is a stray), or, last, once the
# batch is recorded.
KILL_AFTER_FORKED = (10, 60, 140, len(ORPHAN_PORTS) + 1)


def _start_in_background(d: Daemon, cid: str) -> threading.Thread:
    def start() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            api(d, "POST", f"/containers/{cid}/start", timeout=120)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


def test_sigkill_while_publishing_leaves_no_stray_proxy(
    tmp_path: Path, busybox_archive: Path
) -> None:
    """The daemon is SIGKILLed while it forks the proxies of 200 published ports, at a few
    points in time: the next daemon stops every proxy of its data root, also the one forked
    in the kill window before it was recorded; after ``rm -f`` every port can be bound."""
    d = start_daemon(tmp_path, ORPHAN_BRIDGE, ORPHAN_BIP, True)
    state_dir = d.data_root / "proxies"
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        for forked_wanted in KILL_AFTER_FORKED:
            bindings = {f"{80 + i}/tcp": port for i, port in enumerate(ORPHAN_PORTS)}
            cid = create(d, ports=bindings)
            starter = _start_in_background(d, cid)
            deadline = time.monotonic() + 30
            while not state_dir.is_dir() and len(marked_proxies(state_dir)) < forked_wanted:
                assert time.monotonic() < deadline, "the proxies did not start in 30 s"
                time.sleep(0.002)
            d.process.kill()  # SIGKILL
            d.process.wait(timeout=30)
            starter.join(timeout=30)
            forked = len(marked_proxies(state_dir))
            d = start_daemon(tmp_path, ORPHAN_BRIDGE, ORPHAN_BIP, True)
            assert api(d, "DELETE", f"/containers/{cid}?force=1").status == 204
            left = marked_proxies(state_dir)
            busy = [p for p in ORPHAN_PORTS if not port_is_free(p)]
            print(f"killed at {forked_wanted} forked ({forked} proxies marked): "
                  f"{len(left)} left, {len(busy)} ports held")  # fmt: skip
            assert not left, f"proxies of the data root survived: {sorted(left)}"
            assert not busy, f"ports still held after rm -f: {busy}"
    finally:
        tear_down(d)
        for pid in marked_proxies(state_dir):  # whatever a failure left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    assert_nothing_left(d)
