"""A quick side-by-side of the proxies on loopback, for profiling and before/after comparisons.

    python -m bench.loopbench [--rounds 3] [--duration 10] [--only http|iperf3|udp]
                              [--profile DIR]

Everything runs in a network namespace of its own (``pyeperf-<pid>``, loopback only), so the
host's conntrack and TIME_WAIT tables never see the load: nginx from the offline image
(chrooted, one worker, a 100-byte body), an iperf3 server, and in front of each one
pyengine-proxy and Debian's docker-proxy (TCP, and UDP for iperf3). wrk (keep-alive, and a new
connection per request) and iperf3 (TCP with 1 and 4 streams, UDP at 500 Mbit/s) hit the three
targets in turn, alternating, ``--rounds`` times; medians and ratios are printed. ``direct`` is
the server itself, no proxy in between. With ``--profile DIR``, py-spy records pyengine-proxy
during one extra run of each HTTP load and writes flame graphs (SVG) and raw stacks there.

A measurement tool, not a test: figures depend on the machine and on what else runs on it;
the side-by-side harness with DNAT and containers is the rest of ``bench/`` (``pyengine-bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.handshake import read_status_blocking

DEFAULT_ARCHIVE = Path("/var/cache/pyengine/images/nginx-oci.tar")
NGINX_PORT, IPERF_PORT = 18080, 15201
PORTS = {"pyengine-proxy": 1, "docker-proxy": 2}  # offset added to the server's port
BODY = b"x" * 99 + b"\n"  # the 100-byte body
TARGETS = ("direct", "pyengine-proxy", "docker-proxy")
START_TIMEOUT_SECONDS = 30.0  # for a proxy's 0\n on its status pipe


@dataclass
class Sample:
    target: str
    load: str
    value: float  # req/s or Gbit/s
    p99_ms: float | None = None
    proxy_cpu_seconds: float | None = None
    cpu_per_gb: float | None = None


@dataclass
class Lab:
    netns: str
    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxy_pids: dict[tuple[str, int, str], int] = field(default_factory=dict)

    def run(self, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True,
            text=True,
            check=True,
            **kwargs,
        )

    def start(self, *argv: str, status_pipe: bool = False) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the namespace; with ``status_pipe``, as a proxy's parent does: a
        pipe as fd 3, and wait for its ``0\\n`` (docker-proxy even needs fd 3 to be open)."""
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # dup2 leaves fd 3 inheritable; every fd Python opened itself is not (PEP 446).
                preexec_fn=(lambda: os.dup2(write_fd, 3)) if status_pipe else None,
                close_fds=False,
            )
            self.processes.append(process)
            os.close(write_fd)
            write_fd = -1
            if status_pipe:
                answer = read_status_blocking(read_fd, START_TIMEOUT_SECONDS)
                if answer != b"0\n":
                    raise RuntimeError(f"{argv[0]} did not start: {answer!r}")
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        return process


def extract_rootfs(archive: Path, destination: Path) -> None:
    """Unpack the layers of a single-image OCI archive, in order."""
    with tempfile.TemporaryDirectory(prefix="pyeperf-oci-") as layout:
        subprocess.run(["tar", "-xf", str(archive), "-C", layout], check=True)
        index = json.loads(Path(layout, "index.json").read_text())
        digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads(Path(layout, "blobs", "sha256", digest).read_text())
        destination.mkdir(parents=True, exist_ok=True)
        for layer in manifest["layers"]:
            blob = Path(layout, "blobs", "sha256", layer["digest"].split(":", 1)[1])
            subprocess.run(["tar", "-xzf", str(blob), "-C", str(destination)], check=True)


def nginx_config(port: int) -> str:
    body = BODY.decode().rstrip("\n")
    return f"""worker_processes 1;
daemon off;
pid /run/pyeperf-nginx.pid;
error_log stderr error;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        location / {{ default_type text/plain; return 200 "{body}\\n"; }}
    }}
}}
"""


@contextmanager
def lab(archive: Path, docker_proxy: str) -> Iterator[Lab]:
    netns = f"pyeperf-{os.getpid()}"
    root = Path(tempfile.mkdtemp(prefix="pyeperf-root-"))
    subprocess.run(["ip", "netns", "add", netns], check=True)
    the_lab = Lab(netns=netns, root=root)
    try:
        the_lab.run("ip", "link", "set", "lo", "up")
        extract_rootfs(archive, root)
        (root / "pyeperf-nginx.conf").write_text(nginx_config(NGINX_PORT))
        the_lab.start("chroot", str(root), "/usr/sbin/nginx", "-c", "/pyeperf-nginx.conf")
        the_lab.start("iperf3", "-s", "-p", str(IPERF_PORT))
        proxies = {
            "pyengine-proxy": [sys.executable, "-m", "proxy.main"],
            "docker-proxy": [docker_proxy],
        }
        for name, argv in proxies.items():
            for server_port, proto in (
                (NGINX_PORT, "tcp"),
                (IPERF_PORT, "tcp"),
                (IPERF_PORT, "udp"),
            ):
                port = server_port + PORTS[name]
                process = the_lab.start(
                    *argv, "-proto", proto, "-host-ip", "127.0.0.1", "-host-port", str(port),
                    "-container-ip", "127.0.0.1", "-container-port", str(server_port),
                    status_pipe=True,
                )  # fmt: skip
                the_lab.proxy_pids[(name, server_port, proto)] = _exec_pid(process)
        for port in (NGINX_PORT, IPERF_PORT):
            for offset in (0, *PORTS.values()):
                _wait_listening(the_lab, port + offset)
        yield the_lab
    finally:
        for process in the_lab.processes:
            _stop(process)
        subprocess.run(["ip", "netns", "pids", netns], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _exec_pid(process: subprocess.Popen[bytes]) -> int:
    # ``ip netns exec`` execs the command in its own process: same pid.
    return process.pid


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_listening(the_lab: Lab, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listening = the_lab.run("ss", "-Htln", f"sport = :{port}").stdout
        if listening.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} in {the_lab.netns}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _port(target: str, server_port: int) -> int:
    return server_port + PORTS.get(target, 0)


_WRK_REQUESTS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_P99 = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(the_lab: Lab, target: str, load: str, duration: int) -> Sample:
    port = _port(target, NGINX_PORT)
    argv = ["wrk", "-t2", "-c50", f"-d{duration}s", "--latency"]
    if load == "new-connection":
        argv += ["-H", "Connection: close"]
    pid = the_lab.proxy_pids.get((target, NGINX_PORT, "tcp"))
    cpu_before = _cpu_seconds(pid) if pid else None
    output = the_lab.run(*argv, f"http://127.0.0.1:{port}/", timeout=duration + 60).stdout
    cpu = _cpu_seconds(pid) - cpu_before if pid and cpu_before is not None else None
    requests = _WRK_REQUESTS.search(output)
    p99 = _WRK_P99.search(output)
    if requests is None:
        raise RuntimeError(f"wrk printed no rate:\n{output}")
    p99_ms = float(p99.group(1)) * _UNIT_MS[p99.group(2)] if p99 else None
    return Sample(target, load, float(requests.group(1)), p99_ms, cpu)


def run_iperf3(the_lab: Lab, target: str, streams: int, duration: int) -> Sample:
    port = _port(target, IPERF_PORT)
    pid = the_lab.proxy_pids.get((target, IPERF_PORT, "tcp"))
    cpu_before = _cpu_seconds(pid) if pid else None
    output = the_lab.run(
        "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-P", str(streams),
        "--json", timeout=duration + 60,
    ).stdout  # fmt: skip
    cpu = _cpu_seconds(pid) - cpu_before if pid and cpu_before is not None else None
    received = json.loads(output)["end"]["sum_received"]
    gigabytes = received["bytes"] / 1e9
    per_gb = cpu / gigabytes if cpu is not None and gigabytes else None
    return Sample(
        target, f"iperf3 -P{streams}", received["bits_per_second"] / 1e9, None, cpu, per_gb
    )


def run_iperf3_udp(the_lab: Lab, target: str, duration: int) -> Sample:
    """iperf3 UDP at 500 Mbit/s (1400-byte datagrams): the value is the loss in percent."""
    port = _port(target, IPERF_PORT)
    pid = the_lab.proxy_pids.get((target, IPERF_PORT, "udp"))
    cpu_before = _cpu_seconds(pid) if pid else None
    output = the_lab.run(
        "iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", "500M", "-l", "1400",
        "-t", str(duration), "--json", timeout=duration + 60,
    ).stdout  # fmt: skip
    cpu = _cpu_seconds(pid) - cpu_before if pid and cpu_before is not None else None
    summary = json.loads(output)["end"]["sum"]
    return Sample(target, "udp 500M loss %", float(summary["lost_percent"]), None, cpu)


def profile(the_lab: Lab, load: str, duration: int, out: Path) -> None:
    """Record pyengine-proxy with py-spy while wrk runs ``load`` against it."""
    pid = the_lab.proxy_pids[("pyengine-proxy", NGINX_PORT, "tcp")]
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
        recorder = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", "250", "--duration", str(duration),
             "--nonblocking", "--format", fmt, "--output", str(out / f"{load}.{suffix}")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        run_wrk(the_lab, "pyengine-proxy", load, duration)
        recorder.wait(timeout=duration + 30)


def summarise(samples: list[Sample]) -> str:
    lines = []
    loads = list(dict.fromkeys(s.load for s in samples))
    for load in loads:
        medians: dict[str, float] = {}
        for target in TARGETS:
            values = [s.value for s in samples if s.load == load and s.target == target]
            if not values:
                continue
            medians[target] = statistics.median(values)
            p99s = [s.p99_ms for s in samples if s.load == load and s.target == target]
            cpus = [
                s.proxy_cpu_seconds
                for s in samples
                if s.load == load and s.target == target and s.proxy_cpu_seconds is not None
            ]
            extra = ""
            if all(p is not None for p in p99s) and p99s:
                extra += f"  p99 {statistics.median(p for p in p99s if p is not None):.2f} ms"
            if cpus:
                extra += f"  proxy CPU {statistics.median(cpus):.2f} s"
            per_gb = [
                s.cpu_per_gb
                for s in samples
                if s.load == load and s.target == target and s.cpu_per_gb is not None
            ]
            if per_gb:
                extra += f"  ({statistics.median(per_gb):.3f} CPU-s/GB)"
            runs = ", ".join(f"{v:,.1f}" for v in values)
            lines.append(f"{load:16} {target:15} median {medians[target]:>12,.2f}  [{runs}]{extra}")
        if "pyengine-proxy" in medians and "docker-proxy" in medians:
            ratio = medians["pyengine-proxy"] / medians["docker-proxy"]
            direct = medians.get("direct")
            line = f"{load:16} ratio pyengine-proxy / docker-proxy = {ratio:.2f}"
            if direct:
                line += f"; pyengine-proxy / direct = {medians['pyengine-proxy'] / direct:.2f}"
                line += f"; docker-proxy / direct = {medians['docker-proxy'] / direct:.2f}"
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--only", choices=("http", "iperf3", "udp"))
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--docker-proxy", default=shutil.which("docker-proxy") or "docker-proxy")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles to this directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("loopbench needs root (it creates a network namespace)")
    samples: list[Sample] = []
    with lab(args.archive, args.docker_proxy) as the_lab:
        if args.profile:
            for load in ("keep-alive", "new-connection"):
                profile(the_lab, load, args.duration, args.profile)
        for round_number in range(args.rounds):
            # Alternate the order each round, so no target always runs first or last.
            order = TARGETS if round_number % 2 == 0 else tuple(reversed(TARGETS))
            if args.only in (None, "http"):
                for load in ("keep-alive", "new-connection"):
                    for target in order:
                        samples.append(run_wrk(the_lab, target, load, args.duration))
            if args.only in (None, "iperf3"):
                for streams in (1, 4):
                    for target in order:
                        samples.append(run_iperf3(the_lab, target, streams, args.duration))
            if args.only in (None, "iperf3", "udp"):
                for target in order:
                    samples.append(run_iperf3_udp(the_lab, target, args.duration))
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(summarise(samples))


if __name__ == "__main__":
    main()
