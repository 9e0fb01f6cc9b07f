"""``GET /events``: the docker CLI 28, docker-py and pyengine read a run's container events,
network events and image events, replayed between ``--since`` and ``--until`` or live, and
filtered as Docker filters them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.http import Client, DaemonError
from tests.conftest import BIN
from tests.policy_helpers import Docker, docker_daemon, wait_for

try:
    import docker as docker_py
except ImportError:  # a failure under CI, reported by the test
    docker_py = None  # type: ignore[assignment]

NAME, BIP = "pyek1", "10.191.1.1/24"
SUBNET = "10.191.101.0/24"


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Docker]:
    yield from docker_daemon(tmp_path_factory.mktemp(NAME), NAME, BIP, [busybox_archive])


def test_a_run_replayed_between_since_and_until(docker: Docker) -> None:
    since = time.time()
    run = docker("run", "--name", "pyek-ev-run", "-l", "tier=web", "busybox", "sh", "-c", "exit 3")
    assert run.returncode == 3, run.stderr
    docker("rm", "pyek-ev-run", check=True)
    events = docker.events(since, time.time() + 0.5, "--filter", "container=pyek-ev-run")
    actions = [e["Action"] for e in events]
    assert actions == ["create", "attach", "start", "die", "destroy"], actions
    cid = events[0]["Actor"]["ID"]
    for e in events:
        assert e["Type"] == "container" and e["Actor"]["ID"] == cid and e["id"] == cid
        assert e["scope"] == "local" and e["time"] == e["timeNano"] // 10**9
        attributes = e["Actor"]["Attributes"]
        assert attributes["name"] == "pyek-ev-run" and attributes["image"] == "busybox"
        assert attributes["tier"] == "web"  # the container's labels, as Docker puts them
    assert events[3]["Actor"]["Attributes"]["exitCode"] == "3"
    # The default format, as docker prints it.
    text = docker(
        "events",
        "--since",
        f"{since:.3f}",
        "--until",
        f"{time.time():.3f}",
        "-f",
        f"container={cid}",
    ).stdout
    die = [line for line in text.splitlines() if f" container die {cid} (" in line]
    assert len(die) == 1 and "exitCode=3, " in die[0], text
    # Its endpoint on the default network came and went with the run.
    network = docker.events(since, time.time() + 0.5, "--filter", "type=network")
    mine = [e for e in network if e["Actor"]["Attributes"].get("container") == cid]
    assert [e["Action"] for e in mine] == ["connect", "disconnect"], network
    assert mine[0]["Actor"]["Attributes"]["name"] == "bridge"


def test_filters(docker: Docker) -> None:
    since = time.time()
    docker("run", "--name", "pyek-ev-f1", "-l", "role=a", "busybox", "true", check=True)
    docker("run", "--name", "pyek-ev-f2", "-l", "role=b", "busybox", "true", check=True)
    docker("rm", "pyek-ev-f1", "pyek-ev-f2", check=True)
    until = time.time() + 0.5

    def names(*args: str) -> list[tuple[str, str]]:
        return [
            (e["Actor"]["Attributes"].get("name", ""), e["Action"])
            for e in docker.events(since, until, *args)
        ]

    assert names("--filter", "event=die") == [("pyek-ev-f1", "die"), ("pyek-ev-f2", "die")]
    assert names("--filter", "label=role=b", "--filter", "event=start") == [("pyek-ev-f2", "start")]
    assert [a for n, a in names("--filter", "label=role")].count("destroy") == 2
    assert names("--filter", "type=volume") == []
    assert set(names("--filter", "type=network")) == {
        ("bridge", "connect"),
        ("bridge", "disconnect"),
    }
    assert {n for n, _ in names("--filter", "type=container", "--filter", "image=busybox")} == {
        "pyek-ev-f1",
        "pyek-ev-f2",
    }
    assert names("--filter", "container=pyek-ev-f2", "--filter", "event=create") == [
        ("pyek-ev-f2", "create")
    ]
    bad = docker("events", "--filter", "colour=red", "--until", "0s")
    assert bad.returncode != 0 and "invalid filter 'colour'" in bad.stderr
    backwards = docker("events", "--since", "10", "--until", "5")
    assert backwards.returncode != 0 and "cannot be after" in backwards.stderr


def test_network_events(docker: Docker) -> None:
    since = time.time()
    docker("network", "create", "--subnet", SUBNET, "pyek-ev-net", check=True)
    docker("create", "--name", "pyek-ev-member", "busybox", "true", check=True)
    cid = docker.inspect("pyek-ev-member")["Id"]
    try:
        docker("network", "connect", "pyek-ev-net", "pyek-ev-member", check=True)
        docker("network", "disconnect", "pyek-ev-net", "pyek-ev-member", check=True)
    finally:
        docker("rm", "-f", "pyek-ev-member")
        docker("network", "rm", "pyek-ev-net")
    events = docker.events(since, time.time() + 0.5, "--filter", "type=network")
    assert [e["Action"] for e in events] == ["create", "connect", "disconnect", "destroy"]
    net_id = events[0]["Actor"]["ID"]
    for e in events:
        assert e["Actor"]["ID"] == net_id
        assert e["Actor"]["Attributes"]["name"] == "pyek-ev-net"
        assert e["Actor"]["Attributes"]["type"] == "bridge"
    assert events[1]["Actor"]["Attributes"]["container"] == cid
    named = docker.events(since, time.time() + 0.5, "--filter", "network=pyek-ev-net")
    assert len(named) == 4


def test_image_events(docker: Docker) -> None:
    since = time.time()
    docker("tag", "busybox", "pyek-ev-image:one", check=True)
    docker("rmi", "pyek-ev-image:one", check=True)
    events = docker.events(since, time.time() + 0.5, "--filter", "type=image")
    assert [e["Action"] for e in events] == ["tag", "untag"], events
    assert events[0]["Actor"]["Attributes"]["name"] == "pyek-ev-image:one"
    # The fixture's load is in the history: replayed from the daemon's start.
    loads = docker.events(0, time.time(), "--filter", "type=image", "--filter", "event=load")
    assert [e["Actor"]["Attributes"]["name"] for e in loads][:1] == ["busybox:latest"]


def test_bad_queries_are_400s(docker: Docker) -> None:
    client = Client(docker.daemon.host)
    for query in (
        {"since": "yesterday"},
        {"until": "soon"},
        {"filters": "{not json"},
        {"filters": json.dumps({"event": "die"})},
        {"filters": json.dumps({"colour": ["red"]})},
    ):
        with pytest.raises(DaemonError) as refused:
            client.request("GET", "/events", query=query, timeout=10)
        assert refused.value.status == 400, query


def test_live_stream_with_docker_py(docker: Docker) -> None:
    if docker_py is None:
        pytest.fail("needs docker-py")
    client = docker_py.DockerClient(base_url=docker.daemon.host, version="1.47", timeout=30)
    seen: list[dict[str, Any]] = []
    stream = client.events(decode=True, filters={"event": "start", "type": "container"})
    ready = threading.Event()

    def read() -> None:
        ready.set()
        for event in stream:
            seen.append(event)
            return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready.wait(5)
    try:
        container = client.containers.run("busybox", "true", name="pyek-ev-live", detach=True)
        wait_for("the start event on the live stream", lambda: seen, timeout=15)
        assert seen[0]["Action"] == "start" and seen[0]["id"] == container.id
        assert seen[0]["Actor"]["Attributes"]["name"] == "pyek-ev-live"
    finally:
        stream.close()
        reader.join(5)
        docker("rm", "-f", "pyek-ev-live")
        client.close()


def test_until_ends_a_live_stream(docker: Docker) -> None:
    started = time.monotonic()
    result = docker("events", "--until", f"{time.time() + 1.5:.3f}", timeout=20)
    assert result.returncode == 0, result.stderr
    assert 1.0 <= time.monotonic() - started < 10


def test_pyengine_events(docker: Docker) -> None:
    since = time.time()
    docker("create", "--name", "pyek-ev-cli", "busybox", "true", check=True)
    docker("rm", "pyek-ev-cli", check=True)
    result = docker.daemon.cli(
        "events",
        "--since",
        f"{since:.3f}",
        "--until",
        f"{time.time() + 0.5:.3f}",
        "--filter",
        "container=pyek-ev-cli",
        "--format",
        "{{json .}}",
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    actions = [json.loads(line)["Action"] for line in result.stdout.splitlines()]
    assert actions == ["create", "destroy"]
    text = docker.daemon.cli(
        "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}", timeout=30
    ).stdout
    assert " container create " in text and "name=pyek-ev-cli" in text
    bad = docker.daemon.cli("events", "--filter", "nope=1", "--until", "0s")
    assert bad.returncode != 0 and "invalid filter 'nope'" in bad.stderr
    assert BIN.exists()


def test_compose_v1_label_filter(docker: Docker) -> None:
    """docker-compose 1.29's ``up`` reads the project's events with two label filters, both of
    which must match."""
    if docker_py is None:
        pytest.fail("needs docker-py")
    client = docker_py.APIClient(base_url=docker.daemon.host, version="1.47", timeout=30)
    since = time.time()
    project = {"com.docker.compose.project": "pyek", "com.docker.compose.oneoff": "False"}
    try:
        docker(
            "create", "--name", "pyek-ev-compose",
            *(f"--label={k}={v}" for k, v in project.items()),
            "busybox", "true",
            check=True,
        )  # fmt: skip
        docker(
            "create", "--name", "pyek-ev-oneoff", "--label=com.docker.compose.project=pyek",
            "--label=com.docker.compose.oneoff=True", "busybox", "true",
            check=True,
        )  # fmt: skip
        events = list(
            client.events(
                since=int(since),
                until=int(time.time()) + 1,
                filters={"label": [f"{k}={v}" for k, v in project.items()]},
                decode=True,
            )
        )
    finally:
        docker("rm", "-f", "pyek-ev-compose", "pyek-ev-oneoff")
        client.close()
    assert [(e["Actor"]["Attributes"]["name"], e["status"]) for e in events] == [
        ("pyek-ev-compose", "create")
    ]
    assert (
        isinstance(events[0]["time"], int) and events[0]["timeNano"] // 10**9 == events[0]["time"]
    )
