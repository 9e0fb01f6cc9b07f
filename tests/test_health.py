"""Healthchecks: a probe run inside the container every interval takes it from starting to
unhealthy and then healthy as its condition changes, with ``health_status`` events; an image's
HEALTHCHECK applies unless ``--no-healthcheck``; a hostile probe (endless output, never ends)
is cut at 4096 bytes and killed at its timeout while the daemon answers as before."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.http import Client, DaemonError
from tests.policy_helpers import Docker, docker_daemon, wait_for

NAME, BIP = "pyek4", "10.191.4.1/24"
HEALTHY_IMAGE = "pyek-health:latest"
IMAGE_CHECK = {
    "Test": ["CMD-SHELL", "test -f /tmp/ready"],
    "Interval": 1_000_000_000,
    "Retries": 1,
}


def healthcheck_archive(busybox: Path, out: Path, ref: str, check: dict[str, Any]) -> Path:
    """busybox's OCI archive as image ``ref`` whose config has ``check`` as its HEALTHCHECK
    (what a Dockerfile's HEALTHCHECK leaves in the config)."""
    blobs: dict[str, bytes] = {}
    with tarfile.open(busybox) as tar:
        for member in tar.getmembers():
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                blobs[member.name] = f.read()
    index = json.loads(blobs["index.json"])
    manifest_name = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(blobs[manifest_name])
    config_name = "blobs/sha256/" + manifest["config"]["digest"].split(":")[1]
    config = json.loads(blobs[config_name])
    config.setdefault("config", {})["Healthcheck"] = check

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[f"blobs/sha256/{digest}"] = data
        return f"sha256:{digest}", len(data)

    manifest["config"]["digest"], manifest["config"]["size"] = put(json.dumps(config).encode())
    digest, size = put(json.dumps(manifest).encode())
    full = f"docker.io/library/{ref}"
    index["manifests"] = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {
                "io.containerd.image.name": full,
                "org.opencontainers.image.ref.name": full,
            },
        }
    ]
    blobs["index.json"] = json.dumps(index).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Docker]:
    tmp = tmp_path_factory.mktemp(NAME)
    archive = healthcheck_archive(busybox_archive, tmp / "health.tar", HEALTHY_IMAGE, IMAGE_CHECK)
    yield from docker_daemon(tmp, NAME, BIP, [busybox_archive, archive])


def _health(docker: Docker, ref: str) -> dict[str, Any]:
    return docker.inspect(ref)["State"].get("Health") or {}


def _status(docker: Docker, ref: str) -> str:
    return _health(docker, ref).get("Status", "")


def test_starting_unhealthy_healthy(docker: Docker) -> None:
    since = time.time()
    docker(
        "run", "-d", "--name", "pyek-hc-cycle",
        "--health-cmd", "test -f /tmp/ok", "--health-interval", "1s", "--health-retries", "1",
        "busybox", "sh", "-c", "sleep 4; touch /tmp/ok; sleep 600",
        check=True,
    )  # fmt: skip
    assert _status(docker, "pyek-hc-cycle") == "starting"
    assert "(health: starting)" in docker("ps", "-f", "name=pyek-hc-cycle").stdout
    wait_for("unhealthy", lambda: _status(docker, "pyek-hc-cycle") == "unhealthy", timeout=10)
    assert "(unhealthy)" in docker("ps", "-f", "name=pyek-hc-cycle").stdout
    wait_for("healthy", lambda: _status(docker, "pyek-hc-cycle") == "healthy", timeout=15)
    assert "(healthy)" in docker("ps", "-f", "name=pyek-hc-cycle").stdout
    health = _health(docker, "pyek-hc-cycle")
    assert health["FailingStreak"] == 0
    assert 1 <= len(health["Log"]) <= 5
    assert health["Log"][-1]["ExitCode"] == 0
    assert set(health["Log"][-1]) == {"Start", "End", "ExitCode", "Output"}
    info = docker.inspect("pyek-hc-cycle")
    assert info["Config"]["Healthcheck"]["Test"] == ["CMD-SHELL", "test -f /tmp/ok"]
    assert info["Config"]["Healthcheck"]["Interval"] == 1_000_000_000
    events = docker.events(
        since, time.time(), "--filter", "event=health_status", "--filter", "container=pyek-hc-cycle"
    )
    assert [e["Action"] for e in events] == [
        "health_status: unhealthy",
        "health_status: healthy",
    ]
    # Stopped, it is probed no more.
    docker("stop", "-t", "0", "pyek-hc-cycle", check=True)
    log_after_stop = _health(docker, "pyek-hc-cycle")["Log"]
    time.sleep(2)
    assert _health(docker, "pyek-hc-cycle")["Log"] == log_after_stop


def test_image_healthcheck_and_no_healthcheck(docker: Docker) -> None:
    docker(
        "run", "-d", "--name", "pyek-hc-image", HEALTHY_IMAGE,
        "sh", "-c", "touch /tmp/ready; sleep 600",
        check=True,
    )  # fmt: skip
    assert docker.inspect("pyek-hc-image")["Config"]["Healthcheck"]["Test"] == IMAGE_CHECK["Test"]
    wait_for("the image's check", lambda: _status(docker, "pyek-hc-image") == "healthy")
    docker(
        "run", "-d", "--name", "pyek-hc-none", "--no-healthcheck", HEALTHY_IMAGE, "sleep", "600",
        check=True,
    )  # fmt: skip
    info = docker.inspect("pyek-hc-none")
    assert info["Config"]["Healthcheck"]["Test"] == ["NONE"]
    assert "Health" not in info["State"]
    # The container's fields override the image's; the rest come from the image.
    docker(
        "run", "-d", "--name", "pyek-hc-merged", "--health-retries", "7", HEALTHY_IMAGE,
        "sleep", "600",
        check=True,
    )  # fmt: skip
    merged = docker.inspect("pyek-hc-merged")["Config"]["Healthcheck"]
    assert merged["Test"] == IMAGE_CHECK["Test"] and merged["Retries"] == 7
    result = docker.daemon.cli(
        "run", "-d", "--name", "pyek-hc-cli", "--health-cmd", "true", "--health-interval",
        "500ms", "busybox", "sleep", "600",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    wait_for("pyengine's healthcheck", lambda: _status(docker, "pyek-hc-cli") == "healthy")
    assert "(healthy)" in docker.daemon.cli("ps").stdout
    healthy = docker("ps", "--filter", "health=healthy", "--format", "{{.Names}}", check=True)
    assert {"pyek-hc-image", "pyek-hc-cli"} <= set(healthy.stdout.split())
    assert "pyek-hc-image" not in healthy.stdout.replace("pyek-hc-image", "", 1)
    none = docker("ps", "--filter", "health=none", "--format", "{{.Names}}", check=True)
    assert "pyek-hc-none" in none.stdout.split() and "pyek-hc-cli" not in none.stdout
    bad = docker("ps", "--filter", "health=fine")
    assert bad.returncode != 0 and "Unrecognised filter value for health: fine" in bad.stderr


def test_bad_healthchecks_are_refused(docker: Docker) -> None:
    cases = {
        ("--health-interval", "500us"): "Interval in Healthcheck cannot be less than 1ms",
        ("--health-timeout", "10us"): "Timeout in Healthcheck cannot be less than 1ms",
        ("--health-start-period", "1us"): "StartPeriod in Healthcheck cannot be less than 1ms",
    }
    for args, message in cases.items():
        result = docker("create", "--health-cmd", "true", *args, "busybox", "true")
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
    # The docker CLI refuses negative retries itself; the daemon does too.
    client = Client(docker.daemon.host)
    for check, message in (
        ({"Test": ["CMD", "true"], "Retries": -1}, "Retries in Healthcheck cannot be negative"),
        ({"Test": ["SOMETIMES", "true"]}, "unknown healthcheck type"),
        ({"Test": ["CMD"]}, "healthcheck CMD needs a command"),
    ):
        with pytest.raises(DaemonError) as refused:
            client.create(None, {"Image": "busybox", "Healthcheck": check})
        assert refused.value.status == 400 and message in str(refused.value)


def test_hostile_probes_are_bounded(docker: Docker) -> None:
    docker(
        "run", "-d", "--name", "pyek-hc-chatty",
        "--health-cmd", "yes 0123456789abcdef", "--health-interval", "1s",
        "--health-timeout", "1s", "--health-retries", "1",
        "busybox", "sleep", "600",
        check=True,
    )  # fmt: skip
    docker(
        "run", "-d", "--name", "pyek-hc-loud",
        "--health-cmd", "head -c 100000 /dev/zero | tr '\\0' A", "--health-interval", "1s",
        "busybox", "sleep", "600",
        check=True,
    )  # fmt: skip
    docker(
        "run", "-d", "--name", "pyek-hc-stuck",
        "--health-cmd", "sleep 1000", "--health-interval", "1s", "--health-timeout", "500ms",
        "--health-retries", "1",
        "busybox", "sleep", "600",
        check=True,
    )  # fmt: skip
    wait_for("the endless probe to fail", lambda: _status(docker, "pyek-hc-chatty") == "unhealthy")
    wait_for("the stuck probe to fail", lambda: _status(docker, "pyek-hc-stuck") == "unhealthy")
    wait_for("the loud probe to pass", lambda: _status(docker, "pyek-hc-loud") == "healthy")
    stuck = _health(docker, "pyek-hc-stuck")["Log"][-1]
    assert stuck["ExitCode"] == -1
    assert stuck["Output"] == "Health check exceeded timeout (500ms)"
    loud = _health(docker, "pyek-hc-loud")["Log"][-1]
    assert loud["ExitCode"] == 0 and loud["Output"] == "A" * 4096
    # The daemon answers at once meanwhile, and killed probes leave nothing running.
    started = time.monotonic()
    docker("ps", check=True)
    assert time.monotonic() - started < 2
    for name in ("pyek-hc-chatty", "pyek-hc-stuck"):
        top = docker.inspect(name)["State"]["Pid"]
        children = Path(f"/proc/{top}/task/{top}/children").read_text().split()
        assert len(children) <= 1, (name, children)  # at most the probe of this moment
