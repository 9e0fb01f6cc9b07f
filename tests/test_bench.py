"""The benchmark harness (bench/): its parsers, report and plots offline, then real runs of
``python -m bench --quick`` that must produce well-formed JSON, Markdown and PNG files and leave
nothing behind — on success and on ^C. No test here asserts that any speed is reached.
"""

from __future__ import annotations

import io
import json
import math
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.config import PROXY_VARIANTS, VARIANTS, BenchConfig
from bench.daemons import Publish
from bench.datapath import METRICS
from bench.dockerarchive import docker_manifest
from bench.dockerd import RECORDS, start_dockerd
from bench.dockerd import leftovers as dockerd_leftovers
from bench.environment import NGINX_COMMAND, SMALL_PATH
from bench.httpprobe import wait_for_200
from bench.iptablesdiff import docker_additions, parse_save, removal_batch
from bench.loadgen import WRK_REPORT_PREFIX, LoadError, parse_iperf3, parse_wrk
from bench.ports import PortPool
from bench.procfs import live_group_members
from bench.report import connrate_scaling, markdown_table, render
from bench.results import Results, Sample, check_document, ratio, summarize
from bench.tools import MissingTool, Tool, find_tools, which
from bench.topology import BRIDGE_CANDIDATES, RunNames, choose_subnets, leftovers
from tests.conftest import REPO, image_archive, require, require_root, require_tool

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_TIMEOUT_SECONDS = 900  # generous: the first run may build the iperf3 image (~30 s)


# -- offline: parsers, statistics, report --------------------------------------------------


def test_parse_wrk_reads_the_report_line() -> None:
    stdout = (
        "Running 1s test @ http://127.0.0.1:1/\n  2 threads and 50 connections\n"
        f'{WRK_REPORT_PREFIX}{{"duration_us":2000000,"requests":50000,"bytes":8000000,'
        '"connect_errors":1,"read_errors":2,"write_errors":0,"status_errors":3,"timeouts":4,'
        '"p50_us":550.0,"p99_us":4200.5,"mean_us":800.0}\n'
    )
    result = parse_wrk(stdout)
    assert result.requests == 50000
    assert result.requests_per_second == pytest.approx(25000)
    assert result.megabytes_per_second == pytest.approx(4.0)
    assert result.p50_ms == pytest.approx(0.55)
    assert result.p99_ms == pytest.approx(4.2005)
    assert result.errors == 10


def test_parse_wrk_without_report_is_an_error() -> None:
    with pytest.raises(LoadError, match="no report"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_parse_iperf3_tcp_udp_and_error() -> None:
    tcp = {"end": {"sum_received": {"bits_per_second": 1.5e10, "bytes": 5_000_000, "seconds": 3}}}
    parsed = parse_iperf3(tcp, udp=False)
    assert parsed.bits_per_second == 1.5e10 and parsed.bytes == 5_000_000
    assert parsed.lost_percent is None
    udp = {
        "end": {
            "sum_received": {
                "bits_per_second": 4.9e8,
                "bytes": 61_000_000,
                "seconds": 1.0,
                "jitter_ms": 0.004,
                "lost_percent": 0.25,
            }
        }
    }
    parsed = parse_iperf3(udp, udp=True)
    assert parsed.lost_percent == 0.25 and parsed.jitter_ms == 0.004
    with pytest.raises(LoadError, match="busy"):
        parse_iperf3({"error": "the server is busy running a test. try again later"}, udp=False)


def test_summarize_and_ratio() -> None:
    stat = summarize([3.0, None, 1.0, math.nan, 2.0])
    assert stat is not None
    assert (stat.median, stat.low, stat.high, stat.count) == (2.0, 1.0, 3.0, 3)
    assert summarize([None]) is None
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, 0.0) is None and ratio(None, 2.0) is None


def test_markdown_table_rows_have_the_header_width() -> None:
    table = markdown_table(["a", "b", "c"], [["x", "1", "2|3"], ["y", "4", "5"]])
    lines = table.strip().splitlines()
    assert lines[1] == "|---|---:|---:|"
    assert all(_cells(line) == 3 for line in lines)


def test_missing_tool_is_named_with_its_package(tmp_path: Path) -> None:
    absent = Tool("pyebench-no-such-program", "pyebench-pkg", "a test tool")
    with pytest.raises(MissingTool) as err:
        find_tools((absent,), search_path=str(tmp_path))
    message = str(err.value)
    assert "pyebench-no-such-program" in message
    assert "apt-get install pyebench-pkg" in message
    assert "--install-missing" in message


def test_check_document_reports_bad_samples() -> None:
    doc = _synthetic_results().to_json()
    assert check_document(doc) == []
    doc["samples"][0]["values"]["gbit_s"] = -1.0
    doc["samples"][1]["study"] = "nonsense"
    problems = check_document(doc)
    assert any("gbit_s" in p for p in problems)
    assert any("unknown study" in p for p in problems)
    assert check_document({"schema": "other"})


def test_port_pool_hands_out_distinct_free_ports() -> None:
    pool = PortPool()
    first, second = pool.take(50), pool.take(50)
    assert len(set(first)) == 50 and not set(first) & set(second)
    assert all(pool.low <= p < pool.high for p in first + second)
    pool.give_back(first)
    assert not set(first) & pool._given


def test_quick_profile_is_small_and_validation_names_the_problem(tmp_path: Path) -> None:
    quick = BenchConfig.quick_profile(tmp_path)
    assert quick.repeat == 1 and quick.duration_s == 1
    assert max(quick.publish_counts) <= quick.proxy_publish_max
    full = BenchConfig(out=tmp_path)
    assert full.repeat >= 3 and set(full.publish_counts) >= {1, 100, 1000, 10000}
    with pytest.raises(ValueError, match="unknown variant"):
        BenchConfig(out=tmp_path, variants=("warp-drive",)).validate()


SAVE_BEFORE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:PYEX-FORWARD - [0:0]
-A FORWARD -m comment --comment "pyex fw" -j PYEX-FORWARD
-A FORWARD -o pyebd0000d -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
"""
SAVE_AFTER = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-USER - [0:0]
:PYEX-FORWARD - [0:0]
:PYEY - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -m comment --comment "pyex fw" -j PYEX-FORWARD
-A FORWARD -o pyebd0000d -j ACCEPT
-A FORWARD -o pyebd0000d -j ACCEPT
-A FORWARD -o pyebd0000d -j DOCKER
-A FORWARD -o pyey0 -j PYEY
-A PYEY -o pyebd0000d -j DROP
-A DOCKER -d 10.93.7.2/32 ! -i pyebd0000d -o pyebd0000d -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 10.93.7.0/24 ! -o pyebd0000d -j MASQUERADE
-A POSTROUTING -s 10.93.7.2/32 -d 10.93.7.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE
-A POSTROUTING -s 10.93.70.0/24 -j MASQUERADE
-A DOCKER -p tcp -m tcp --dport 15000 -j DNAT --to-destination 10.93.7.2:80
COMMIT
"""


def test_docker_additions_are_only_new_docker_rules() -> None:
    """A rule that was there before stays (even with an identical twin added), rules of other
    programs added meanwhile stay, and Docker's chains go after the jumps to them."""
    before, after = parse_save(SAVE_BEFORE, 4), parse_save(SAVE_AFTER, 4)
    added = docker_additions(before, after, "pyebd0000d", ("10.93.7.0/24",))
    assert added.tables["filter"].chains == ["DOCKER", "DOCKER-ISOLATION-STAGE-1", "DOCKER-USER"]
    assert added.tables["filter"].rules == [
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
        "-A FORWARD -o pyebd0000d -j ACCEPT",  # the second of the two identical rules
        "-A FORWARD -o pyebd0000d -j DOCKER",
    ]
    assert added.tables["nat"].rules == [
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A POSTROUTING -s 10.93.7.0/24 ! -o pyebd0000d -j MASQUERADE",
        "-A POSTROUTING -s 10.93.7.2/32 -d 10.93.7.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE",
    ]
    assert added.rule_count == 7 + 3 + 1
    batch = removal_batch(added).splitlines()
    assert batch[:2] == ["*filter", "-D FORWARD -j DOCKER-USER"]
    # Every chain is flushed before any is deleted (ISOLATION-STAGE-1 jumps to STAGE-2).
    filter_section = batch[: batch.index("COMMIT")]
    assert max(i for i, ln in enumerate(filter_section) if ln.startswith("-F")) < min(
        i for i, ln in enumerate(filter_section) if ln.startswith("-X")
    )
    assert not any("PYEX" in ln or "PYEY" in ln or "10.93.70." in ln for ln in batch)
    assert batch.count("COMMIT") == 2


def test_docker_archive_manifest_names_the_oci_blobs() -> None:
    def add(archive: tarfile.TarFile, name: str, doc: object) -> None:
        data = json.dumps(doc).encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    manifest = {"config": {"digest": "sha256:c0"}, "layers": [{"digest": "sha256:l1"}]}
    index = {
        "manifests": [
            {
                "digest": "sha256:m0",
                "annotations": {"io.containerd.image.name": "docker.io/library/nginx:latest"},
            }
        ]
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add(archive, "index.json", index)
        add(archive, "blobs/sha256/m0", manifest)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as archive:
        assert docker_manifest(archive, None) == [
            {
                "Config": "blobs/sha256/c0",
                "RepoTags": ["nginx:latest"],
                "Layers": ["blobs/sha256/l1"],
            }
        ]
        assert docker_manifest(archive, "web:1")[0]["RepoTags"] == ["web:1"]


def test_connrate_scaling_divides_most_by_fewest_ports() -> None:
    results = _synthetic_results()
    for n, rate, p99 in ((10000, 17280.0, 5.2),):
        params = {"ports": n, "mode": "dnat", "backend": "nftables"}
        values = {"req_s": rate, "p50_ms": 0.8, "p99_ms": p99, "errors": 0.0}
        values |= {"connect_p50_ms": 0.1, "connect_p99_ms": 0.3}
        results.add(Sample("connrate", "http-close", "dnat/nftables", 0, values, params))
    (row,) = connrate_scaling(results)
    assert (row["fewest"], row["most"]) == (1, 10000)
    assert row["req_s"] == pytest.approx(0.96) and row["p99_ms"] == pytest.approx(1.04)
    text = render(results)
    assert row["connect_p99_ms"] == pytest.approx(1.5)
    assert "| dnat/nftables | 10,000 ÷ 1 | 0.96 | yes | 1.04 | yes | 1.50 | no |" in text
    _assert_tables_well_formed(text)


def test_report_sets_dockerd_proxies_side_by_side() -> None:
    """The docker-proxy row keeps its label in the samples (older results) and is named
    dockerd+docker-proxy in the report, beside dockerd+pyengine-proxy with the ratios."""
    results = _synthetic_results()
    for label, pss in (("proxy/dockerd", 1400.0), ("proxy/dockerd+pyengine-proxy", 350.0)):
        params = {"ports": 1000, "mode": "proxy", "backend": "dockerd", "http_sample": 20}
        values: dict[str, float | None] = {"run_s": 15.0, "rm_s": 24.0, "kernel_objects": 1017.0}
        values |= {"helpers_pss_mib": pss + 50, "proxies_pss_mib": pss, "proxy_processes": 2000.0}
        values |= {"answering": 1000.0, "answering6": 1000.0, "http_ok": 20.0, "proxies_left": 0.0}
        if "pyengine" in label:
            values |= {"answering_after_server_kill": 1000.0, "answering6_after_server_kill": 999.0}
            values |= {"http_ok_after_server_kill": 20.0}
        results.add(Sample("publish", "run", label, 0, values=values, params=params))
    text = render(results)
    _assert_tables_well_formed(text)
    assert "| proxy/dockerd+docker-proxy | 1,000 |" in text
    assert "| 1,000 | 1,450 | 400.0 | 0.28 | 1,400 | 350.0 | 0.25 | 2,000 | 2,000 | 1.00 |" in text
    assert (
        "| dockerd+pyengine-proxy | 1,000 | 1,000 / 1,000 | 20/20 | 1,000 / 999, HTTP 20/20 | 0 |"
        in text
    )


def test_report_and_plots_from_synthetic_results(tmp_path: Path) -> None:
    results = _synthetic_results()
    text = render(results)
    assert "÷ dnat-lo" in text and "÷ docker-proxy" in text
    _assert_tables_well_formed(text)
    # docker-proxy's tcp-1 median is 10, dnat-lo's 20: the ratio is 0.50.
    row = next(line for line in text.splitlines() if line.startswith("| docker-proxy |"))
    assert "**0.50** · 10.00" in row
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        require(False, "needs matplotlib (pip install matplotlib)")
    from bench.plots import write_plots

    names = write_plots(results, tmp_path)
    assert "datapath-tcp-1.png" in names
    for name in names:
        _assert_png(tmp_path / name)


# -- real runs ------------------------------------------------------------------------------


def _require_bench_tools() -> None:
    require_root()
    for tool in ("iperf3", "wrk", "socat", "runc", "nft", "ip"):
        require_tool(tool)
    require(
        bool(shutil.which("docker-proxy") or os.path.exists("/usr/sbin/docker-proxy")),
        "needs docker-proxy (apt-get install docker.io)",
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        require(False, "needs matplotlib (pip install matplotlib)")


@dataclass
class QuickRun:
    returncode: int
    out: Path
    stderr: str
    run_id: str


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    _require_bench_tools()
    out = tmp_path_factory.mktemp("bench-quick")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )
    match = re.search(r"run ([0-9a-f]{4}):", result.stderr)
    return QuickRun(result.returncode, out, result.stderr, match.group(1) if match else "")


def test_quick_run_writes_well_formed_json(quick_run: QuickRun) -> None:
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]
    doc = json.loads((quick_run.out / "results.json").read_text())
    assert check_document(doc) == []
    assert doc["completed"] is True and doc["quick"] is True
    results = Results.from_json(doc)
    assert results.variant_names == list(VARIANTS)
    for metric in METRICS.values():
        for variant in VARIANTS:
            samples = results.select("datapath", metric.id, variant)
            assert samples, f"no successful {metric.id} sample for {variant}"
            assert samples[0].values[metric.headline] > 0
            proxy_cpu = samples[0].values["proxy_cpu_s"]
            assert (proxy_cpu is not None) == (variant in PROXY_VARIANTS)
    for variant in PROXY_VARIANTS:
        for when in ("idle-fresh", "idle-after-load"):
            memory = results.select("memory", when, variant, role="http")
            assert memory and memory[0].values["pss_kb"] > 0
    assert {s.params["mode"] for s in results.select("first-response")} == {"proxy", "dnat"}
    published = results.select("publish", "run")
    assert {(s.params["mode"], s.params["ports"]) for s in published} >= {
        (mode, n) for mode in ("proxy", "dnat") for n in (0, 1, 10)
    }
    assert all(s.values["kernel_objects"] is not None for s in published)
    proxied = [s for s in published if s.params["mode"] == "proxy" and s.params["ports"]]
    assert proxied and all(s.values["helpers_pss_mib"] > 0 for s in proxied)
    for s in published:
        if s.params["ports"]:
            # Every published port answers (a SYN to pyengine's idle proxies, else connect()),
            # and the sampled ones serve HTTP.
            assert s.values["answering"] == s.params["ports"], (s.variant, s.values)
            assert s.values["http_ok"] == s.params["http_sample"] > 0, (s.variant, s.values)
    assert all(s.values["answering6"] == s.params["ports"] for s in proxied)
    rates = results.select("connrate")
    assert {s.params["ports"] for s in rates} == {1, 10}
    assert all(s.params["mode"] == "dnat" for s in rates)
    assert all(s.values["connect_p99_ms"] > 0 for s in rates)
    if which("dockerd"):
        # Measured, or skipped with the reason (another bench's dockerd, Docker's chains taken).
        docker = {s.variant for s in published if s.params["backend"] == "dockerd"}
        skipped = {x["what"] for x in results.skipped if "dockerd" in x["what"]}
        assert docker | {w.split(", ")[-1] for w in skipped} == {
            "dnat/dockerd",
            "proxy/dockerd",
            "proxy/dockerd+pyengine-proxy",
        }
        _assert_dockerd_proxy_checks(results)


def test_quick_run_writes_markdown_with_every_variant(quick_run: QuickRun) -> None:
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]
    text = (quick_run.out / "results.md").read_text()
    _assert_tables_well_formed(text)
    headline = text.split("## Headline: median ÷ dnat-lo", 1)[1].split("\n## ", 1)[0]
    for variant in VARIANTS:
        assert f"| {variant} |" in headline
    for section in ("Publishing N ports", "DNAT connection rate", "first HTTP 200", "Memory"):
        assert section in text


def test_quick_run_writes_png_plots(quick_run: QuickRun) -> None:
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]
    doc = json.loads((quick_run.out / "results.json").read_text())
    names = doc["plots"]
    assert "publish-time.png" in names and "connrate.png" in names
    assert {f"datapath-{m}.png" for m in METRICS} <= set(names)
    for name in names:
        _assert_png(quick_run.out / "plots" / name)


def test_quick_run_leaves_nothing_behind(quick_run: QuickRun) -> None:
    assert quick_run.run_id, quick_run.stderr[-3000:]
    doc = json.loads((quick_run.out / "results.json").read_text())
    _assert_run_removed(quick_run.run_id, doc)


def test_interrupt_removes_everything(tmp_path: Path) -> None:
    _require_bench_tools()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        # A suite started as a background job of a shell without job control inherits SIGINT
        # ignored (POSIX), and Python keeps it so: the bench would never see the signal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in process.stderr or []])
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + QUICK_TIMEOUT_SECONDS
        while not any("tcp-1 ·" in ln for ln in seen):
            assert process.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "the data path never started:\n" + "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=180) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    run_id = next(m.group(1) for ln in seen if (m := re.search(r"run ([0-9a-f]{4}):", ln)))
    doc = json.loads((tmp_path / "results.json").read_text())
    _assert_run_removed(run_id, doc)
    assert doc["completed"] is False and "SIGINT" in doc["aborted"]
    assert check_document(doc) == []


def test_killed_dockerd_is_removed_exactly(tmp_path: Path) -> None:
    """dockerd with a published container, killed with SIGKILL: the clean-up removes its
    containers, processes, mounts, cgroups, bridge and directories, and from iptables exactly
    the chains and rules it added; every rule that was there before stays."""
    require_root()
    require(which("dockerd") is not None, "needs dockerd (apt-get install docker.io)")
    require_tool("runc")
    require_tool("iptables-save")
    archive = image_archive("nginx")
    names = RunNames.fresh()
    name = names.docker_bridge("t")
    subnet = choose_subnets(1, BRIDGE_CANDIDATES)[0]
    # Short: containerd's sockets live under the exec root (sun_path is 108 bytes).
    workdir = Path(tempfile.mkdtemp(prefix=f"pyebd-{names.run_id}-"))
    before = parse_save(_iptables_save(), 4)
    daemon = start_dockerd(workdir / "d", name, subnet, userland_proxy=False)
    try:
        daemon.load(archive)
        ports = PortPool().take(2)
        container = daemon.run("nginx", [Publish(p, 80) for p in ports], cmd=NGINX_COMMAND)
        assert wait_for_200(container.ip, 80, 30, SMALL_PATH)
        added = daemon.added_rules()
        assert {"DOCKER", "DOCKER-USER"} <= set(added.tables["filter"].chains)
        dnat = [ln for ln in added.tables["nat"].chain_rules if "DNAT" in ln]
        assert sorted(int(ln.split("--dport ")[1].split()[0]) for ln in dnat) == ports
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    after = parse_save(_iptables_save(), 4)
    assert dockerd_leftovers(name, str(subnet)) == []
    assert not (RECORDS / f"{name}.json").exists()
    processes = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True)
    assert str(workdir) not in processes.stdout
    assert str(workdir) not in Path("/proc/mounts").read_text()
    assert after.docker_chains() == [] or not _no_other_dockerd(), after.docker_chains()
    for table, rules in before.rules.items():
        # Other tests' firewalls (all named pye*) may change meanwhile; everything else stays.
        kept = [ln for ln in rules if "pye" not in ln.lower()]
        assert all(ln in after.rules.get(table, []) for ln in kept), table
    assert not any(name in ln for rules in after.rules.values() for ln in rules)


# -- helpers --------------------------------------------------------------------------------


def _assert_dockerd_proxy_checks(results: Results) -> None:
    """dockerd's proxies, docker-proxy or pyengine's launcher: the proxies' own Pss, none
    left after rm -f, UDP through both loopbacks; the launcher's proxies outlive its killed
    host server."""
    for label in ("proxy/dockerd", "proxy/dockerd+pyengine-proxy"):
        runs = results.select("publish", "run", label)
        if not runs:
            continue
        assert all(s.values["proxies_left"] == 0 for s in runs), label
        for s in runs:
            if s.params["ports"]:
                assert 0 < s.values["proxies_pss_mib"] <= s.values["helpers_pss_mib"], s.values
        (udp,) = results.select("publish", "udp-echo", label)
        assert udp.values == {"udp_echo_127": 1.0, "udp_echo_v6": 1.0, "proxies_left": 0.0}
    for s in results.select("publish", "run", "proxy/dockerd+pyengine-proxy"):
        if s.params["ports"]:
            assert s.values["servers_killed"] == 1, s.values
            assert s.values["answering_after_server_kill"] == s.params["ports"], s.values
            assert s.values["answering6_after_server_kill"] == s.params["ports"], s.values
            assert s.values["http_ok_after_server_kill"] == s.params["http_sample"], s.values


def _iptables_save() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


def _no_other_dockerd() -> bool:
    processes = subprocess.run(["ps", "-eww", "-o", "comm"], capture_output=True, text=True)
    return "dockerd" not in processes.stdout.split()


def _assert_run_removed(run_id: str, doc: dict[str, Any] | None = None) -> None:
    assert leftovers(RunNames(run_id)) == []
    processes = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True)
    assert f"pyebench-{run_id}-" not in processes.stdout, "a process of the run is still running"
    assert f"pyebench-{run_id}-" not in Path("/proc/mounts").read_text()
    assert not list(Path("/tmp").glob(f"pyebench-{run_id}-*")), "work directory left behind"
    if doc is not None:
        assert not any("left behind" in note for note in doc["notes"]), doc["notes"]
        started = doc["environment"]["hand_started"]
        assert {p["kind"] for p in started} == {"docker-proxy", "socat"}
        for p in started:
            assert live_group_members(p["pid"]) == [], f"{p['kind']} processes still running"


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2


def _assert_tables_well_formed(text: str) -> None:
    tables: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [t for t in tables if t]
    assert tables, "no table"
    for table in tables:
        assert re.fullmatch(r"\|(-{3}:?\|)+", table[1]), table[1]
        widths = {_cells(line) for line in table}
        assert len(widths) == 1, f"ragged table: {table[0]}"
        assert len(table) > 2, f"table without rows: {table[0]}"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert kind == b"IHDR" and length == 13, path
    assert width > 100 and height > 100, path
    assert data[-8:-4] == b"IEND", path


def _synthetic_results() -> Results:
    variants = list(VARIANTS)
    results = Results(
        command="python -m bench --quick",
        run_id="0000",
        started="2026-01-01T00:00:00Z",
        finished="2026-01-01T00:01:00Z",
        quick=True,
        config=BenchConfig(out=Path("out")).to_json(),
        machine={"cpu": "test", "cpus": 2},
        tools={"iperf3": "iperf 3.12"},
        variants=[{"name": v, "path": VARIANTS[v]} for v in variants],
        metrics=[{"id": m.id, "title": m.title} for m in METRICS.values()],
    )
    base = {"dnat-lo": 20.0, "docker-proxy": 10.0}
    for metric in METRICS.values():
        for rep in range(3):
            for variant in variants:
                value = base.get(variant, 15.0) + rep - 1  # median: the base
                values: dict[str, float | None] = {
                    metric.headline: value,
                    "bytes": 1e9,
                    "p50_ms": 0.5,
                    "p99_ms": 4.0,
                    "loss_pct": 0.1,
                    "jitter_ms": 0.01,
                    "requests": 1e5,
                    "errors": 0.0,
                    "proxy_cpu_s": 0.4 if variant in PROXY_VARIANTS else None,
                    "proxy_cpu_s_per_gb": 0.4 if variant in PROXY_VARIANTS else None,
                    "proxy_cpu_us_per_req": 25.0 if variant in PROXY_VARIANTS else None,
                }
                results.add(Sample("datapath", metric.id, variant, rep, values=values, wall_s=1.0))
    for variant in PROXY_VARIANTS:
        mem = {"rss_kb": 3000.0, "pss_kb": 1200.0, "pss_anon_kb": 700.0, "threads": 7.0}
        results.add(Sample("memory", "idle-fresh", variant, 0, values=mem, params={"role": "http"}))
    for mode in ("proxy", "dnat"):
        for n in (0, 1, 100):
            params = {"ports": n, "mode": mode, "backend": "nftables"}
            run = {"run_s": 0.1 + n / 1000, "rm_s": 0.05, "kernel_objects": 17.0 + n}
            run["helpers_pss_mib"] = 5.0 + n
            results.add(Sample("publish", "run", f"{mode}/nftables", 0, values=run, params=params))
            if mode == "dnat" and n:
                rate = {"req_s": 18000.0, "p50_ms": 0.8, "p99_ms": 5.0, "errors": 0.0}
                rate |= {"connect_p50_ms": 0.1, "connect_p99_ms": 0.2}
                results.add(Sample("connrate", "http-close", "dnat/nftables", 0, rate, params))
        first = {"first_200_s": 0.3, "run_returned_s": 0.25}
        results.add(
            Sample(
                "first-response",
                "run-to-200",
                f"{mode}/nftables",
                0,
                values=first,
                params={"mode": mode, "probe_outcomes": {"ok": 1, "refused": 40}},
            )
        )
    return results
