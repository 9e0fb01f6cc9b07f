"""Restart policies: ``on-failure:N`` stops after N restarts, ``always`` restarts a container
whose process was killed from the host but not one a client stopped, a daemon restart starts
``always`` and ``unless-stopped`` containers again (without live restore) or leaves them
running (with it); bad policies are Docker's 400s."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.timefmt import unix_time
from tests.conftest import start_daemon, stop_daemon
from tests.policy_helpers import Docker, docker_daemon, wait_for

NAME, BIP = "pyek2", "10.191.2.1/24"
RESTART_NAME, RESTART_BIP = "pyek3", "10.191.3.1/24"


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Docker]:
    yield from docker_daemon(tmp_path_factory.mktemp(NAME), NAME, BIP, [busybox_archive])


def _state(docker: Docker, ref: str) -> tuple[str, int]:
    info = docker.inspect(ref)
    return info["State"]["Status"], info["RestartCount"]


def test_on_failure_gives_up_after_its_count(docker: Docker) -> None:
    since = time.time()
    docker(
        "run", "-d", "--name", "pyek-rs-fail", "--restart", "on-failure:2", "busybox",
        "sh", "-c", "exit 1",
        check=True,
    )  # fmt: skip
    # 100 ms, then 200 ms of back-off: three runs well within the wait.
    wait_for(
        "two restarts, then exited",
        lambda: _state(docker, "pyek-rs-fail") == ("exited", 2),
        timeout=15,
    )
    time.sleep(1.0)  # no third restart follows
    info = docker.inspect("pyek-rs-fail")
    assert (info["State"]["Status"], info["RestartCount"], info["State"]["ExitCode"]) == (
        "exited",
        2,
        1,
    )
    assert info["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    actions = [
        e["Action"] for e in docker.events(since, time.time(), "--filter", "container=pyek-rs-fail")
    ]
    assert actions == ["create", "start", "die", "start", "die", "start", "die"], actions


def test_always_restarts_after_a_kill_from_the_host_not_after_stop(docker: Docker) -> None:
    docker(
        "run", "-d", "--name", "pyek-rs-always", "--restart", "always", "busybox",
        "sleep", "600",
        check=True,
    )  # fmt: skip
    pid = docker.inspect("pyek-rs-always")["State"]["Pid"]
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        info = docker.inspect("pyek-rs-always")
        return info["State"]["Running"] and info["State"]["Pid"] not in (0, pid)

    wait_for("the restart after the kill", restarted, timeout=15)
    assert docker.inspect("pyek-rs-always")["RestartCount"] == 1
    docker("stop", "-t", "1", "pyek-rs-always", check=True)
    time.sleep(1.0)
    info = docker.inspect("pyek-rs-always")
    assert (info["State"]["Status"], info["RestartCount"]) == ("exited", 1)
    # A kill through the API is a stop by the user too (moby daemon/kill.go).
    docker("start", "pyek-rs-always", check=True)
    docker("kill", "pyek-rs-always", check=True)
    time.sleep(1.0)
    assert docker.inspect("pyek-rs-always")["State"]["Status"] == "exited"


def test_bad_policies_are_refused(docker: Docker) -> None:
    cases = {
        ("--restart", "sometimes"): "invalid restart policy: unknown policy 'sometimes'",
        ("--restart", "always:3"): "maximum retry count can only be used with 'on-failure'",
        ("--restart", "on-failure:-1"): "maximum retry count cannot be negative",
    }
    for args, message in cases.items():
        result = docker("create", *args, "busybox", "true")
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
    assert "pyek" not in docker("ps", "-a", "--format", "{{.Names}}").stdout.replace("pyek-rs-", "")
    result = docker.daemon.cli("run", "--rm", "--restart", "always", "busybox", "true")
    assert result.returncode == 125 and "conflicting options" in result.stderr
    pyengine = docker.daemon.cli(
        "run", "-d", "--name", "pyek-rs-cli", "--restart", "on-failure:1", "busybox",
        "sh", "-c", "exit 4",
    )  # fmt: skip
    assert pyengine.returncode == 0, pyengine.stderr
    wait_for(
        "pyengine's on-failure:1 to give up",
        lambda: _state(docker, "pyek-rs-cli") == ("exited", 1),
    )


def test_daemon_restart(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> None:
    """Without live restore, the daemon stops every container; the next one starts
    ``always`` (even one a client had stopped, as Docker) and ``unless-stopped`` ones that
    no client stopped. With live restore they keep running under the next daemon."""
    tmp = tmp_path_factory.mktemp(RESTART_NAME)
    gen = docker_daemon(tmp, RESTART_NAME, RESTART_BIP, [busybox_archive], "--live-restore=false")
    docker = next(gen)
    try:
        for name, policy in (
            ("pyek-dr-always", "always"),
            ("pyek-dr-always-stopped", "always"),
            ("pyek-dr-unless", "unless-stopped"),
            ("pyek-dr-unless-stopped", "unless-stopped"),
            ("pyek-dr-no", "no"),
        ):
            docker(
                "run", "-d", "--name", name, "--restart", policy, "--stop-signal", "KILL",
                "--health-cmd", "true", "--health-interval", "500ms",
                "busybox", "sleep", "600",
                check=True,
            )  # fmt: skip
        docker("stop", "pyek-dr-always-stopped", "pyek-dr-unless-stopped", check=True)
        stop_daemon(docker.daemon)
        # The next daemon keeps its containers running when it stops (live restore).
        docker.daemon = start_daemon(tmp, RESTART_NAME, RESTART_BIP, True)
        running = {
            n: docker.inspect(n)["State"]["Status"]
            for n in (
                "pyek-dr-always",
                "pyek-dr-always-stopped",
                "pyek-dr-unless",
                "pyek-dr-unless-stopped",
                "pyek-dr-no",
            )
        }
        assert running == {
            "pyek-dr-always": "running",
            "pyek-dr-always-stopped": "running",
            "pyek-dr-unless": "running",
            "pyek-dr-unless-stopped": "exited",
            "pyek-dr-no": "exited",
        }
        # With live restore the container is not stopped at all: the same process goes on.
        pid = docker.inspect("pyek-dr-always")["State"]["Pid"]
        stop_daemon(docker.daemon)
        docker.daemon = start_daemon(tmp, RESTART_NAME, RESTART_BIP, True)
        adopted_at = time.time()
        info = docker.inspect("pyek-dr-always")
        assert info["State"]["Running"] and info["State"]["Pid"] == pid
        # Its healthcheck goes on under the new daemon.
        assert info["State"]["Health"]["Status"] in ("starting", "healthy")

        def probed_again() -> bool:
            health = docker.inspect("pyek-dr-always")["State"]["Health"]
            log = health["Log"]
            return bool(log) and unix_time(log[-1]["Start"]) > adopted_at

        wait_for("a probe by the new daemon", probed_again, timeout=10)
    finally:
        docker.cleanup()
        # The generator stops (and checks) the daemon it holds: the latest one.
        gen_daemon = docker.daemon
        with pytest.raises(StopIteration):
            next(gen)
        assert gen_daemon.process.poll() is not None


def test_restarting_between_runs(docker: Docker) -> None:
    """A container that keeps failing waits longer each time (100 ms doubling): while it
    waits it is ``restarting``; a stop ends the policy, a removal needs force meanwhile."""
    docker(
        "run", "-d", "--name", "pyek-rs-loop", "--restart", "always", "busybox",
        "sh", "-c", "exit 5",
        check=True,
    )  # fmt: skip

    def restarting() -> bool:
        state = docker.inspect("pyek-rs-loop")["State"]
        return state["Restarting"] and state["Status"] == "restarting" and state["Running"]

    wait_for("the restarting state", restarting, timeout=20, interval=0.05)
    listed = docker("ps", "--filter", "name=pyek-rs-loop", "--format", "{{.Status}}", check=True)
    assert listed.stdout.startswith("Restarting (5)"), listed.stdout
    refused = docker("rm", "pyek-rs-loop")
    assert refused.returncode != 0 and "cannot remove a restarting container" in refused.stderr
    docker("stop", "pyek-rs-loop", check=True)
    count = docker.inspect("pyek-rs-loop")["RestartCount"]
    time.sleep(2.0)
    info = docker.inspect("pyek-rs-loop")
    assert (info["State"]["Status"], info["RestartCount"]) == ("exited", count)
