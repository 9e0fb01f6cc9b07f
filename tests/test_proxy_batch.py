"""The supervisor's batch paths: many proxies started as one batch through the fork server and
stopped in one pass, their records, live restore and restart-on-crash of a batch, and the host
limits checked before a batch starts. Real fork server, real proxies, 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.jsonstate import write_json_atomic
from netd.portmap import _bind_error
from proxy import hostlimits, strays
from proxy.pidfd import ProcessIdentity
from proxy.records import ProxyRecord, RecordDirectory, record_name
from proxy.supervisor import HostLimitError, ProxyError, ProxySpec, ProxySupervisor
from tests.conftest import require_root
from tests.netns_helpers import loopback_echo_server

COUNT = 300
IO_TIMEOUT = 10.0


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    with loopback_echo_server(backlog=512, timeout=IO_TIMEOUT) as address:
        yield address


@pytest.fixture
def bound_sockets() -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(COUNT):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def batch_of(
    socks: list[socket.socket], backend: tuple[str, int]
) -> list[tuple[str, ProxySpec, socket.socket]]:
    batch = []
    for s in socks:
        port = s.getsockname()[1]
        batch.append((f"c1/tcp/127.0.0.1/{port}", ProxySpec("tcp", "127.0.0.1", port, *backend), s))
    return batch


def all_answer(ports: list[int]) -> list[int]:
    """The ports whose proxy does not echo a line back (each one connect, in turn)."""
    silent = []
    for port in ports:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
                conn.sendall(b"ping\n")
                if conn.recv(16) != b"ping\n":
                    silent.append(port)
        except OSError:
            silent.append(port)
    return silent


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def wait_until_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + IO_TIMEOUT
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def test_batch_starts_records_and_stops_every_proxy(
    tmp_path: Path, echo_server: tuple[str, int], bound_sockets: list[socket.socket]
) -> None:
    require_root()
    state_path = tmp_path / "proxies"
    batch = batch_of(bound_sockets, echo_server)
    ports = [spec.host_port for _, spec, _ in batch]

    async def scenario() -> list[int]:
        supervisor = ProxySupervisor(state_path=state_path, outlive_daemon=True)
        try:
            pids = await supervisor.start_many(batch)
            assert sorted(pids) == sorted(k for k, _, _ in batch)
            records = list(state_path.glob("*.json"))
            assert len(records) == 1  # one file for the container "c1"
            assert stat.S_IMODE(records[0].stat().st_mode) == 0o600
            assert len(json.loads(records[0].read_text())["proxies"]) == COUNT
            assert await asyncio.to_thread(all_answer, ports) == []
            await supervisor.stop_many(k for k, _, _ in batch)
            assert supervisor.pids() == {}
            return list(pids.values())
        finally:
            await supervisor.stop_all()

    pids = asyncio.run(scenario())
    assert wait_until_gone(pids) == []
    assert not state_path.exists()


def test_a_failing_proxy_fails_its_whole_batch(
    tmp_path: Path, echo_server: tuple[str, int], bound_sockets: list[socket.socket]
) -> None:
    """One proxy of the batch cannot start (its socket is UDP, its spec TCP): the batch
    raises ProxyError and leaves no proxy and no record behind."""
    require_root()
    state_path = tmp_path / "proxies"
    batch = batch_of(bound_sockets[:50], echo_server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        batch.insert(25, ("c1/bad", ProxySpec("tcp", "127.0.0.1", port, *echo_server), udp))

        async def scenario() -> None:
            supervisor = ProxySupervisor(state_path=state_path, outlive_daemon=True)
            try:
                with pytest.raises(ProxyError, match="c1/bad"):
                    await supervisor.start_many(batch)
                assert supervisor.pids() == {}
            finally:
                await supervisor.stop_all()

        asyncio.run(scenario())
    marked = [identity.pid for identity in strays.find_marked(state_path)]
    assert wait_until_gone(marked) == []
    assert not state_path.exists() or not list(state_path.iterdir())


def test_a_batch_is_handed_over_and_restarted_after_a_crash(
    tmp_path: Path, echo_server: tuple[str, int], bound_sockets: list[socket.socket]
) -> None:
    """Live restore of a batch: the next supervisor adopts every proxy as it runs, and
    restarts one that is killed on the same socket."""
    require_root()
    state_path = tmp_path / "proxies"
    batch = batch_of(bound_sockets, echo_server)

    async def first() -> dict[str, int]:
        supervisor = ProxySupervisor(state_path=state_path, outlive_daemon=True)
        pids = await supervisor.start_many(batch)
        await supervisor.detach()
        return pids

    async def second(before: dict[str, int]) -> None:
        supervisor = ProxySupervisor(state_path=state_path, outlive_daemon=True)
        try:
            held = await supervisor.take_over()
            assert len(held) == COUNT
            for sock in held.values():
                sock.close()
            for key, spec, _ in batch:
                assert await supervisor.adopt_survivor(key, spec) == before[key]
            victim, spec, _ = batch[7]
            os.kill(before[victim], signal.SIGKILL)
            deadline = time.monotonic() + IO_TIMEOUT
            while supervisor.pids().get(victim) in (None, before[victim]):
                assert time.monotonic() < deadline, "the killed proxy was not restarted"
                await asyncio.sleep(0.02)
            assert await asyncio.to_thread(all_answer, [spec.host_port]) == []
            (record,) = state_path.glob("*.json")
            assert len(json.loads(record.read_text())["proxies"]) == COUNT
        finally:
            await supervisor.stop_all()

    before = asyncio.run(first())
    try:
        asyncio.run(second(before))
    finally:
        for pid in before.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not state_path.exists()


def test_a_batch_the_open_files_limit_cannot_hold_is_refused_before_it_starts(
    tmp_path: Path, echo_server: tuple[str, int], bound_sockets: list[socket.socket]
) -> None:
    require_root()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = hostlimits.open_fds() + hostlimits.FD_RESERVE + 100
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:

        async def scenario() -> None:
            supervisor = ProxySupervisor(state_path=tmp_path / "proxies", outlive_daemon=True)
            try:
                with pytest.raises(HostLimitError, match="RLIMIT_NOFILE") as refused:
                    await supervisor.start_many(batch_of(bound_sockets, echo_server))
                assert "\n" not in str(refused.value)
                assert supervisor.pids() == {}
                assert supervisor.fork_server_pid is None  # nothing was asked of it
            finally:
                await supervisor.stop_all()

        asyncio.run(scenario())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_pids_cgroup_and_task_counts_are_read_from_proc(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "loadavg").write_text("0.50 0.40 0.30 2/345 6789\n")
    (proc / "sys/kernel/pid_max").write_text("32768\n")
    (proc / "sys/kernel/threads-max").write_text("192735\n")
    assert hostlimits.task_counts(proc) == hostlimits.TaskCounts(345, 32768, 192735)
    (proc / "self/cgroup").write_text("0::/system.slice/pyengined.service\n")
    assert hostlimits.pids_cgroup(proc, root) is None
    unified = root / "system.slice/pyengined.service"
    unified.mkdir(parents=True)
    (unified / "pids.max").write_text("4915\n")
    assert hostlimits.pids_cgroup(proc, root) == unified
    (proc / "self/cgroup").write_text("9:pids:/svc\n8:memory:/svc\n")
    v1 = root / "pids/svc"
    v1.mkdir(parents=True)
    (v1 / "pids.max").write_text("max\n")
    assert hostlimits.pids_cgroup(proc, root) == v1


def test_records_are_one_file_per_container_and_older_forms_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "proxies"
    identity = ProcessIdentity(pid=4242, start_time=1, comm="pyengine-proxy", cmdline=("x",))

    def record(container: str, port: int) -> ProxyRecord:
        spec = ProxySpec("tcp", "127.0.0.1", port, "10.0.0.2", 80)
        return ProxyRecord(f"{container}/tcp/127.0.0.1/{port}", spec, identity)

    old = [record("c1", 1), record("c1", 2), record("c2", 3)]
    path.mkdir()
    for number, r in enumerate(old):  # the per-proxy form
        write_json_atomic(path / f"proxy{number}.json", {"version": 1, **r.to_json()})
    directory = RecordDirectory(path)
    assert sorted(r.key for r in directory.load()) == sorted(r.key for r in old)
    directory.save(old)
    files = sorted(path.glob("*.json"))
    assert [f.name for f in files] == sorted({record_name("c1/x"), record_name("c2/x")})
    c1 = path / record_name("c1/x")
    assert [p["key"] for p in json.loads(c1.read_text())["proxies"]] == [old[0].key, old[1].key]

    inode = c1.stat().st_ino
    directory.update({old[0].key: old[0]})  # unchanged: not written again
    assert c1.stat().st_ino == inode
    directory.update({old[0].key: None})
    assert [p["key"] for p in json.loads(c1.read_text())["proxies"]] == [old[1].key]
    directory.update({old[1].key: None, old[2].key: None})
    assert not path.exists()


def test_running_out_of_open_files_while_reserving_ports_is_named() -> None:
    error = _bind_error("tcp", "::", 31673, OSError(errno.EMFILE, "Too many open files"))
    assert "RLIMIT_NOFILE" in str(error) and "\n" not in str(error)
