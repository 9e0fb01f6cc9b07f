"""The Markdown report, computed from the samples alone (``results.json`` can regenerate it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from bench.config import PROXY_VARIANTS, REFERENCES, VARIANTS
from bench.datapath import METRICS, Metric
from bench.dockerdreport import display, dockerd_proxy_section
from bench.results import Results, Stat, ratio, summarize

DASH = "–"


def number(value: float | None, digits: int = 2) -> str:
    """``12,345`` for big figures, ``17.02`` / ``0.529`` for small ones, a dash for none."""
    if value is None:
        return DASH
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def spread(stat: Stat | None, digits: int = 2) -> str:
    """``median (min–max)``; just the median when there is a single sample."""
    if stat is None:
        return DASH
    if stat.count == 1:
        return number(stat.median, digits)
    return f"{number(stat.median, digits)} ({number(stat.low, digits)}–{number(stat.high, digits)})"


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1
) -> str:
    """A GitHub table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        cells = [str(c).replace("|", "\\|") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _variants(results: Results) -> list[str]:
    return [v for v in results.variant_names if v in VARIANTS]


def _metrics(results: Results) -> list[Metric]:
    return [METRICS[m] for m in results.metric_ids if m in METRICS]


def _headline(results: Results, metric: Metric, variant: str) -> Stat | None:
    return results.stat("datapath", metric.id, variant, metric.headline)


def _glance(results: Results, reference: str) -> str:
    metrics = _metrics(results)
    headers = ["variant", *(f"{m.id} ({m.unit})" for m in metrics)]
    rows = []
    for variant in _variants(results):
        row = [variant]
        for m in metrics:
            value = _headline(results, m, variant)
            ref = _headline(results, m, reference)
            r = ratio(value.median if value else None, ref.median if ref else None)
            row.append(f"**{number(r)}** · {number(value.median if value else None)}")
        rows.append(row)
    return markdown_table(headers, rows)


def _datapath_table(results: Results) -> str:
    refs = ["dnat-lo", "dnat-ext", "docker-proxy"]
    headers = ["metric", "variant", "median (min–max)", "n", *(f"÷ {r}" for r in refs)]
    rows = []
    for m in _metrics(results):
        for variant in _variants(results):
            stat = _headline(results, m, variant)
            cells = [f"{m.title} ({m.unit})", variant, spread(stat), str(stat.count if stat else 0)]
            for ref in refs:
                ref_stat = _headline(results, m, ref)
                cells.append(
                    number(
                        ratio(stat.median if stat else None, ref_stat.median if ref_stat else None)
                    )
                )
            rows.append(cells)
    return markdown_table(headers, rows, numeric_from=2)


def _latency_table(results: Results) -> str:
    http = [m for m in _metrics(results) if m.kind == "http"]
    headers = ["variant"]
    for m in http:
        headers += [f"{m.id} p50 ms", f"{m.id} p99 ms"]
    headers.append("errors (all runs)")
    rows = []
    for variant in _variants(results):
        row = [variant]
        errors = 0.0
        for m in http:
            row.append(spread(results.stat("datapath", m.id, variant, "p50_ms")))
            row.append(spread(results.stat("datapath", m.id, variant, "p99_ms")))
            errors += sum(
                s.values.get("errors") or 0 for s in results.select("datapath", m.id, variant)
            )
        row.append(f"{errors:,.0f}")
        rows.append(row)
    return markdown_table(headers, rows)


def _udp_table(results: Results) -> str:
    rows = []
    for variant in _variants(results):
        rows.append(
            [
                variant,
                spread(results.stat("datapath", "udp", variant, "mbit_s"), 0),
                spread(results.stat("datapath", "udp", variant, "loss_pct")),
                spread(results.stat("datapath", "udp", variant, "jitter_ms"), 3),
                number(cpu.median)
                if (cpu := results.stat("datapath", "udp", variant, "proxy_cpu_s"))
                else DASH,
            ]
        )
    return markdown_table(
        ["variant", "received Mbit/s", "loss %", "jitter ms", "proxy CPU-s"], rows
    )


def _cpu_table(results: Results) -> str:
    columns = [
        ("tcp-1", "proxy_cpu_s_per_gb", "CPU-s/GB, tcp-1", 3),
        ("tcp-4", "proxy_cpu_s_per_gb", "CPU-s/GB, tcp-4", 3),
        ("http-1mib", "proxy_cpu_s_per_gb", "CPU-s/GB, 1 MiB", 3),
        ("http-keepalive", "proxy_cpu_us_per_req", "CPU-µs/request, keep-alive", 1),
        ("http-close", "proxy_cpu_us_per_req", "CPU-µs/request, new connection", 1),
    ]
    present = {m.id for m in _metrics(results)}
    columns = [c for c in columns if c[0] in present]
    rows = []
    for variant in _variants(results):
        if variant not in PROXY_VARIANTS:
            continue
        row = [variant]
        for metric, key, _title, digits in columns:
            stat = results.stat("datapath", metric, variant, key)
            row.append(number(stat.median if stat else None, digits))
        rows.append(row)
    return markdown_table(["proxy", *(c[2] for c in columns)], rows)


def _memory_table(results: Results) -> str:
    rows = []
    for when in ("idle-fresh", "idle-after-load"):
        for variant in _variants(results):
            for role in ("http", "iperf-udp"):
                found = results.select("memory", when, variant, role=role)
                if not found:
                    continue
                v = found[-1].values
                rows.append(
                    [
                        variant,
                        f"{role} ({'udp' if role.endswith('udp') else 'tcp'})",
                        when,
                        f"{v['rss_kb']:,.0f}",
                        f"{v['pss_kb']:,.0f}",
                        f"{v['pss_anon_kb']:,.0f}",
                        f"{v['threads']:.0f}",
                    ]
                )
    return markdown_table(
        ["process", "port", "when", "Rss kB", "Pss kB", "Pss anon kB", "threads"], rows, 3
    )


def _labels(results: Results, study: str) -> list[str]:
    seen: list[str] = []
    for s in results.samples:
        if s.study == study and s.variant not in seen:
            seen.append(s.variant)
    return seen


def _counts(results: Results, study: str, label: str) -> list[int]:
    return sorted({s.params["ports"] for s in results.select(study, variant=label)})


def _publish_table(results: Results) -> str:
    rows = []
    for label in _labels(results, "publish"):
        for count in sorted({s.params["ports"] for s in results.select("publish", "run", label)}):
            samples = results.select("publish", "run", label, ports=count)
            objects = summarize(s.values.get("kernel_objects") for s in samples)
            helpers = summarize(s.values.get("helpers_pss_mib") for s in samples)
            answering = summarize(s.values.get("answering") for s in samples)
            answering6 = summarize(s.values.get("answering6") for s in samples)
            http_ok = summarize(s.values.get("http_ok") for s in samples)
            answers = "" if answering is None else f"{answering.low:,.0f}"
            if answering6 is not None:
                answers += f" / {answering6.low:,.0f}"
            http = ""
            if http_ok is not None and samples:
                http = f"{http_ok.low:.0f}/{samples[0].params.get('http_sample', '?')}"
            rows.append(
                [
                    display(label),
                    f"{count:,}",
                    spread(summarize(s.values["run_s"] for s in samples), 3),
                    spread(summarize(s.values["rm_s"] for s in samples), 3),
                    number(objects.median if objects else None, 0),
                    number(helpers.median if helpers else None, 1),
                    answers,
                    http,
                ]
            )
    headers = ["mode/backend", "ports", "create+start s", "rm -f s", "rules + elements"]
    return markdown_table(
        [
            *headers,
            "daemon's helper processes, total Pss MiB",
            "ports answering, fewest (127.0.0.1 / ::1; a SYN to pyengine-proxy, else connect)",
            "HTTP 200, fewest",
        ],
        rows,
    )


BACKEND_ORDER = ("nftables", "iptables", "dockerd", "dockerd+pyengine-proxy")
# The bar: with many ports published, the new-connection rate and the p99 latency stay
# within 5 % of their 1-port figures.
SCALING_TOLERANCE = 0.05


def _median(
    results: Results, study: str, metric: str, label: str, key: str, **params: object
) -> float | None:
    stat = results.stat(study, metric, label, key, **params)
    return stat.median if stat else None


def _connrate_table(results: Results) -> str:
    rows = []
    for label in _labels(results, "connrate"):
        counts = _counts(results, "connrate", label)
        base_rate = _median(results, "connrate", "http-close", label, "req_s", ports=counts[0])
        base_p99 = _median(results, "connrate", "http-close", label, "p99_ms", ports=counts[0])
        base_connect = _median(
            results, "connrate", "http-close", label, "connect_p99_ms", ports=counts[0]
        )
        for count in counts:
            rate = results.stat("connrate", "http-close", label, "req_s", ports=count)
            p99 = results.stat("connrate", "http-close", label, "p99_ms", ports=count)
            connect = results.stat("connrate", "http-close", label, "connect_p99_ms", ports=count)
            connect_p50 = results.stat(
                "connrate", "http-close", label, "connect_p50_ms", ports=count
            )
            rows.append(
                [
                    label,
                    f"{count:,}",
                    spread(rate, 0),
                    number(ratio(rate.median if rate else None, base_rate)),
                    spread(results.stat("connrate", "http-close", label, "p50_ms", ports=count)),
                    spread(p99),
                    number(ratio(p99.median if p99 else None, base_p99)),
                    spread(connect_p50, 3),
                    spread(connect, 3),
                    number(ratio(connect.median if connect else None, base_connect)),
                ]
            )
    return markdown_table(
        [
            "mode/backend",
            "published ports",
            "new connections/s",
            "÷ fewest ports",
            "p50 ms",
            "p99 ms",
            "p99 ÷ fewest ports",
            "connect p50 ms",
            "connect p99 ms",
            "connect p99 ÷ fewest ports",
        ],
        rows,
    )


def _within(value: float | None) -> str:
    if value is None:
        return DASH
    return "yes" if abs(value - 1) <= SCALING_TOLERANCE else "no"


def connrate_scaling(results: Results) -> list[dict[str, object]]:
    """Per mode/backend: the most ÷ the fewest published ports (of those measured, ports > 0)
    for the new-connection rate, wrk's p99 latency and the p99 first-packet (connect)
    latency."""
    rows: list[dict[str, object]] = []
    for label in _labels(results, "connrate"):
        counts = [c for c in _counts(results, "connrate", label) if c > 0]
        if len(counts) < 2:
            continue
        low, high = counts[0], counts[-1]
        row: dict[str, object] = {"label": label, "fewest": low, "most": high}
        for key in ("req_s", "p99_ms", "connect_p99_ms"):
            row[key] = ratio(
                _median(results, "connrate", "http-close", label, key, ports=high),
                _median(results, "connrate", "http-close", label, key, ports=low),
            )
        rows.append(row)
    return rows


def _connrate_scaling_table(results: Results) -> str:
    rows = []
    for row in connrate_scaling(results):
        cells = [str(row["label"]), f"{row['most']:,} ÷ {row['fewest']:,}"]
        for key in ("req_s", "p99_ms", "connect_p99_ms"):
            value = row[key]
            assert value is None or isinstance(value, float)
            cells += [number(value), _within(value)]
        rows.append(cells)
    if not rows:
        return ""
    return markdown_table(
        [
            "mode/backend",
            "published ports",
            "new connections/s ratio",
            "within 5 %",
            "wrk p99 ratio",
            "within 5 %",
            "connect p99 ratio",
            "within 5 %",
        ],
        rows,
    )


def _by_backend(results: Results, mode: str) -> list[str]:
    labels = {s.variant for s in results.select("publish", "run") if s.params["mode"] == mode}
    return [f"{mode}/{b}" for b in BACKEND_ORDER if f"{mode}/{b}" in labels]


def _docker_table(results: Results, key: str, digits: int, ratios: bool = True) -> str:
    """``key`` per (mode, N) for every backend side by side, and (``ratios``) dockerd ÷ each
    of pyengine's."""
    rows = []
    ratio_headers: list[str] = []
    for mode in ("dnat", "proxy"):
        labels = _by_backend(results, mode)
        docker = f"{mode}/dockerd"
        if docker not in labels:
            continue
        others = [label for label in labels if "/dockerd" not in label] if ratios else []
        ratio_headers = ratio_headers or [f"dockerd ÷ {o.split('/')[1]}" for o in others]
        counts = sorted({c for label in labels for c in _counts(results, "publish", label)})
        for count in counts:
            medians = [
                _median(results, "publish", "run", label, key, ports=count) for label in labels
            ]
            by_label = dict(zip(labels, medians, strict=True))
            cells = [mode, f"{count:,}"]
            cells += [number(by_label.get(f"{mode}/{b}"), digits) for b in BACKEND_ORDER]
            cells += [number(ratio(by_label.get(docker), by_label.get(o))) for o in others]
            rows.append(cells)
    if not rows:
        return ""
    width = 2 + len(BACKEND_ORDER) + len(ratio_headers)
    rows = [r + [DASH] * (width - len(r)) for r in rows]
    headers = ["mode", "ports", "pyengine nftables", "pyengine iptables"]
    headers += ["dockerd (proxy: +docker-proxy)", "dockerd+pyengine-proxy"]
    return markdown_table([*headers, *ratio_headers], rows)


def _docker_section(results: Results) -> str:
    if not any(s.variant.endswith("/dockerd") for s in results.select("publish")):
        return ""
    version = results.tools.get("docker-proxy", "docker.io")
    out = [
        f"dockerd from {version}, started by the bench with its own roots, socket, bridge and "
        "cgroup parent, `--iptables=true --ip-forward=false`, `--userland-proxy=false` (dnat) "
        "or `=true` (proxy: its docker-proxy, and again with `--userland-proxy-path` to "
        "pyengine-docker-proxy), one at a time after pyengined's samples; the same API calls "
        "(create, start, `rm -f` of one nginx container with N ports → 80). Medians.\n\n",
        "### create + start, seconds\n\n",
        _docker_table(results, "run_s", 3),
        "\n### rm -f, seconds\n\n",
        _docker_table(results, "rm_s", 3),
        "\n### Rules (+ map elements) while published\n\n"
        "pyengine nftables: rules and map elements of its table; pyengine iptables: rules naming "
        "its chains; dockerd: the rules it added (DOCKER, DOCKER-USER, DOCKER-ISOLATION-STAGE-1/2, "
        "the jumps to them, the rules naming its bridge).\n\n",
        _docker_table(results, "kernel_objects", 0, ratios=False),
    ]
    return "".join(out)


def _first_response_table(results: Results) -> str:
    rows = []
    for label in _labels(results, "first-response"):
        samples = results.select("first-response", "run-to-200", label)
        outcomes: Counter[str] = Counter()
        for s in samples:
            outcomes.update(s.params.get("probe_outcomes", {}))
        rows.append(
            [
                label,
                spread(summarize(s.values["first_200_s"] for s in samples), 3),
                spread(summarize(s.values["run_returned_s"] for s in samples), 3),
                ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())) or DASH,
            ]
        )
    return markdown_table(
        ["mode/backend", "first HTTP 200 s", "run -d returned s", "probe outcomes (all runs)"],
        rows,
    )


def _machine(results: Results) -> str:
    m = results.machine
    t = results.tools
    return (
        f"- Machine: {m.get('cpu')} × {m.get('cpus')} CPUs, {m.get('memory_mib', 0):,} MiB, "
        f"kernel {m.get('kernel')}, {m.get('os')}, cgroup {m.get('cgroup')}; load average at "
        f"start {' '.join(m.get('loadavg_at_start', []))}.\n"
        f"- Tools: {t.get('iperf3')}; {t.get('wrk')}; docker-proxy from {t.get('docker-proxy')}; "
        f"socat {t.get('socat')}; {t.get('runc', '').split(chr(10))[0]}; {t.get('nft')}; "
        f"Python {t.get('python')}, uvloop {t.get('uvloop')}, pyengine {t.get('pyengine')}.\n"
    )


def _disturbance(results: Results) -> str:
    data = [s for s in results.samples if s.study == "datapath"]
    if not data:
        return ""
    disturbed = sum(1 for s in data if s.disturbed)
    redone = sum(1 for s in data if s.attempts > 1)
    foreign = summarize(s.load.get("foreign_cpu_s", 0) / s.wall_s for s in data if s.wall_s)
    busy = summarize(s.load.get("machine_busy_cpu_s", 0) / s.wall_s for s in data if s.wall_s)
    failed = sum(1 for s in data if not s.ok)
    limit = results.config.get("disturbed_cpus")
    return (
        f"Data-path samples: {len(data)}, {failed} failed. Machine busy during a sample: "
        f"{spread(busy)} CPUs of {results.machine.get('cpus')}; CPU used by processes this "
        f"benchmark did not start: {spread(foreign)} CPUs. {redone} samples were measured again "
        f"because other processes used more than {limit} CPUs during them; {disturbed} kept "
        "that flag after the last attempt.\n"
    )


def _connrate_conditions(results: Results) -> str:
    rates = [s for s in results.samples if s.study == "connrate" and s.ok and s.wall_s]
    measured = [s for s in rates if s.load]
    if not measured:
        return ""
    foreign = summarize(s.load.get("foreign_cpu_s", 0) / s.wall_s for s in measured)
    busy = summarize(s.load.get("machine_busy_cpu_s", 0) / s.wall_s for s in measured)
    disturbed = sum(1 for s in measured if s.disturbed)
    return (
        f"Connection-rate samples: {len(rates)}. Machine busy during a sample: {spread(busy)} "
        f"CPUs of {results.machine.get('cpus')}; CPU used by processes this benchmark did not "
        f"start: {spread(foreign)} CPUs; {disturbed} samples had more than "
        f"{results.config.get('disturbed_cpus')} such CPUs busy (not measured again).\n"
    )


def render_headline(results: Results) -> str:
    """Title, machine, variants and the two ratio tables: what the terminal shows at the end."""
    out: list[str] = []
    title = "pyengine benchmark: userland proxies vs kernel DNAT"
    out.append(f"# {title}{' (--quick)' if results.quick else ''}\n\n")
    out.append(
        f"Run `{results.run_id}`, {results.started} to {results.finished or 'unfinished'}. "
        f"Command: `{results.command}`.\n\n"
    )
    if results.aborted:
        out.append(
            f"**The run stopped early: {results.aborted}. The tables hold what was measured.**\n\n"
        )
    out.append(_machine(results))
    cfg = results.config
    out.append(
        f"- Data path: {cfg.get('repeat')} repetitions of {cfg.get('duration_s')} s per sample, "
        "variants alternated A B C … A B C; medians, with (min–max) where there are several. "
        f"wrk -t{cfg.get('wrk_threads')} -c{cfg.get('wrk_connections')}; iperf3 UDP "
        f"-b {cfg.get('udp_rate')} -l {cfg.get('udp_length')}.\n"
    )
    out.append("\nVariants:\n\n")
    for v in results.variants:
        out.append(f"- `{v['name']}`: {v['path']}\n")
    if any(s.study == "datapath" for s in results.samples):
        for ref in REFERENCES:
            out.append(f"\n## Headline: median ÷ {ref} (bold), with the median beside it\n\n")
            out.append(_glance(results, ref))
        out.append(
            "\nHigher is better in every column: Gbit/s, requests/s, MB/s, UDP Mbit/s received.\n"
        )
    return "".join(out)


def render(results: Results) -> str:
    out: list[str] = [render_headline(results)]
    if any(s.study == "datapath" for s in results.samples):
        out.append("\n## Data path, all figures\n\n")
        out.append(_datapath_table(results))
        out.append("\n## Latency (wrk; measured from writing the request)\n\n")
        out.append(_latency_table(results))
        if any(m.id == "udp" for m in _metrics(results)):
            out.append("\n## UDP (iperf3, receiver side)\n\n")
            out.append(_udp_table(results))
        out.append("\n## Proxy CPU per unit of work (median; from /proc/PID/stat)\n\n")
        out.append(_cpu_table(results))
    if any(s.study == "memory" for s in results.samples):
        out.append("\n## Memory of one proxy process (/proc/PID/smaps_rollup)\n\n")
        out.append(_memory_table(results))
    if any(s.study == "first-response" for s in results.samples):
        out.append(
            "\n## `pyengine run -d -p 127.0.0.1:P:80 nginx` to the first HTTP 200 "
            "(new connection every 5 ms, each given up after 0.1 s)\n\n"
        )
        out.append(_first_response_table(results))
    if any(s.study == "publish" for s in results.samples):
        out.append("\n## Publishing N ports (create + start of one container, and rm -f)\n\n")
        out.append(_publish_table(results))
        docker = _docker_section(results)
        if docker:
            out.append("\n## Publishing against Docker\n\n")
            out.append(docker)
        launcher = dockerd_proxy_section(results)
        if launcher:
            out.append("\n## dockerd's userland proxy: docker-proxy vs pyengine-proxy\n\n")
            out.append(launcher)
    if any(s.study == "connrate" for s in results.samples):
        out.append(
            "\n## DNAT connection rate vs published ports "
            "(wrk, new connection per request, external client -> last published port)\n\n"
            "wrk's latency starts when the request is written, after the handshake; the DNAT "
            "lookup happens on the SYN, so it shows in the rate and in the connect latency "
            "(connect() timed one connection at a time from the client, before wrk runs).\n\n"
        )
        out.append(_connrate_table(results))
        scaling = _connrate_scaling_table(results)
        if scaling:
            out.append(
                "\n### Most ÷ fewest published ports (the bar: within "
                f"{SCALING_TOLERANCE:.0%} of the fewest-ports figures)\n\n"
            )
            out.append(scaling)
    failed = [s for s in results.samples if not s.ok]
    if failed:
        out.append("\n## Failed samples\n\n")
        for s in failed:
            params = ", ".join(f"{k} {v}" for k, v in s.params.items() if k != "probe_outcomes")
            where = f"{s.study} {s.metric} · {s.variant} · rep {s.rep + 1}"
            out.append(f"- {where}{f' ({params})' if params else ''}: {s.error}\n")
    if results.skipped:
        out.append("\n## Not measured\n\n")
        for item in results.skipped:
            out.append(f"- {item['what']}: {item['why']}\n")
    out.append("\n## Conditions\n\n")
    out.append(_disturbance(results) or "No data-path samples.\n")
    connrate = _connrate_conditions(results)
    if connrate:
        out.append(f"\n{connrate}")
    for note in results.notes:
        out.append(f"\n{note}\n")
    if results.plots:
        out.append("\n## Plots\n\n")
        for name in results.plots:
            out.append(f"![{name}](plots/{name})\n")
    return "".join(out)
