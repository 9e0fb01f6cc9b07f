"""The control-plane studies.

- Publishing: ``create`` + ``start`` of an nginx container with N host ports published to its
  port 80 (N = 0, 1, 100, 1,000, 10,000), and ``rm -f`` of it, per proxy mode and firewall
  backend, with the kernel objects the daemon's firewall holds while they are published, the
  total PSS of the daemon's helper processes, how many ports answer a SYN (every one, without
  waking its proxy: ``bench.synprobe``) and how many of a sample of 20 serve an HTTP 200.
- Connection rate: with N ports published in DNAT mode, wrk opens a new connection per request
  from the external client to the last of them (how the lookup scales with N); before it, the
  first-packet latency: connect() timed one connection at a time (``bench.connectprobe``).
- Both against Debian's dockerd (``bench.dockerd``), driven through the same Docker API calls,
  one dockerd at a time, after pyengined's samples: DNAT mode, proxy mode with its
  docker-proxy, and proxy mode with pyengine's launcher as its userland proxy (the checks
  particular to those two: ``bench.dockerdproxychecks``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import dockerdproxychecks, procfs, synprobe
from bench.accounting import CpuSnapshot, usage_between
from bench.cleanup import Cleanup
from bench.config import DOCKERD_ROWS
from bench.connectprobe import ProbeError, measure_connect_latency
from bench.daemons import BenchDaemon, BenchDaemonError, Publish
from bench.dockerarchive import ArchiveError
from bench.dockerd import LAUNCHER, DockerDaemon, DockerdCleanupError, DockerdUnavailable
from bench.environment import (
    HTTP_PORT,
    NGINX_COMMAND,
    READY_TIMEOUT_SECONDS,
    SMALL_PATH,
    Environment,
    start_study_dockerd,
)
from bench.httpprobe import count_connecting, probe, wait_for_200
from bench.listening import count_listening
from bench.loadgen import LoadError, Target, run_wrk
from bench.progress import Progress
from bench.results import Results, Sample
from client.http import DaemonError, DaemonUnreachable

# Upper bound for one create + start (dockerd needs minutes for 10,000 ports).
PUBLISH_TIMEOUT_SECONDS = 1800
# Ports of each sample that also serve a full HTTP request (spread over the range).
HTTP_SAMPLE = 20
HTTP_TIMEOUT_SECONDS = 10.0


def kernel_objects(daemon: BenchDaemon) -> float | None:
    """Rules plus map/set elements in the daemon's nftables table, or iptables rules naming
    its table, or (dockerd) the iptables rules dockerd added: its chains' rules, the jumps to
    them and the rules naming its bridge; None when they cannot be read."""
    if isinstance(daemon, DockerDaemon):
        return float(daemon.added_rules().rule_count)
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
    """Total Pss of the daemon's helper processes outside containers, in MiB: pyengined's
    proxies, their fork server and the container monitors; dockerd's docker-proxy processes,
    containerd and its shims."""
    total_kb = 0
    for pid in daemon.helper_pids():
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
        daemon.start_published(container_id, PUBLISH_TIMEOUT_SECONDS)
        run_s = time.monotonic() - t0
        objects = kernel_objects(daemon)
        helpers_pss = helper_processes_pss_mib(daemon)
        docker_proxied = dockerdproxychecks.proxied_dockerd(daemon)
        extra = dockerdproxychecks.footprint(docker_proxied) if docker_proxied else {}
        # Proxy mode: the ports whose proxies listen, on IPv4 and on IPv6.
        listening = listening6 = answering = answering6 = http_ok = None
        if daemon.userland_proxy and count:
            listening = float(count_listening(ports, ("tcp",)))
            listening6 = float(count_listening(ports, ("tcp6",)))
        if count:
            # Every port: pyengine's idle proxies by a SYN, which does not wake them
            # (bench/synprobe.py); other ports by a connect(). Then the relay itself on a few
            # ports spread over the range (each wakes its proxy).
            if daemon.userland_proxy and not isinstance(daemon, DockerDaemon):
                answering = float(len(synprobe.answering("127.0.0.1", ports)))
                answering6 = float(len(synprobe.answering("::1", ports)))
            else:
                # Through DNAT a connect reaches nginx itself, which may not listen yet.
                wait_for_200("127.0.0.1", ports[0], READY_TIMEOUT_SECONDS)
                answering = float(count_connecting("127.0.0.1", ports))
                if docker_proxied:  # its proxies on "::" too
                    answering6 = float(count_connecting("::1", ports))
            wait_for_200("127.0.0.1", ports[0], READY_TIMEOUT_SECONDS)  # nginx listens
            sample_ports = ports[:: max(1, count // HTTP_SAMPLE)]
            http_ok = float(
                sum(probe("127.0.0.1", port, HTTP_TIMEOUT_SECONDS) == "ok" for port in sample_ports)
            )
            sample.params["http_sample"] = len(sample_ports)
            last_rep = rep == env.cfg.publish_repeat - 1
            if docker_proxied and docker_proxied.proxy_path is not None and last_rep:
                # Once per N (the last repetition): the next sample's first launcher starts
                # the server again, so the other repetitions measure a warm server.
                extra |= dockerdproxychecks.after_server_kill(docker_proxied, ports, sample_ports)
        if count and not daemon.userland_proxy and env.cfg.connrate_duration_s:
            ip = daemon.client.inspect(container_id)["NetworkSettings"]["IPAddress"]
            results.add(_connection_rate(env, daemon, container_id, ip, ports[-1], count, rep))
        t1 = time.monotonic()
        daemon.remove(container_id)
        container_id = ""
        rm_s = time.monotonic() - t1
        if docker_proxied:
            extra["proxies_left"] = dockerdproxychecks.proxies_left(docker_proxied)
        sample.values = {
            "run_s": run_s,
            "rm_s": rm_s,
            "kernel_objects": objects,
            "helpers_pss_mib": helpers_pss,
            "listening": listening,
            "listening6": listening6,
            "answering": answering,
            "answering6": answering6,
            "http_ok": http_ok,
            **extra,
        }
    except (DaemonError, DaemonUnreachable, TimeoutError) as exc:
        sample.error = f"{daemon.program}: {exc or 'no answer'}"
    finally:
        if container_id:
            with contextlib.suppress(DaemonError, DaemonUnreachable):
                daemon.remove(container_id)
    sample.wall_s = round(time.monotonic() - t0, 3)
    return sample


def _connection_rate(
    env: Environment,
    daemon: BenchDaemon,
    container_id: str,
    container_ip: str,
    port: int,
    count: int,
    rep: int,
) -> Sample:
    """The first-packet latency, then wrk's new-connection rate, with the CPU the rest of the
    machine used meanwhile (``load``; ``disturbed`` above --disturbed-cpus)."""
    params = {"ports": count, "mode": daemon.mode, "backend": daemon.backend}
    sample = Sample("connrate", "http-close", daemon.label, rep, params=params, started=time.time())
    if not wait_for_200(container_ip, HTTP_PORT, READY_TIMEOUT_SECONDS, SMALL_PATH):
        sample.error = f"nginx at {container_ip} did not answer"
        return sample
    target = Target(env.ext.netns, env.ext.host_ip, port)
    connect = None
    roots, containers = env.our_root_pids(), env.container_ids()
    before = CpuSnapshot.take(roots, containers, [])
    target_cpu = daemon.container_cpu_seconds(container_id) or 0.0
    t0 = time.monotonic()
    try:
        if env.cfg.connect_probe_s:
            connect = measure_connect_latency(
                target.netns, target.ip, target.port, env.cfg.connect_probe_s
            )
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
    except (LoadError, ProbeError) as exc:
        sample.error = str(exc)
        return sample
    wall = time.monotonic() - t0
    usage = usage_between(before, CpuSnapshot.take(roots, containers, []))
    # The nginx answering is the run's own load too (its cgroup is not among the data path's).
    target_cpu = (daemon.container_cpu_seconds(container_id) or 0.0) - target_cpu
    foreign = max(0.0, usage.foreign - target_cpu)
    sample.load = {**usage.as_load(), "foreign_cpu_s": round(foreign, 3)}
    sample.load["ours_cpu_s"] = round(usage.ours + target_cpu, 3)
    sample.disturbed = foreign > env.cfg.disturbed_cpus * wall
    sample.values = {
        "req_s": w.requests_per_second,
        "p50_ms": w.p50_ms,
        "p99_ms": w.p99_ms,
        "errors": float(w.errors),
        "connect_p50_ms": connect.p50_ms if connect else None,
        "connect_p99_ms": connect.p99_ms if connect else None,
        "connects": float(connect.connects) if connect else None,
    }
    sample.wall_s = round(wall, 3)
    return sample


def publish_limit(env: Environment, daemon: BenchDaemon) -> tuple[int, str] | None:
    """The most ports ``daemon`` publishes in this run, and why; None: no limit."""
    return _limit(env, daemon.userland_proxy, isinstance(daemon, DockerDaemon))


def _limit(env: Environment, userland_proxy: bool, docker: bool) -> tuple[int, str] | None:
    limits = []
    if userland_proxy:
        proxy = "docker-proxy" if docker else "pyengine-proxy"
        limits.append(
            (
                env.cfg.proxy_publish_max,
                f"one {proxy} process per port; above --proxy-publish-max "
                f"{env.cfg.proxy_publish_max}",
            )
        )
    if docker:
        limits.append(
            (
                env.cfg.docker_publish_max,
                "dockerd execs iptables several times per port, and every run reads the whole "
                "ruleset, so its time per port grows with N (1,000 ports take tens of seconds "
                "to publish and to remove); above --docker-publish-max "
                f"{env.cfg.docker_publish_max}",
            )
        )
    return min(limits, default=None)


def publish_plan(env: Environment, daemons: list[BenchDaemon]) -> list[tuple[int, BenchDaemon]]:
    """(N, daemon) pairs of one repetition, in the order they alternate."""
    plan = []
    for count in env.cfg.publish_counts:
        for daemon in daemons:
            limit = publish_limit(env, daemon)
            if limit and count > limit[0]:
                continue
            plan.append((count, daemon))
    return plan


def skipped_counts(env: Environment, daemons: list[BenchDaemon]) -> list[dict[str, str]]:
    skipped = []
    for daemon in daemons:
        limit = publish_limit(env, daemon)
        for count in env.cfg.publish_counts:
            if limit and count > limit[0]:
                skipped.append(
                    {"what": f"publish {count:,} ports, {daemon.label}", "why": limit[1]}
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
            if v.get("listening") is not None:
                text += (
                    f", {v['listening']:,.0f}/{count:,} ports listening"
                    f" ({v.get('listening6') or 0:,.0f} on IPv6)"
                )
            if v.get("answering") is not None:
                text += f", {v['answering']:,.0f}/{count:,} answer on 127.0.0.1"
                if v.get("answering6") is not None:
                    text += f" ({v['answering6']:,.0f} on ::1)"
                text += f", HTTP 200 from {v['http_ok']:.0f}/{sample.params['http_sample']}"
            if v.get("proxies_pss_mib") is not None:
                text += f", proxies' Pss {v['proxies_pss_mib']:,.1f} MiB"
            if v.get("answering_after_server_kill") is not None:
                text += (
                    f"; host server killed: {v['answering_after_server_kill']:,.0f}/{count:,}"
                    f" answer ({v.get('answering6_after_server_kill') or 0:,.0f} on ::1), HTTP"
                    f" 200 from {v.get('http_ok_after_server_kill') or 0:.0f}"
                )
            if v.get("proxies_left") is not None:
                text += f"; {v['proxies_left']:.0f} proxies left after rm -f"
            last = results.samples[-2] if len(results.samples) > 1 else None
            if last and last.study == "connrate" and last.params.get("ports") == count:
                lv = last.values
                text += (
                    f"; {lv['req_s']:,.0f} conn/s, p99 {lv['p99_ms']:.2f} ms"
                    if last.ok
                    else f"; connection rate FAILED: {last.error}"
                )
                if last.ok and lv.get("connect_p99_ms") is not None:
                    text += f", connect p99 {lv['connect_p99_ms']:.3f} ms"
            progress.step(
                f"publish {count:,} · {daemon.label} · {rep + 1}/{env.cfg.publish_repeat}", text
            )


def launcher_path() -> Path:
    """pyengine's drop-in docker-proxy, installed beside this interpreter (pip install -e)."""
    return Path(sys.executable).parent / LAUNCHER


def run_docker_publishing(
    env: Environment, cleanup: Cleanup, results: Results, progress: Progress
) -> None:
    """The publishing study against dockerd: DNAT mode, proxy mode with docker-proxy, then
    proxy mode with pyengine's launcher as --userland-proxy-path, one dockerd each (dockerd's
    chains have fixed names, so only one runs at a time), each removed with everything it
    left on the host before the next starts."""
    rows: dict[str, tuple[bool, Path | None]] = {
        "dnat": (False, None),
        "docker-proxy": (True, None),
        "pyengine-proxy": (True, launcher_path()),
    }
    for userland_proxy, proxy_path in (rows[r] for r in DOCKERD_ROWS if r in env.cfg.dockerd_rows):
        mode = "proxy" if userland_proxy else "dnat"
        label = f"{mode}/dockerd" + ("+pyengine-proxy" if proxy_path else "")
        limit = _limit(env, userland_proxy, docker=True)
        if limit and not any(n <= limit[0] for n in env.cfg.publish_counts):
            for n in env.cfg.publish_counts:
                results.skipped.append({"what": f"publish {n:,} ports, {label}", "why": limit[1]})
            continue
        if proxy_path is not None and not proxy_path.is_file():
            why = f"no {proxy_path} (pip install -e . builds it)"
            progress.note(f"no publishing study on {label}: {why}")
            results.skipped.append({"what": f"publishing, {label}", "why": why})
            continue
        flags = f"--userland-proxy={str(userland_proxy).lower()}"
        if proxy_path is not None:
            flags += f" --userland-proxy-path={proxy_path}"
        progress.note(f"starting dockerd {flags}")
        try:
            daemon = start_study_dockerd(env, cleanup, userland_proxy, proxy_path)
        except (
            DockerdUnavailable,
            BenchDaemonError,
            DaemonError,
            DaemonUnreachable,
            ArchiveError,
        ) as exc:
            why = str(exc).splitlines()[0]
            progress.note(f"no publishing study on {label}: {why}")
            results.skipped.append({"what": f"publishing, {label}", "why": why})
            continue
        try:
            if userland_proxy:
                _udp_check(env, daemon, results, progress)
            run_publishing(env, [daemon], results, progress)
        finally:
            progress.note(f"stopping dockerd {daemon.name} and removing what it left")
            try:
                daemon.stop()
            except DockerdCleanupError as exc:  # the run's clean-up tries once more
                progress.note(str(exc))


def _udp_check(
    env: Environment, daemon: DockerDaemon, results: Results, progress: Progress
) -> None:
    port = env.ports.one()
    try:
        sample = dockerdproxychecks.udp_loopback(daemon, port)
    finally:
        env.ports.give_back([port])
    results.add(sample)
    v = sample.values
    text = (
        f"FAILED: {sample.error}"
        if not sample.ok
        else f"echo via 127.0.0.1 {'ok' if v['udp_echo_127'] else 'FAILED'}, via ::1 "
        f"{'ok' if v['udp_echo_v6'] else 'FAILED'}, {v['proxies_left']:.0f} proxies left"
    )
    progress.note(f"UDP published through {daemon.label}: {text}")
