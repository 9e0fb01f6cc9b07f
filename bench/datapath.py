"""The data-path study: every metric on every variant, alternated A B C … A B C and repeated.

Each sample is one load-generator run. Around it the proxy's CPU and the machine's load are
read; a sample during which other processes kept more than ``disturbed_cpus`` CPUs busy is
measured again (``redo_disturbed`` times at most) and flagged if it stays disturbed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench import procfs
from bench.accounting import CpuSnapshot, CpuUsage, usage_between
from bench.config import PROXY_VARIANTS
from bench.environment import LARGE_PATH, SMALL_PATH, Environment, Variant
from bench.loadgen import LoadError, run_iperf3, run_wrk
from bench.progress import Progress
from bench.results import Results, Sample

SETTLE_SECONDS = 0.1  # after a run: let a forking proxy reap its children before CPU is read
PAUSE_SECONDS = 0.2  # between runs: connections of the previous one finish closing


@dataclass(frozen=True)
class Metric:
    id: str
    title: str
    kind: str  # "tcp" | "udp" | "http"
    headline: str  # the key of the value the ratios use (higher is better)
    unit: str
    streams: int = 1
    path: str = SMALL_PATH
    keepalive: bool = True


METRICS: dict[str, Metric] = {
    m.id: m
    for m in (
        Metric("tcp-1", "iperf3 TCP, 1 stream", "tcp", "gbit_s", "Gbit/s"),
        Metric("tcp-4", "iperf3 TCP, 4 streams", "tcp", "gbit_s", "Gbit/s", streams=4),
        Metric("udp", "iperf3 UDP at a fixed rate", "udp", "mbit_s", "Mbit/s"),
        Metric("http-keepalive", "wrk, small body, keep-alive", "http", "req_s", "req/s"),
        Metric(
            "http-close",
            "wrk, small body, new connection per request",
            "http",
            "req_s",
            "req/s",
            keepalive=False,
        ),
        Metric("http-1mib", "wrk, 1 MiB body, keep-alive", "http", "mb_s", "MB/s", path=LARGE_PATH),
    )
}


def selected_metrics(env: Environment) -> list[Metric]:
    wanted = env.cfg.metrics or tuple(METRICS)
    return [METRICS[m] for m in wanted]


def _per_gb(cpu: float | None, nbytes: float) -> float | None:
    return cpu / (nbytes / 1e9) if cpu is not None and nbytes > 0 else None


def _load(env: Environment, variant: Variant, metric: Metric) -> dict[str, float | None]:
    """Run the load generator once; the values it produced (LoadError when it failed)."""
    cfg = env.cfg
    if metric.kind == "tcp":
        r = run_iperf3(env.tools["iperf3"], variant.iperf, cfg.duration_s, metric.streams)
        return {"gbit_s": r.bits_per_second / 1e9, "bytes": float(r.bytes)}
    if metric.kind == "udp":
        r = run_iperf3(
            env.tools["iperf3"],
            variant.iperf,
            cfg.duration_s,
            udp_rate=cfg.udp_rate,
            udp_length=cfg.udp_length,
        )
        return {
            "mbit_s": r.bits_per_second / 1e6,
            "bytes": float(r.bytes),
            "loss_pct": r.lost_percent,
            "jitter_ms": r.jitter_ms,
        }
    w = run_wrk(
        env.tools["wrk"],
        variant.http,
        metric.path,
        cfg.duration_s,
        env.wrk_script,
        keepalive=metric.keepalive,
        threads=cfg.wrk_threads,
        connections=cfg.wrk_connections,
    )
    return {
        "req_s": w.requests_per_second,
        "mb_s": w.megabytes_per_second,
        "p50_ms": w.p50_ms,
        "p99_ms": w.p99_ms,
        "requests": float(w.requests),
        "bytes": float(w.bytes),
        "errors": float(w.errors),
    }


def _with_proxy_cpu(
    values: dict[str, float | None], variant: Variant, usage: CpuUsage
) -> dict[str, float | None]:
    proxied = bool(variant.proxy_pids)
    cpu = usage.proxy if proxied else None
    values["proxy_cpu_s"] = cpu
    values["proxy_cpu_s_per_gb"] = _per_gb(cpu, values.get("bytes") or 0.0)
    if "requests" in values:
        requests = values["requests"] or 0.0
        values["proxy_cpu_us_per_req"] = (
            cpu / requests * 1e6 if cpu is not None and requests else None
        )
    return values


def measure(env: Environment, variant: Variant, metric: Metric, rep: int) -> Sample:
    """One sample, measured again while other processes disturb it (within the budget)."""
    cfg = env.cfg
    roots, containers = env.our_root_pids(), env.container_ids()
    attempt = 0
    while True:
        attempt += 1
        started = time.time()
        before = CpuSnapshot.take(roots, containers, variant.proxy_pids)
        t0 = time.monotonic()
        error: str | None = None
        values: dict[str, float | None] = {}
        try:
            values = _load(env, variant, metric)
        except LoadError as exc:
            error = str(exc)
        wall = time.monotonic() - t0
        time.sleep(SETTLE_SECONDS)
        usage = usage_between(before, CpuSnapshot.take(roots, containers, variant.proxy_pids))
        disturbed = usage.foreign > cfg.disturbed_cpus * wall
        if error is None:
            values = _with_proxy_cpu(values, variant, usage)
        time.sleep(PAUSE_SECONDS)
        if error is None and disturbed and attempt <= cfg.redo_disturbed and env.redo_left > 0:
            env.redo_left -= 1
            continue
        return Sample(
            study="datapath",
            metric=metric.id,
            variant=variant.name,
            rep=rep,
            values=values,
            params={"duration_s": cfg.duration_s},
            error=error,
            started=started,
            wall_s=round(wall, 3),
            load=usage.as_load(),
            disturbed=disturbed,
            attempts=attempt,
        )


def describe(metric: Metric, sample: Sample) -> str:
    if not sample.ok:
        return f"FAILED: {sample.error}"
    v = sample.values
    text = f"{v[metric.headline]:,.2f} {metric.unit}"
    if metric.kind == "udp":
        text += f", loss {v['loss_pct']:.2f} %"
    if metric.kind == "http":
        text += f", p99 {v['p99_ms']:.2f} ms"
    if v.get("proxy_cpu_s") is not None:
        text += f", proxy {v['proxy_cpu_s']:.2f} CPU-s"
    if sample.disturbed:
        text += " (disturbed)"
    return text


def datapath_steps(env: Environment) -> int:
    return env.cfg.repeat * len(selected_metrics(env)) * len(env.variants)


def run_datapath(env: Environment, results: Results, progress: Progress) -> None:
    """For each metric: rep 1 of every variant, then rep 2 of every variant, and so on."""
    env.redo_left = int(datapath_steps(env) * env.cfg.redo_budget)
    for metric in selected_metrics(env):
        for rep in range(env.cfg.repeat):
            for variant in env.variants:
                sample = measure(env, variant, metric, rep)
                results.add(sample)
                progress.step(
                    f"{metric.id} · {variant.name} · {rep + 1}/{env.cfg.repeat}",
                    describe(metric, sample),
                )


def memory_steps(env: Environment) -> int:
    return sum(1 for v in env.variants if v.name in PROXY_VARIANTS)


def record_memory(env: Environment, results: Results, progress: Progress, when: str) -> None:
    """Rss/Pss/threads of every proxy process (``when``: "idle-fresh" or "idle-after-load")."""
    for variant in env.variants:
        if variant.name not in PROXY_VARIANTS:
            continue
        shown = ""
        for role, pid in variant.proxy_roles.items():
            mem = procfs.process_memory(pid)
            sample = Sample(
                study="memory",
                metric=when,
                variant=variant.name,
                rep=0,
                params={"role": role, "pid": pid},
                started=time.time(),
            )
            if mem is None:
                sample.error = f"process {pid} is gone"
            else:
                sample.values = {
                    "rss_kb": float(mem.rss_kb),
                    "pss_kb": float(mem.pss_kb),
                    "pss_anon_kb": float(mem.pss_anon_kb),
                    "threads": float(mem.threads),
                }
                if role == "http":
                    shown = f"Pss {mem.pss_kb} kB, Rss {mem.rss_kb} kB, {mem.threads} threads"
            results.add(sample)
        progress.step(f"memory {when} · {variant.name}", shown or "process gone")
