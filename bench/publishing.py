"""The control-plane studies.

- Publishing: ``create`` + ``start`` of an nginx container with N host ports published to its
  port 80 (N = 0, 1, 100, 1,000, 10,000), and ``rm -f`` of it, per proxy mode and firewall
  backend, with the kernel objects the daemon's firewall holds while they are published.
- Connection rate: with N ports published in DNAT mode, wrk opens a new connection per request
  from the external client to the last of them (how the lookup scales with N).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

from bench import procfs
from bench.daemons import BenchDaemon, Publish
from bench.environment import (
    HTTP_PORT,
    NGINX_COMMAND,
    READY_TIMEOUT_SECONDS,
    SMALL_PATH,
    Environment,
)
from bench.httpprobe import wait_for_200
from bench.loadgen import LoadError, Target, run_wrk
from bench.progress import Progress
from bench.results import Results, Sample
from engine.client import DaemonError, DaemonUnreachable


def kernel_objects(daemon: BenchDaemon) -> float | None:
    """Rules plus map/set elements in the daemon's nftables table, or iptables rules naming
    its table; None when they cannot be read."""
    if daemon.backend == "nftables":
        out = subprocess.run(
            ["nft", "-j", "list", "table", "inet", daemon.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            return None
        count = 0
        for item in json.loads(out.stdout).get("nftables", []):
            if "rule" in item:
                count += 1
            for kind in ("map", "set"):
                if kind in item:
                    count += len(item[kind].get("elem", []))
        return float(count)
    if daemon.backend == "iptables":
        out = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return None
        tag = daemon.name.lower()
        return float(
            sum(
                1
                for line in out.stdout.splitlines()
                if line.startswith("-A") and tag in line.lower()
            )
        )
    return None


def helper_processes_pss_mib(daemon: BenchDaemon) -> float:
    """Total Pss of the daemon's child processes outside containers: the proxies (and their
    fork server) and the container monitors, in MiB."""
    total_kb = 0
    for pid in procfs.descendants(daemon.process.pid):
        if procfs.in_container(pid):
            continue
        memory = procfs.process_memory(pid)
        total_kb += memory.pss_kb if memory else 0
    return total_kb / 1024


def _publish_once(
    env: Environment, daemon: BenchDaemon, count: int, rep: int, results: Results
) -> Sample:
    """One publish sample; host ports are picked right before, and picked again once if some
    other program took one of them meanwhile (the machine is shared)."""
    for attempt in (1, 2):
        ports = env.ports.take(count) if count else []
        try:
            sample = _publish_ports(env, daemon, ports, rep, results)
        finally:
            env.ports.give_back(ports)
        if sample.ok or "already in use" not in (sample.error or "") or attempt == 2:
            sample.attempts = attempt
            return sample
    raise AssertionError("unreachable")


def _publish_ports(
    env: Environment, daemon: BenchDaemon, ports: list[int], rep: int, results: Results
) -> Sample:
    count = len(ports)
    publish = [Publish(port, HTTP_PORT) for port in ports]
    params = {"ports": count, "mode": daemon.mode, "backend": daemon.backend}
    sample = Sample("publish", "run", daemon.label, rep, params=params, started=time.time())
    container_id = ""
    t0 = time.monotonic()
    try:
        container_id = daemon.create("nginx", publish, cmd=NGINX_COMMAND)
        daemon.client.start(container_id)
        run_s = time.monotonic() - t0
        objects = kernel_objects(daemon)
        helpers_pss = helper_processes_pss_mib(daemon)
        if count and not daemon.userland_proxy and env.cfg.connrate_duration_s:
            ip = daemon.client.inspect(container_id)["NetworkSettings"]["IPAddress"]
            results.add(_connection_rate(env, daemon, ip, ports[-1], count, rep))
        t1 = time.monotonic()
        daemon.remove(container_id)
        container_id = ""
        rm_s = time.monotonic() - t1
        sample.values = {
            "run_s": run_s,
            "rm_s": rm_s,
            "kernel_objects": objects,
            "helpers_pss_mib": helpers_pss,
        }
    except (DaemonError, DaemonUnreachable) as exc:
        sample.error = f"pyengined: {exc}"
    finally:
        if container_id:
            with contextlib.suppress(DaemonError, DaemonUnreachable):
                daemon.remove(container_id)
    sample.wall_s = round(time.monotonic() - t0, 3)
    return sample


def _connection_rate(
    env: Environment, daemon: BenchDaemon, container_ip: str, port: int, count: int, rep: int
) -> Sample:
    params = {"ports": count, "mode": daemon.mode, "backend": daemon.backend}
    sample = Sample("connrate", "http-close", daemon.label, rep, params=params, started=time.time())
    if not wait_for_200(container_ip, HTTP_PORT, READY_TIMEOUT_SECONDS, SMALL_PATH):
        sample.error = f"nginx at {container_ip} did not answer"
        return sample
    target = Target(env.ext.netns, env.ext.host_ip, port)
    try:
        w = run_wrk(
            env.tools["wrk"],
            target,
            SMALL_PATH,
            env.cfg.connrate_duration_s,
            env.wrk_script,
            keepalive=False,
            threads=env.cfg.wrk_threads,
            connections=env.cfg.wrk_connections,
        )
    except LoadError as exc:
        sample.error = str(exc)
        return sample
    sample.values = {
        "req_s": w.requests_per_second,
        "p50_ms": w.p50_ms,
        "p99_ms": w.p99_ms,
        "errors": float(w.errors),
    }
    sample.wall_s = w.seconds
    return sample


def publish_plan(env: Environment, daemons: list[BenchDaemon]) -> list[tuple[int, BenchDaemon]]:
    """(N, daemon) pairs of one repetition, in the order they alternate."""
    plan = []
    for count in env.cfg.publish_counts:
        for daemon in daemons:
            if daemon.userland_proxy and count > env.cfg.proxy_publish_max:
                continue
            plan.append((count, daemon))
    return plan


def skipped_counts(env: Environment, daemons: list[BenchDaemon]) -> list[dict[str, str]]:
    skipped = []
    for daemon in daemons:
        for count in env.cfg.publish_counts:
            if daemon.userland_proxy and count > env.cfg.proxy_publish_max:
                skipped.append(
                    {
                        "what": f"publish {count:,} ports, {daemon.label}",
                        "why": f"one pyengine-proxy process per port; above "
                        f"--proxy-publish-max {env.cfg.proxy_publish_max}",
                    }
                )
    return skipped


def run_publishing(
    env: Environment, daemons: list[BenchDaemon], results: Results, progress: Progress
) -> None:
    results.skipped += skipped_counts(env, daemons)
    plan = publish_plan(env, daemons)
    for rep in range(env.cfg.publish_repeat):
        # A B C, then C B A: a load that drifts during the study does not line up with N.
        for count, daemon in plan if rep % 2 == 0 else reversed(plan):
            sample = _publish_once(env, daemon, count, rep, results)
            results.add(sample)
            v = sample.values
            if not sample.ok:
                progress.step(f"publish {count:,} · {daemon.label}", f"FAILED: {sample.error}")
                continue
            text = f"run {v['run_s']:.3f} s, rm -f {v['rm_s']:.3f} s"
            if v.get("kernel_objects") is not None:
                text += f", {v['kernel_objects']:.0f} rules+elements"
            text += f", helpers' Pss {v['helpers_pss_mib']:,.1f} MiB"
            last = results.samples[-2] if len(results.samples) > 1 else None
            if last and last.study == "connrate" and last.params.get("ports") == count:
                text += (
                    f"; {last.values['req_s']:,.0f} conn/s, p99 {last.values['p99_ms']:.2f} ms"
                    if last.ok
                    else f"; connection rate FAILED: {last.error}"
                )
            progress.step(
                f"publish {count:,} · {daemon.label} · {rep + 1}/{env.cfg.publish_repeat}", text
            )
