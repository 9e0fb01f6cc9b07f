"""json-file log rotation (Docker's ``--log-opt max-size=... --log-opt max-file=...``).

The writer (JsonFileLog, run by the monitor) and the reader (JsonLogReader, the engine's), both
in engine.runtime.jsonlog, are checked on their own first, then through a real daemon: a busybox
container prints numbered lines, the files stay bounded, and ``logs`` / ``logs -f`` give the
lines in order across rotated files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runtime.jsonlog import (
    JsonFileLog,
    JsonLogReader,
    LogOptions,
    parse_log_config,
    parse_log_size,
    rotated_log_path,
)
from tests.conftest import Daemon, assert_nothing_left, start_daemon, stop_daemon

BRIDGE = "pyelog0"
BIP = "10.74.0.1/24"


def log_files(path: Path) -> list[Path]:
    """The log's files as they exist, oldest first."""
    rotated = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
        reverse=True,
    )
    return [*rotated, *([path] if path.exists() else [])]


def numbers(texts: list[str], prefix: str = "line-") -> list[int]:
    return [int(t.strip()[len(prefix) :]) for t in texts if t.strip().startswith(prefix)]


def assert_contiguous_suffix(got: list[int], last: int) -> None:
    """``got`` is first..last in order, nothing missing or repeated."""
    assert got, "no lines"
    assert got == list(range(got[0], last + 1)), f"lines out of order or missing: {got[:20]}..."


# ---- units: sizes and options ----------------------------------------------------------


def test_parse_log_size_binary_units() -> None:
    assert parse_log_size("10m") == 10 * 1024 * 1024
    assert parse_log_size("512k") == 512 * 1024
    assert parse_log_size("1g") == 1 << 30
    assert parse_log_size("100") == 100
    assert parse_log_size("2MB") == 2 * 1024 * 1024
    with pytest.raises(ValueError):
        parse_log_size("ten")


def test_parse_log_config() -> None:
    assert parse_log_config(None) == LogOptions()
    assert parse_log_config({"Type": "json-file", "Config": {}}) == LogOptions()
    assert parse_log_config({"Config": {"max-size": "10m", "max-file": "3"}}) == LogOptions(
        10 * 1024 * 1024, 3
    )
    with pytest.raises(ValueError, match="unknown log opt 'labels'"):
        parse_log_config({"Config": {"labels": "x"}})
    with pytest.raises(ValueError, match="max-file cannot be less than 1"):
        parse_log_config({"Config": {"max-size": "1k", "max-file": "0"}})
    with pytest.raises(ValueError, match="invalid size"):
        parse_log_config({"Config": {"max-size": "lots"}})
    with pytest.raises(ValueError, match="not supported"):
        parse_log_config({"Type": "syslog"})


# ---- units: writer and reader ------------------------------------------------------------


def write_lines(log: JsonFileLog, first: int, count: int) -> None:
    for i in range(first, first + count):
        log.write("stdout", f"line-{i}\n".encode())


def test_writer_rotates_and_reader_reads_across_files(tmp_path: Path) -> None:
    path = tmp_path / "container.log"
    log = JsonFileLog(path, LogOptions(max_size=2000, max_files=3))
    log.open()
    write_lines(log, 0, 1000)
    log.close()
    files = log_files(path)
    assert [f.name for f in files] == ["container.log.2", "container.log.1", "container.log"]
    assert not rotated_log_path(path, 3).exists()
    for f in files:
        assert f.stat().st_size <= 2000, f"{f.name} is {f.stat().st_size} bytes"
        for line in f.read_text().splitlines():
            json.loads(line)  # every file holds whole entries only
    reader = JsonLogReader(path)
    got = numbers([e.text for e in reader.read_new()])
    reader.close()
    assert_contiguous_suffix(got, 999)
    assert len(got) > 40  # about three files' worth is kept


def test_max_file_one_truncates(tmp_path: Path) -> None:
    path = tmp_path / "container.log"
    log = JsonFileLog(path, LogOptions(max_size=1000, max_files=1))
    log.open()
    write_lines(log, 0, 200)
    log.close()
    assert log_files(path) == [path]
    assert path.stat().st_size <= 1000
    reader = JsonLogReader(path)
    assert_contiguous_suffix(numbers([e.text for e in reader.read_new()]), 199)
    reader.close()


@pytest.mark.parametrize("max_files", [1, 2, 4])
def test_follow_across_rotations(tmp_path: Path, max_files: int) -> None:
    """A reader that polls between writes sees every line once, in order, however the files
    are renamed or deleted under it; several rotations between two polls lose only what
    was deleted."""
    path = tmp_path / "container.log"
    log = JsonFileLog(path, LogOptions(max_size=500, max_files=max_files))
    log.open()
    reader = JsonLogReader(path)
    got: list[int] = []
    for batch in range(60):
        write_lines(log, batch * 5, 5)  # ~350 bytes: at most one rotation per batch
        got += numbers([e.text for e in reader.read_new()])
    log.close()
    got += numbers([e.text for e in reader.read_new()])
    reader.close()
    assert got == list(range(300))


def test_attach_reader_starts_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "container.log"
    log = JsonFileLog(path, LogOptions(max_size=2000, max_files=2))
    log.open()
    write_lines(log, 0, 20)  # ~1400 bytes: the next 20 lines rotate once
    reader = JsonLogReader(path, start_at_end=True)
    write_lines(log, 20, 20)
    got = numbers([e.text for e in reader.read_new()])
    log.close()
    reader.close()
    assert rotated_log_path(path, 1).exists()
    assert got == list(range(20, 40))


# ---- through the daemon ----------------------------------------------------------------


@pytest.fixture(scope="module")
def log_daemon(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp(BRIDGE), BRIDGE, BIP, userland_proxy=False)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        yield d
    finally:
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
        stop_daemon(d)
    assert_nothing_left(d)


def container_log(d: Daemon, cid: str) -> Path:
    return Path(json.loads(d.cli("inspect", cid, check=True).stdout)[0]["LogPath"])


def wait_exited(d: Daemon, cid: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(d.cli("inspect", cid, check=True).stdout)[0]["State"]
        if not state["Running"]:
            return state
        time.sleep(0.2)
    raise AssertionError(f"container {cid} still running after {timeout} s")


def test_run_with_log_opts_rotates(log_daemon: Daemon) -> None:
    d = log_daemon
    script = "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done"
    cid = d.cli(
        "run",
        "-d",
        "--log-opt",
        "max-size=20k",
        "--log-opt",
        "max-file=3",
        "busybox",
        "sh",
        "-c",
        script,
        check=True,
    ).stdout.strip()
    info = json.loads(d.cli("inspect", cid, check=True).stdout)[0]
    assert info["HostConfig"]["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": "20k", "max-file": "3"},
    }
    assert wait_exited(d, cid)["ExitCode"] == 0
    path = container_log(d, cid)
    files = log_files(path)
    assert [f.name for f in files] == ["container.log.2", "container.log.1", "container.log"]
    for f in files:
        assert f.stat().st_size <= 20 * 1024
    out = d.cli("logs", cid, check=True).stdout.splitlines()
    got = numbers(out)
    assert_contiguous_suffix(got, 2999)
    assert 3000 > len(got) > 500  # about 60 KiB of ~75-byte entries is kept
    tail = numbers(d.cli("logs", "--tail", "5", cid, check=True).stdout.splitlines())
    assert tail == [2995, 2996, 2997, 2998, 2999]
    d.cli("rm", cid, check=True)


def test_logs_follow_across_rotation(log_daemon: Daemon) -> None:
    """``logs -f`` started before the output keeps every line even though the files keep
    only the last ~20 KiB: it reads each file before the writer deletes it (each batch is
    smaller than max-size, so a poll happens between rotations)."""
    d = log_daemon
    script = (
        "sleep 5; i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); "
        "if [ $((i % 100)) -eq 0 ]; then usleep 300000; fi; done"
    )
    cid = d.cli(
        "run",
        "-d",
        "--log-opt",
        "max-size=10k",
        "--log-opt",
        "max-file=2",
        "busybox",
        "sh",
        "-c",
        script,
        check=True,
    ).stdout.strip()
    follow = d.cli("logs", "-f", cid, timeout=120)
    assert follow.returncode == 0, follow.stderr
    assert numbers(follow.stdout.splitlines()) == list(range(3000))
    kept = numbers(d.cli("logs", cid, check=True).stdout.splitlines())
    assert_contiguous_suffix(kept, 2999)
    assert len(kept) < 400
    assert len(log_files(container_log(d, cid))) == 2
    d.cli("rm", cid, check=True)


def test_bad_log_opts_are_refused(log_daemon: Daemon) -> None:
    d = log_daemon
    bad = d.cli("run", "-d", "--log-opt", "max-size=huge", "busybox", "true")
    assert bad.returncode == 125
    assert "invalid size" in bad.stderr
    unknown = d.cli("create", "--log-opt", "labels=x", "busybox", "true")
    assert unknown.returncode == 125
    assert "unknown log opt 'labels'" in unknown.stderr
    malformed = d.cli("create", "--log-opt", "max-size", "busybox", "true")
    assert malformed.returncode == 125
    assert "KEY=VALUE" in malformed.stderr
    assert d.cli("ps", "-a", "-q").stdout.split() == []


def test_default_has_no_rotation(log_daemon: Daemon) -> None:
    d = log_daemon
    cid = d.cli("run", "-d", "busybox", "sh", "-c", "echo hello", check=True).stdout.strip()
    wait_exited(d, cid)
    assert d.cli("logs", cid, check=True).stdout == "hello\n"
    assert log_files(container_log(d, cid)) == [container_log(d, cid)]
    d.cli("rm", cid, check=True)
