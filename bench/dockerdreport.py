"""The report's section on dockerd's userland proxy: docker-proxy against pyengine's drop-in.

Both rows are Debian's dockerd in proxy mode, the second with ``--userland-proxy-path`` to
``pyengine-docker-proxy``. Older results name the first ``proxy/dockerd`` only; the report
calls it ``dockerd+docker-proxy``.
"""

from __future__ import annotations

from bench.results import Results, Sample, ratio, summarize

DOCKER_PROXY = "proxy/dockerd"  # the sample label (older results have it too)
LAUNCHER = "proxy/dockerd+pyengine-proxy"
DISPLAY = {DOCKER_PROXY: "dockerd+docker-proxy", LAUNCHER: "dockerd+pyengine-proxy"}
DASH = "–"


def display(label: str) -> str:
    """How the report names a publishing row: ``proxy/dockerd+docker-proxy`` for the
    docker-proxy dockerd, the label itself otherwise."""
    return "proxy/dockerd+docker-proxy" if label == DOCKER_PROXY else label


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return DASH
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---:"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _runs(results: Results, label: str, count: int) -> list[Sample]:
    return results.select("publish", "run", label, ports=count)


def _median(results: Results, label: str, count: int, key: str) -> float | None:
    stat = summarize(s.values.get(key) for s in _runs(results, label, count))
    return stat.median if stat else None


def _fewest(samples: list[Sample], key: str) -> float | None:
    stat = summarize(s.values.get(key) for s in samples)
    return stat.low if stat else None


def _most(samples: list[Sample], key: str) -> float | None:
    stat = summarize(s.values.get(key) for s in samples)
    return stat.high if stat else None


def _counts(results: Results) -> list[int]:
    return sorted(
        {s.params["ports"] for label in DISPLAY for s in results.select("publish", "run", label)}
    )


def _side_by_side(results: Results, keys: list[tuple[str, str, int]]) -> str:
    headers = ["ports"]
    for _key, title, _digits in keys:
        headers += [f"{title}, docker-proxy", f"{title}, pyengine-proxy", "÷"]
    rows = []
    for count in _counts(results):
        row = [f"{count:,}"]
        for key, _title, digits in keys:
            old = _median(results, DOCKER_PROXY, count, key)
            new = _median(results, LAUNCHER, count, key)
            row += [_number(old, digits), _number(new, digits), _number(ratio(new, old), 2)]
        rows.append(row)
    return _table(headers, rows)


def _checks(results: Results) -> str:
    rows = []
    for label, name in DISPLAY.items():
        for count in _counts(results):
            samples = _runs(results, label, count)
            if not samples:
                continue
            sampled = samples[0].params.get("http_sample", "?")
            http = _fewest(samples, "http_ok")
            kill = [s for s in samples if s.values.get("answering_after_server_kill") is not None]
            after = DASH
            if kill:
                after = (
                    f"{_number(_fewest(kill, 'answering_after_server_kill'), 0)} / "
                    f"{_number(_fewest(kill, 'answering6_after_server_kill'), 0)}, HTTP "
                    f"{_number(_fewest(kill, 'http_ok_after_server_kill'), 0)}/{sampled}"
                )
            rows.append(
                [
                    name,
                    f"{count:,}",
                    f"{_number(_fewest(samples, 'answering'), 0)} / "
                    f"{_number(_fewest(samples, 'answering6'), 0)}",
                    f"{_number(http, 0)}/{sampled}",
                    after,
                    _number(_most(samples, "proxies_left"), 0),
                ]
            )
    return _table(
        [
            "row",
            "ports",
            "answering, fewest (127.0.0.1 / ::1)",
            "HTTP 200, fewest",
            "after SIGKILL of the host server: answering / ::1, HTTP 200",
            "proxy processes left after rm -f, most",
        ],
        rows,
    )


def _udp(results: Results) -> str:
    lines = []
    for label, name in DISPLAY.items():
        for s in results.select("publish", "udp-echo", label):
            v = s.values

            def ok(key: str, v: dict[str, float | None] = v) -> str:
                return "answered" if v.get(key) else "FAILED"

            lines.append(
                f"- {name}: one UDP port published on every address, a datagram via 127.0.0.1 "
                f"{ok('udp_echo_127')}, via ::1 {ok('udp_echo_v6')}; "
                f"{_number(v.get('proxies_left'), 0)} proxy processes left after rm -f.\n"
            )
        for s in results.samples:
            if s.study == "publish" and s.metric == "udp-echo" and s.variant == label and s.error:
                lines.append(f"- {name}: UDP check FAILED: {s.error}\n")
    return "".join(lines)


def dockerd_proxy_section(results: Results) -> str:
    """The side-by-side tables, or "" when the run has no launcher row."""
    if not results.select("publish", "run", LAUNCHER):
        return ""
    out = [
        "Debian's dockerd in proxy mode (`--iptables=true`, a TCP port published on every "
        "address → nginx:80, N of them on one container): its own docker-proxy, or "
        "`--userland-proxy-path` = `pyengine-docker-proxy` (a launcher per port and family, "
        "one shared host server that forks the proxies). Medians; ÷ is pyengine-proxy ÷ "
        "docker-proxy (below 1: less).\n\n",
        "### Time, seconds\n\n",
        _side_by_side(results, [("run_s", "create+start", 3), ("rm_s", "rm -f", 3)]),
        "\n### Memory while published, total Pss MiB\n\n"
        "Helpers: containerd and its shims (both rows) plus the proxies. Proxies alone: the "
        "docker-proxy processes; or the launchers, the host server and the proxies it forked. "
        "Measured before any connection.\n\n",
        _side_by_side(
            results,
            [
                ("helpers_pss_mib", "helpers", 1),
                ("proxies_pss_mib", "proxies alone", 1),
                ("proxy_processes", "processes", 0),
            ],
        ),
        "\n### Checks\n\n"
        "Every port by connect() on 127.0.0.1 and on ::1 (dockerd runs one proxy on 0.0.0.0 "
        "and one on :: per port); 20 ports spread over the range by an HTTP GET. The host "
        "server is killed in the last repetition only (the next sample starts it again).\n\n",
        _checks(results),
    ]
    udp = _udp(results)
    if udp:
        out.append(f"\n{udp}")
    return "".join(out)
