"""PNG plots with matplotlib: a bar chart per metric (variants side by side, whiskers from min to
max) and line charts for the scaling studies (ports -> publish time, ports -> connection rate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.config import PROXY_VARIANTS
from bench.datapath import METRICS
from bench.results import Results, Stat, summarize

DPI = 110


def _pyplot() -> Any:  # matplotlib.pyplot, imported only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(path: Path, title: str, ylabel: str, labels: list[str], stats: list[Stat | None]) -> bool:
    if not any(stats):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    medians = [s.median if s else 0.0 for s in stats]
    low = [s.median - s.low if s else 0.0 for s in stats]
    high = [s.high - s.median if s else 0.0 for s in stats]
    colors = ["#4c72b0" if name not in PROXY_VARIANTS else "#dd8452" for name in labels]
    ax.bar(labels, medians, yerr=[low, high], capsize=4, color=colors)
    for i, s in enumerate(stats):
        if s:
            ax.annotate(
                _label(s.median),
                (i, s.high),  # above the whisker, where it cannot be crossed
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _lines(
    path: Path,
    title: str,
    ylabel: str,
    series: dict[str, list[tuple[int, Stat]]],
    log_y: bool = False,
) -> bool:
    if not any(series.values()):
        return False
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for label, points in series.items():
        if not points:
            continue
        xs = [p[0] for p in points]
        ax.errorbar(
            xs,
            [p[1].median for p in points],
            yerr=[
                [p[1].median - p[1].low for p in points],
                [p[1].high - p[1].median for p in points],
            ],
            marker="o",
            capsize=3,
            label=label,
        )
    # symlog keeps N = 0 on the axis while spreading 1 ... 10,000 evenly.
    ax.set_xscale("symlog", linthresh=1)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.0f}"))
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("published ports")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _scaling(
    results: Results, study: str, metric: str, key: str
) -> dict[str, list[tuple[int, Stat]]]:
    series: dict[str, list[tuple[int, Stat]]] = {}
    for s in results.select(study, metric):
        series.setdefault(s.variant, [])
    for label in series:
        counts = sorted({s.params["ports"] for s in results.select(study, metric, label)})
        for count in counts:
            stat = results.stat(study, metric, label, key, ports=count)
            if stat:
                series[label].append((count, stat))
    return series


def write_plots(results: Results, directory: Path) -> list[str]:
    """Write every plot the results allow; the file names, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    variants = results.variant_names

    def keep(name: str, made: bool) -> None:
        if made:
            written.append(name)

    for metric_id in results.metric_ids:
        m = METRICS[metric_id]
        stats = [results.stat("datapath", m.id, v, m.headline) for v in variants]
        name = f"datapath-{m.id}.png"
        keep(name, _bars(directory / name, m.title, m.unit, variants, stats))
        if m.kind == "http":
            stats = [results.stat("datapath", m.id, v, "p99_ms") for v in variants]
            name = f"latency-p99-{m.id}.png"
            keep(name, _bars(directory / name, f"{m.title}: p99 latency", "ms", variants, stats))
        if m.kind == "udp":
            stats = [results.stat("datapath", m.id, v, "loss_pct") for v in variants]
            keep(
                "udp-loss.png", _bars(directory / "udp-loss.png", "UDP loss", "%", variants, stats)
            )
    proxies = [v for v in variants if v in PROXY_VARIANTS]
    if "tcp-1" in results.metric_ids:
        stats = [results.stat("datapath", "tcp-1", v, "proxy_cpu_s_per_gb") for v in proxies]
        name = "proxy-cpu-per-gb.png"
        keep(
            name,
            _bars(
                directory / name,
                "Proxy CPU per GB moved (iperf3, 1 stream)",
                "CPU-s/GB",
                proxies,
                stats,
            ),
        )
    stats = [
        summarize(
            s.values.get("pss_kb") for s in results.select("memory", "idle-fresh", v, role="http")
        )
        for v in proxies
    ]
    keep(
        "idle-pss.png",
        _bars(directory / "idle-pss.png", "Idle Pss of one proxy process", "kB", proxies, stats),
    )
    labels = sorted({s.variant for s in results.select("first-response")})
    stats = [results.stat("first-response", "run-to-200", label, "first_200_s") for label in labels]
    name = "first-response.png"
    keep(name, _bars(directory / name, "run -d -p to first HTTP 200", "s", labels, stats))
    name = "publish-time.png"
    keep(
        name,
        _lines(
            directory / name,
            "Publishing N ports: create + start",
            "s",
            _scaling(results, "publish", "run", "run_s"),
            log_y=True,
        ),
    )
    name = "connrate.png"
    keep(
        name,
        _lines(
            directory / name,
            "DNAT: new connections per second vs published ports",
            "connections/s",
            _scaling(results, "connrate", "http-close", "req_s"),
        ),
    )
    name = "connect-p99.png"
    keep(
        name,
        _lines(
            directory / name,
            "DNAT: p99 first-packet (connect) latency vs published ports",
            "ms",
            _scaling(results, "connrate", "http-close", "connect_p99_ms"),
        ),
    )
    return written
