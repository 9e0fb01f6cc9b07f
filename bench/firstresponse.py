"""`pyengine run -d -p 127.0.0.1:P:80 nginx` to the first HTTP 200 on 127.0.0.1:P.

A probe thread starts just before the command and opens a new TCP connection every 5 ms (each
given up after 0.1 s) until one answers 200, so the figure includes everything a user waits
for: the CLI, the API, netd, the proxy (in proxy mode), runc, and nginx starting.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.daemons import BIN, BenchDaemon
from bench.environment import Environment
from bench.httpprobe import probe
from bench.progress import Progress
from bench.results import Results, Sample

PROBE_INTERVAL_SECONDS = 0.005
PROBE_TIMEOUT_SECONDS = 0.1
GIVE_UP_SECONDS = 30.0


@dataclass
class _Prober:
    port: int
    started: float
    first_ok: float | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = self.started + GIVE_UP_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            outcome = probe("127.0.0.1", self.port, PROBE_TIMEOUT_SECONDS)
            self.outcomes[outcome] += 1
            if outcome == "ok":
                self.first_ok = time.monotonic() - self.started
                return
            time.sleep(PROBE_INTERVAL_SECONDS)


def measure_first_response(env: Environment, daemon: BenchDaemon, rep: int) -> Sample:
    port = env.ports.one()
    sample = Sample("first-response", "run-to-200", daemon.label, rep, params={"mode": daemon.mode})
    sample.started = time.time()
    prober = _Prober(port, time.monotonic())
    thread = threading.Thread(target=prober.run, daemon=True)
    command = [str(BIN / "pyengine"), "-H", daemon.host, "run", "-d", "-p", f"127.0.0.1:{port}:80"]
    container_id = ""
    try:
        thread.start()
        returned = 0.0
        try:
            result = subprocess.run(
                [*command, "nginx"],
                capture_output=True,
                text=True,
                timeout=GIVE_UP_SECONDS,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            sample.error = f"pyengine run did not return within {GIVE_UP_SECONDS:g} s"
        else:
            returned = time.monotonic() - prober.started
            container_id = result.stdout.strip()
            if result.returncode != 0:
                sample.error = f"pyengine run exited {result.returncode}: {result.stderr.strip()}"
        thread.join(GIVE_UP_SECONDS)
        if sample.error is None and prober.first_ok is None:
            sample.error = f"no HTTP 200 within {GIVE_UP_SECONDS:g} s ({dict(prober.outcomes)})"
        if sample.error is None:
            sample.values = {"first_200_s": prober.first_ok, "run_returned_s": returned}
        sample.params["probe_outcomes"] = dict(prober.outcomes)
    finally:
        prober.stop.set()
        thread.join(GIVE_UP_SECONDS)
        if container_id:
            daemon.remove(container_id)
        elif sample.error is not None:
            # The command failed or hung after creating something: remove what is not a server.
            for c in daemon.client.containers(all=True):
                if c["Id"] not in env.container_ids():
                    daemon.remove(c["Id"])
        env.ports.give_back([port])
    sample.wall_s = round(time.monotonic() - prober.started, 3)
    return sample


def first_response_daemons(env: Environment) -> list[BenchDaemon]:
    return [env.daemons["proxy"], env.daemons["dnat"]]


def run_first_response(env: Environment, results: Results, progress: Progress) -> None:
    for rep in range(env.cfg.first_response_repeat):
        for daemon in first_response_daemons(env):
            sample = measure_first_response(env, daemon, rep)
            results.add(sample)
            if sample.ok:
                text = (
                    f"first 200 after {sample.values['first_200_s']:.3f} s "
                    f"(run returned after {sample.values['run_returned_s']:.3f} s)"
                )
            else:
                text = f"FAILED: {sample.error}"
            progress.step(
                f"run -d -p to 200 · {daemon.label} · {rep + 1}/{env.cfg.first_response_repeat}",
                text,
            )
