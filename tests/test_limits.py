"""Resource limits, update, stats and top, driven by the real docker CLI (28.x, API 1.47) and
docker-py: the limits land in the container's cgroup files on the host (v1 or v2, whichever
this kernel has), the kernel's OOM killer shows as ``OOMKilled``, ``update`` rewrites a running
container's cgroup, ``stats`` and ``top`` answer in Docker's shapes, bad values are a 400.

One pyengined on bridge ``pyer0`` (10.192.0.0/24), its containers named ``pyer-lim-*``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.runtime.cgroups import ContainerCgroup
from tests.dockercli import DOCKER, docker_daemon
from tests.dockercli import DockerCli as Docker

NAME, BIP = "pyer0", "10.192.0.1/24"
PREFIX = "pyer-lim-"


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Docker]:
    tmp = tmp_path_factory.mktemp(NAME)
    yield from docker_daemon(tmp, NAME, BIP, [busybox_archive], Docker)


def cgroup_of(docker: Docker, name: str) -> ContainerCgroup:
    return ContainerCgroup.of(docker.inspect(name)["Id"])


def memory_limit(cg: ContainerCgroup) -> int | None:
    if cg.v2:
        return cg.read_int("memory", "memory.max")
    return cg.read_int("memory", "memory.limit_in_bytes")


def cpu_quota(cg: ContainerCgroup) -> tuple[int, int]:
    if cg.v2:
        quota, period = (cg.read("cpu", "cpu.max") or "").split()
        return int(quota), int(period)
    quota = cg.read_int("cpu", "cpu.cfs_quota_us")
    period = cg.read_int("cpu", "cpu.cfs_period_us")
    assert quota is not None and period is not None
    return quota, period


def wait_exit(docker: Docker, name: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = docker.inspect(name)["State"]
        if state["Status"] == "exited":
            return state
        time.sleep(0.2)
    raise AssertionError(f"{name} still running after {timeout} s")


def test_limits_reach_the_cgroup_and_inspect(docker: Docker) -> None:
    name = PREFIX + "limits"
    docker(
        "run", "-d", "--name", name, "--memory", "64m", "--cpus", "0.5", "--pids-limit", "50",
        "--cpu-shares", "512", "busybox", "sleep", "300", check=True,
    )  # fmt: skip
    try:
        cg = cgroup_of(docker, name)
        assert memory_limit(cg) == 64 << 20
        assert cpu_quota(cg) == (50_000, 100_000)
        assert cg.read_int("pids", "pids.max") == 50
        shares = "cpu.weight" if cg.v2 else "cpu.shares"
        assert cg.read_int("cpu", shares) == (20 if cg.v2 else 512)
        host_config = docker.inspect(name)["HostConfig"]
        assert host_config["Memory"] == 64 << 20
        assert host_config["NanoCpus"] == 500_000_000
        assert host_config["PidsLimit"] == 50
        assert host_config["CpuShares"] == 512

        # update: the running container's cgroup changes, the record keeps it.
        docker("update", "--memory", "96m", "--memory-swap", "192m", name, check=True)
        assert memory_limit(cg) == 96 << 20
        docker("update", "--cpus", "1", "--pids-limit", "80", name, check=True)
        assert cpu_quota(cg) == (100_000, 100_000)
        assert cg.read_int("pids", "pids.max") == 80
        host_config = docker.inspect(name)["HostConfig"]
        assert (host_config["Memory"], host_config["PidsLimit"]) == (96 << 20, 80)
        docker("update", "--restart", "on-failure:3", name, check=True)
        policy = docker.inspect(name)["HostConfig"]["RestartPolicy"]
        assert policy == {"Name": "on-failure", "MaximumRetryCount": 3}
        docker("update", "--cpu-shares", "512", name, check=True)  # keeps the policy
        assert docker.inspect(name)["HostConfig"]["RestartPolicy"] == policy
        # ... and a new start applies the updated limits.
        docker("restart", "-t", "0", name, check=True)
        assert memory_limit(cgroup_of(docker, name)) == 96 << 20
    finally:
        docker("rm", "-f", name)


def test_oom_killed(docker: Docker) -> None:
    name = PREFIX + "oom"
    since = time.time()
    # tail holds the whole line of zeros in memory: far more than the limit allows.
    docker(
        "run", "-d", "--name", name, "--memory", "16m", "--memory-swap", "16m", "busybox",
        "sh", "-c", "head -c 200m /dev/zero | tail", check=True,
    )  # fmt: skip
    try:
        state = wait_exit(docker, name)
        assert state["ExitCode"] == 137
        assert state["OOMKilled"] is True
        events = docker(
            "events", "--since", f"{since:.3f}", "--until", f"{time.time() + 0.5:.3f}",
            "--filter", f"container={name}",
            "--format", "{{.Action}}", check=True,
        ).stdout.split()  # fmt: skip
        assert events[-2:] == ["oom", "die"], events
    finally:
        docker("rm", "-f", name)
    name = PREFIX + "no-oom"
    docker("run", "--name", name, "--memory", "16m", "busybox", "true", check=True)
    try:
        assert docker.inspect(name)["State"]["OOMKilled"] is False
    finally:
        docker("rm", "-f", name)


def test_stats_and_top(docker: Docker) -> None:
    name = PREFIX + "stats"
    docker(
        "run", "-d", "--name", name, "--memory", "64m", "busybox",
        "sh", "-c", "while :; do :; done", check=True,
    )  # fmt: skip
    try:
        out = docker(
            "stats", "--no-stream", "--format", "{{json .}}", name, check=True, timeout=30
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        cpu = float(row["CPUPerc"].rstrip("%"))
        assert 20.0 < cpu <= 200.0, row  # one busy loop on a host of one or more CPUs
        used, limit = (part.strip() for part in row["MemUsage"].split("/"))
        assert limit == "64MiB", row
        assert row["PIDs"] in ("1", "2"), row
        assert "B" in row["NetIO"], row

        # Streaming: a row a second until the client goes.
        try:
            subprocess.run(
                [str(DOCKER), "stats", "--format", "{{.Name}} {{.CPUPerc}}", name],
                capture_output=True,
                timeout=3.5,
                env=docker.env(),
                stdin=subprocess.DEVNULL,
            )
            raise AssertionError("docker stats ended by itself")
        except subprocess.TimeoutExpired as e:
            streamed = (e.stdout or b"").decode(errors="replace")
        assert streamed.count(name) >= 2, streamed

        top = docker("top", name, check=True).stdout.splitlines()
        assert "PID" in top[0].split()
        assert any("while" in line or "sh" in line for line in top[1:])
        bad = docker("top", name, "--no-such-option")
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
        renamed = docker("top", name, "-o", "user=PID")
        assert renamed.returncode != 0 and '"user=PID" is not allowed' in renamed.stderr
    finally:
        docker("rm", "-f", name)


def test_stats_of_a_stopped_container_are_zeros(docker: Docker) -> None:
    name = PREFIX + "stopped"
    docker("create", "--name", name, "busybox", "true", check=True)
    try:
        out = docker("stats", "--no-stream", "--format", "{{json .}}", name, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        assert row["CPUPerc"] in ("0.00%", "--")
    finally:
        docker("rm", "-f", name)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "1k"], "Minimum memory limit allowed is 6MB"),
        (["--memory", "64m", "--memory-swap", "32m"], "Minimum memoryswap limit"),
        (["--cpus", "0.5", "--cpu-quota", "20000"], "Conflicting options"),
        (["--cpus", "1000"], "Range of CPUs is from 0.01"),
        (["--cpu-period", "10"], "CPU cfs period"),
        (["--cpuset-cpus", "0-999"], "Requested CPUs are not available"),
    ],
)
def test_bad_limits_are_400(docker: Docker, args: list[str], message: str) -> None:
    result = docker("create", *args, "busybox", "true")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "500" not in result.stderr


def test_bad_update_and_missing_container(docker: Docker) -> None:
    name = PREFIX + "badupdate"
    docker("run", "-d", "--name", name, "--memory", "64m", "busybox", "sleep", "300", check=True)
    try:
        result = docker("update", "--memory", "1k", name)
        assert result.returncode != 0 and "Minimum memory limit" in result.stderr
        result = docker("update", "--memory", "512m", name)  # above the swap limit (128m)
        assert result.returncode != 0 and "memoryswap" in result.stderr
        assert docker.inspect(name)["HostConfig"]["Memory"] == 64 << 20
    finally:
        docker("rm", "-f", name)
    result = docker("update", "--memory", "64m", PREFIX + "nonexistent")
    assert result.returncode != 0 and "No such container" in result.stderr


def test_docker_py_stats_and_top(docker: Docker) -> None:
    docker_py = pytest.importorskip("docker")
    client = docker_py.DockerClient(base_url=docker.daemon.host, version="1.47")
    name = PREFIX + "py"
    container = client.containers.run("busybox", ["sleep", "300"], name=name, detach=True)
    try:
        stats = container.stats(stream=False)
        assert stats["id"] == container.id
        assert stats["cpu_stats"]["cpu_usage"]["total_usage"] > 0
        assert stats["precpu_stats"]["cpu_usage"]["total_usage"] > 0
        assert stats["memory_stats"]["usage"] > 0
        assert stats["pids_stats"]["current"] == 1
        assert "eth0" in stats["networks"]
        one = container.stats(stream=False, one_shot=True)
        assert one["precpu_stats"]["cpu_usage"]["total_usage"] == 0
        stream = container.stats(decode=True)
        first, second = next(stream), next(stream)
        assert second["preread"] == first["read"]
        top = container.top()
        assert "PID" in top["Titles"]
        assert any("sleep" in " ".join(p) for p in top["Processes"])
        container.update(mem_limit="32m", memswap_limit="64m")
        assert memory_limit(ContainerCgroup.of(container.id)) == 32 << 20
    finally:
        container.remove(force=True)
        client.close()


def test_pyengine_client(docker: Docker) -> None:
    d = docker.daemon
    name = PREFIX + "client"
    d.cli(
        "run", "-d", "--name", name, "--memory", "48m", "--cpus", "0.25", "--cpu-shares", "256",
        "--pids-limit", "30", "busybox", "sleep", "300", check=True,
    )  # fmt: skip
    try:
        cg = cgroup_of(docker, name)
        assert memory_limit(cg) == 48 << 20
        assert cpu_quota(cg) == (25_000, 100_000)
        assert cg.read_int("pids", "pids.max") == 30
        assert d.cli("update", "--memory", "64m", "--memory-swap", "128m", name, check=True)
        assert memory_limit(cg) == 64 << 20
        out = d.cli("stats", "--no-stream", name, check=True).stdout.splitlines()
        assert out[0].split()[:2] == ["CONTAINER", "ID"]
        assert "64MiB" in out[1] and name in out[1]
        top = d.cli("top", name, check=True).stdout.splitlines()
        assert "PID" in top[0] and any("sleep" in line for line in top[1:])
        bad = d.cli("top", name, "-o", "user=PID")
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    finally:
        d.cli("rm", "-f", name)
    for args in (["--memory", "1k"], ["--cpus", "-1"], ["--memory", "lots"]):
        result = d.cli("create", *args, "busybox", "true")
        assert result.returncode != 0, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_junk_never_a_500(docker: Docker) -> None:
    """Update bodies, ps_args, archive paths and stats queries of every shape: a 4xx (or 501
    for a limit pyengined lacks), never a 500; the daemon logs no internal error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.api_helpers import RawApi
    from tests.test_api_properties import JUNK, TEXT

    api = RawApi(docker.daemon.host)
    name = PREFIX + "junk"
    docker("run", "-d", "--name", name, "--memory", "64m", "busybox", "sleep", "300", check=True)
    fields = st.sampled_from(
        ["Memory", "MemorySwap", "NanoCpus", "CpuShares", "CpuQuota", "CpuPeriod",
         "CpusetCpus", "PidsLimit", "RestartPolicy", "MemoryReservation", "BlkioWeight"]
    )  # fmt: skip
    values = st.one_of(
        JUNK, st.integers(-(1 << 64), 1 << 64), st.sampled_from([-1, 0, 1, 1 << 62, 6 << 20])
    )
    request = st.one_of(
        st.tuples(st.just("POST"), st.just("update"), st.just({}), st.dictionaries(fields, values)),
        st.tuples(st.just("POST"), st.just("update"), st.just({}), JUNK),
        st.tuples(
            st.just("GET"), st.just("top"), st.fixed_dictionaries({"ps_args": TEXT}), st.none()
        ),
        st.tuples(
            st.sampled_from(["GET", "HEAD"]),
            st.just("archive"),
            st.fixed_dictionaries({"path": TEXT}),
            st.none(),
        ),
        st.tuples(
            st.just("PUT"),
            st.just("archive"),
            st.fixed_dictionaries({"path": TEXT}),
            st.binary(max_size=600),
        ),
        st.tuples(
            st.just("GET"),
            st.just("stats"),
            st.fixed_dictionaries({"stream": st.just("0")}, optional={"one-shot": TEXT}),
            st.none(),
        ),
    )

    @settings(
        max_examples=150 * int(os.environ.get("PYENGINE_PROPERTY_SCALE", "1")),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(req=request)
    def check(req: tuple[str, str, dict[str, str], Any]) -> None:
        method, what, query, body = req
        if what == "stats":
            query = {**query, "one-shot": "1"}  # an answer at once
        answer = api.request(method, f"/containers/{name}/{what}", query, body)
        assert answer.status < 500 or answer.status == 501, (answer.status, answer.body, req)

    start = len(docker.daemon.log())
    try:
        check()
        log = docker.daemon.log()[start:]  # what the requests above logged
        assert "internal error" not in log, log[log.find("internal error") - 2000 :][:6000]
        # Whatever the updates did, the container still has a memory limit and runs.
        assert docker.inspect(name)["State"]["Running"]
    finally:
        docker("rm", "-f", name)
