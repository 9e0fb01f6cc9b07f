"""pyengine-bench (``python -m bench``): the proxy-vs-DNAT benchmark, anchors in the same run.

    python -m bench --quick --out /tmp/bench-quick        # every variant once, about a minute
    python -m bench --out bench-results                   # the reference run (~15 minutes)
    python -m bench --report-only bench-results/results.json --out bench-results
    pyengine-bench dns --json dns.json                    # the DNS responder vs dnsmasq
    pyengine-bench cni --json cni.json                    # pyengine-cni vs bridge + portmap

Writes OUT/results.json (raw samples), OUT/results.md (tables) and OUT/plots/*.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from bench.cleanup import Cleanup, Interrupted
from bench.config import DOCKERD_ROWS, STUDIES, VARIANTS, BenchConfig
from bench.daemons import BenchDaemonError, available_backends
from bench.datapath import METRICS, datapath_steps, memory_steps, record_memory, run_datapath
from bench.environment import (
    Environment,
    build_environment,
    describe,
    leftovers_after,
    start_study_daemon,
)
from bench.firstresponse import first_response_daemons, run_first_response
from bench.loadgen import LoadError
from bench.ports import NoFreePorts
from bench.progress import Progress
from bench.publishing import run_docker_publishing, run_publishing
from bench.report import render, render_headline
from bench.results import Results
from bench.spawn import SpawnError
from bench.tools import MissingTool, machine_description, tool_versions
from bench.topology import TopologyError
from client.http import DaemonError, DaemonUnreachable
from common.timefmt import utc_rfc3339
from engine.images.build import ImageBuildError

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
# Failures that end the run with one clear line (anything else is a bug: full traceback).
EXPECTED_FAILURES = (
    MissingTool,
    BenchDaemonError,
    DaemonError,
    DaemonUnreachable,
    ImageBuildError,
    LoadError,
    NoFreePorts,
    SpawnError,
    TopologyError,
    RuntimeError,
    OSError,
)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in _csv(text))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyengine-bench",
        description="Benchmark pyengine's userland proxy against kernel DNAT, docker-proxy "
        "and socat, in network namespaces it creates and removes.",
        epilog="pyengine-bench dns [--help]: the embedded DNS responder against dnsmasq.",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="every variant once, small sizes (~1 min)")
    p.add_argument("--repeat", type=int, help="data-path repetitions (default 5; quick 1)")
    p.add_argument("--duration", type=int, help="seconds per iperf3/wrk sample (default 3)")
    p.add_argument("--variants", type=_csv, help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--metrics", type=_csv, help=f"subset of {','.join(METRICS)}")
    p.add_argument("--udp-rate", help="iperf3 UDP rate (default 500M)")
    p.add_argument(
        "--publish-counts", type=_counts, help="ports to publish (default 0,1,100,1000,10000)"
    )
    p.add_argument("--publish-repeat", type=int, help="repetitions of the publishing study")
    p.add_argument(
        "--proxy-publish-max",
        type=int,
        help="largest N published in pyengine's proxy mode (one process per port; default 10000)",
    )
    p.add_argument("--connrate-duration", type=int, help="seconds per connection-rate sample")
    p.add_argument(
        "--connect-probe-duration",
        type=float,
        help="seconds of one-at-a-time connect() timing per connection-rate sample (2; 0: off)",
    )
    p.add_argument(
        "--studies",
        type=_csv,
        help=f"subset of {','.join(STUDIES)} (publish includes the connection rate)",
    )
    p.add_argument(
        "--docker",
        action=argparse.BooleanOptionalAction,
        help="also publish through Debian's dockerd, started by the bench (default: yes)",
    )
    p.add_argument(
        "--docker-publish-max", type=int, help="largest N published through dockerd (1000)"
    )
    p.add_argument(
        "--dockerd-rows",
        type=_csv,
        help=f"dockerd rows of the publishing study, subset of {','.join(DOCKERD_ROWS)}",
    )
    p.add_argument("--first-response-repeat", type=int, help="repetitions of run -d -p to 200")
    p.add_argument(
        "--backends", type=_csv, help="firewall backends (default: all pyengined offers)"
    )
    p.add_argument("--redo-disturbed", type=int, help="extra attempts for a disturbed sample")
    p.add_argument(
        "--disturbed-cpus", type=float, help="foreign CPUs that mark a sample disturbed (0.25)"
    )
    p.add_argument(
        "--install-missing", action="store_true", help="apt-get install missing tools first"
    )
    p.add_argument("--image-cache", type=Path, help="where the image archives are (or go)")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="only regenerate results.md and the plots from an earlier results.json",
    )
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick_profile(args.out) if args.quick else BenchConfig(out=args.out)
    overrides = {
        "repeat": args.repeat,
        "duration_s": args.duration,
        "variants": args.variants,
        "metrics": args.metrics,
        "udp_rate": args.udp_rate,
        "publish_counts": args.publish_counts,
        "publish_repeat": args.publish_repeat,
        "proxy_publish_max": args.proxy_publish_max,
        "connrate_duration_s": args.connrate_duration,
        "connect_probe_s": args.connect_probe_duration,
        "studies": args.studies,
        "docker": args.docker,
        "docker_publish_max": args.docker_publish_max,
        "dockerd_rows": args.dockerd_rows,
        "first_response_repeat": args.first_response_repeat,
        "backends": args.backends,
        "redo_disturbed": args.redo_disturbed,
        "disturbed_cpus": args.disturbed_cpus,
        "image_cache": args.image_cache,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.install_missing = args.install_missing
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})")
    cfg.validate()
    return cfg


def _command_line(argv: list[str]) -> str:
    program = "python -m bench" if sys.argv[0].endswith("__main__.py") else "pyengine-bench"
    return f"{program} {shlex.join(argv)}".strip()


def write_outputs(results: Results, out: Path) -> list[Path]:
    """results.json, plots/*.png and results.md (which links the plots)."""
    out.mkdir(parents=True, exist_ok=True)
    from bench.plots import write_plots

    try:
        results.plots = write_plots(results, out / "plots")
    except ImportError as exc:  # matplotlib went missing between the check and now
        results.notes.append(f"No plots: {exc}.")
    results.write(out / "results.json")
    (out / "results.md").write_text(render(results))
    return [out / "results.json", out / "results.md", *(out / "plots" / p for p in results.plots)]


def _backends(cfg: BenchConfig) -> list[str]:
    offered = available_backends()
    wanted = list(cfg.backends) or offered
    missing = [b for b in wanted if b not in offered]
    if missing:
        raise MissingTool(f"pyengined offers no firewall backend {', '.join(missing)} ({offered})")
    return wanted


def _publish_steps(cfg: BenchConfig, backends: list[str]) -> int:
    if "publish" not in cfg.studies:
        return 0
    per_rep = 0
    for _backend in backends:
        for proxy in (True, False):
            per_rep += sum(1 for n in cfg.publish_counts if not proxy or n <= cfg.proxy_publish_max)
    if cfg.docker:
        for row in cfg.dockerd_rows:
            proxy = row != "dnat"
            top = min(cfg.docker_publish_max, cfg.proxy_publish_max if proxy else 1 << 30)
            per_rep += sum(1 for n in cfg.publish_counts if n <= top)
    return per_rep * cfg.publish_repeat


def run_studies(
    env: Environment, cleanup: Cleanup, results: Results, progress: Progress, backends: list[str]
) -> None:
    cfg = env.cfg
    progress.plan(
        (2 * memory_steps(env) if "memory" in cfg.studies else 0)
        + (datapath_steps(env) if "datapath" in cfg.studies else 0)
        + (
            cfg.first_response_repeat * len(first_response_daemons(env))
            if "first-response" in cfg.studies
            else 0
        )
        + _publish_steps(cfg, backends)
    )
    if "memory" in cfg.studies:
        record_memory(env, results, progress, "idle-fresh")
    if "datapath" in cfg.studies:
        run_datapath(env, results, progress)
    if "memory" in cfg.studies:
        record_memory(env, results, progress, "idle-after-load")
    if "first-response" in cfg.studies:
        run_first_response(env, results, progress)
    if "publish" not in cfg.studies:
        return
    daemons = []
    for backend in backends:
        for proxy in (True, False):
            if backend == "nftables":
                daemons.append(env.daemons["proxy" if proxy else "dnat"])
            else:
                progress.note(f"starting pyengined with --firewall-backend={backend}")
                try:
                    daemons.append(start_study_daemon(env, cleanup, proxy, backend))
                except (BenchDaemonError, DaemonError, DaemonUnreachable) as exc:
                    why = str(exc).splitlines()[0]
                    progress.note(f"no publishing study on {backend}: {why}")
                    mode = "proxy" if proxy else "dnat"
                    results.skipped.append({"what": f"publishing, {mode}/{backend}", "why": why})
    run_publishing(env, daemons, results, progress)
    if cfg.docker:
        # dockerd's rules go into the same iptables tables as pyengined's iptables backend
        # (they coexist: different chain names, different ports), but it is measured alone.
        for daemon in daemons:
            if daemon.backend == "iptables":
                daemon.stop()
        run_docker_publishing(env, cleanup, results, progress)
    else:
        results.skipped.append({"what": "publishing through dockerd", "why": "--no-docker"})


def new_results(env: Environment, command: str, started: str, backends: list[str]) -> Results:
    notes = [
        "The machine is shared: unrelated test suites ran during this benchmark. Compare "
        "the ratios (all variants were alternated within each metric, so they saw the same "
        "conditions) rather than the absolute figures.",
        f"Firewall backends measured in the publishing study: {', '.join(backends)}.",
    ]
    return Results(
        command=command,
        run_id=env.names.run_id,
        started=started,
        quick=env.cfg.quick,
        config=env.cfg.to_json(),
        machine=machine_description(),
        tools=tool_versions(env.tools),
        variants=[{"name": v.name, "path": v.path} for v in env.variants],
        metrics=[{"id": m, "title": METRICS[m].title} for m in (env.cfg.metrics or tuple(METRICS))],
        notes=notes,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dns"]:
        from bench.dns import main as dns_main

        program = "python -m bench dns" if sys.argv[0].endswith("__main__.py") else None
        return dns_main(argv[1:], prog=program or "pyengine-bench dns")
    if argv[:1] == ["cni"]:
        from bench.cni import main as cni_main

        program = "python -m bench cni" if sys.argv[0].endswith("__main__.py") else None
        return cni_main(argv[1:], prog=program or "pyengine-bench cni")
    args = parser().parse_args(argv)
    if args.report_only:
        stored = Results.read(args.report_only)
        for path in write_outputs(stored, args.out):
            print(path)
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"pyengine-bench: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("pyengine-bench: needs root (namespaces, bridges, nftables, runc)", file=sys.stderr)
        return EXIT_FAILED
    progress = Progress()
    started = utc_rfc3339(digits=0)
    results: Results | None = None
    env: Environment | None = None
    exit_code = 0
    try:
        with Cleanup(progress.note) as cleanup:
            backends = _backends(cfg)
            env = build_environment(cfg, cleanup, progress)
            results = new_results(env, _command_line(argv), started, backends)
            try:
                run_studies(env, cleanup, results, progress, backends)
                results.completed = True
            finally:
                progress.note("removing everything the run created")
    except (KeyboardInterrupt, Interrupted) as exc:
        reason = str(exc) if isinstance(exc, Interrupted) else "stopped by SIGINT"
        progress.note(f"interrupted: {reason}")
        if results is not None:
            results.aborted = reason
        exit_code = EXIT_INTERRUPTED
    except EXPECTED_FAILURES as exc:
        print(f"pyengine-bench: {exc}", file=sys.stderr)
        if results is not None:
            results.aborted = str(exc).splitlines()[0]
        exit_code = EXIT_FAILED
    if env is not None:
        if results is not None:
            results.environment = describe(env)
        left = leftovers_after(env)
        if left:
            line = f"left behind after clean-up: {', '.join(left)}"
            progress.note(line)
            if results is not None:
                results.notes.append(line)
            exit_code = exit_code or EXIT_FAILED
    if results is None or not results.samples:
        return exit_code or EXIT_FAILED
    results.finished = utc_rfc3339(digits=0)
    paths = write_outputs(results, cfg.out)
    progress.note(f"wrote {paths[0]}, {paths[1]} and {len(paths) - 2} plots")
    print(render_headline(results))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
