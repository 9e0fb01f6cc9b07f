"""docker-py (``docker`` on PyPI) drives pyengined: the calls scripts and test suites make.

One pyengined in kernel-DNAT mode (``--userland-proxy=false``; the docker CLI tests use the
proxy) on its own bridge, subnet and nft table. Traffic goes only to loopback and to the
daemon's own bridge.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    require,
    start_daemon,
    stop_daemon,
)
from tests.test_e2e import http_get, wait_http

try:
    import docker
    import docker.errors
except ImportError:  # reported by the fixture (a failure under CI)
    docker = None  # type: ignore[assignment]

NAME, BIP = "pyedpy0", "10.62.0.1/24"


@pytest.fixture(scope="module")
def engine_daemon(
    tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path, busybox_archive: Path
) -> Iterator[Daemon]:
    require(docker is not None, "needs docker-py (pip install docker)")
    tmp = tmp_path_factory.mktemp(NAME)
    daemon = start_daemon(tmp, NAME, BIP, userland_proxy=False)
    try:
        daemon.cli("load", "-i", str(nginx_archive), check=True)
        yield daemon
    finally:
        for cid in daemon.cli("ps", "-a", "-q").stdout.split():
            daemon.cli("rm", "-f", cid)
        stop_daemon(daemon)
    assert_nothing_left(daemon)


@pytest.fixture(scope="module")
def client(engine_daemon: Daemon, busybox_archive: Path) -> Iterator[Any]:
    """A DockerClient on the daemon's socket; the API version comes from ``/version``."""
    c = docker.DockerClient(base_url=engine_daemon.host, timeout=120)
    try:
        with open(busybox_archive, "rb") as f:
            loaded = c.images.load(f.read())
        assert [image.tags for image in loaded] == [["busybox:latest"]]
        yield c
    finally:
        c.close()


@pytest.fixture
def names(client: Any) -> Iterator[Callable[[str], str]]:
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(f"pyetest-dpy-{suffix}")
        return used[-1]

    yield name
    for n in used:
        try:
            client.containers.get(n).remove(force=True)
        except docker.errors.NotFound:
            pass


def test_version_and_info(client: Any) -> None:
    assert client.api.api_version == "1.41"  # negotiated from /version
    version = client.api.version()
    assert version["ApiVersion"] == "1.41" and version["MinAPIVersion"] == "1.24"
    assert version["Components"][0]["Name"] == "Engine"
    assert client.ping() is True
    info = client.info()
    assert info["OSType"] == "linux" and info["Driver"] == "overlay2"


def test_images_list_get_tag_remove(client: Any) -> None:
    tags = {tag for image in client.images.list() for tag in image.tags}
    assert {"busybox:latest", "nginx:latest"} <= tags
    nginx = client.images.get("nginx")
    assert nginx.id.startswith("sha256:") and nginx.tags == ["nginx:latest"]
    assert nginx.attrs["Config"]["ExposedPorts"] == {"80/tcp": {}}
    assert nginx.attrs["Os"] == "linux"
    assert client.images.get(nginx.short_id).id == nginx.id
    assert nginx.tag("pyetest/ngx", "t1") is True
    assert client.images.get("pyetest/ngx:t1").id == nginx.id
    assert [img.id for img in client.images.list(name="pyetest/ngx")] == [nginx.id]
    client.images.remove("pyetest/ngx:t1")
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get("pyetest/ngx:t1")


def test_run_detached_with_ports_logs_stop_wait_remove(
    client: Any, names: Callable[[str], str]
) -> None:
    port = free_port()
    container = client.containers.run(
        "nginx", detach=True, ports={"80/tcp": port}, name=names("web")
    )
    assert container.name == "pyetest-dpy-web"
    status, body = wait_http(f"http://127.0.0.1:{port}/")
    assert status == 200 and "Welcome to nginx" in body
    with pytest.raises(urllib.error.HTTPError, match="404"):
        http_get(f"http://127.0.0.1:{port}/pyetest-dpy")
    container.reload()
    assert container.status == "running"
    assert container.ports == {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
    assert container.attrs["NetworkSettings"]["Networks"]["bridge"]["Gateway"] == "10.62.0.1"
    assert container.image.id == client.images.get("nginx").id
    assert b"GET /pyetest-dpy" in container.logs()
    assert b"GET /pyetest-dpy" in container.logs(stdout=True, stderr=False, timestamps=True)

    listed = client.containers.list(filters={"name": "pyetest-dpy-web", "status": "running"})
    assert [c.id for c in listed] == [container.id]

    container.stop(timeout=10)
    assert container.wait() == {"StatusCode": 0, "Error": None}  # nginx: SIGQUIT, clean exit
    container.reload()
    assert container.status == "exited"
    container.remove()
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(container.id)


def test_run_in_the_foreground(client: Any) -> None:
    out = client.containers.run("busybox", ["sh", "-c", "echo hello; echo oops >&2"], remove=True)
    assert out == b"hello\n"
    with pytest.raises(docker.errors.ContainerError) as failed:
        client.containers.run("busybox", ["sh", "-c", "echo bad >&2; exit 3"], remove=True)
    assert failed.value.exit_status == 3 and b"bad" in failed.value.stderr


def test_attach_logs_follow_kill_restart(client: Any, names: Callable[[str], str]) -> None:
    container = client.containers.create(
        "busybox", ["sh", "-c", "echo one; sleep 0.3; echo two"], name=names("attach")
    )
    stream = client.api.attach(container.id, stdout=True, stderr=True, stream=True)
    container.start()
    assert b"".join(stream) == b"one\ntwo\n"
    assert container.wait()["StatusCode"] == 0
    assert list(container.logs(stream=True, follow=True)) == [b"one\n", b"two\n"]

    sleeper = client.containers.run("busybox", ["sleep", "60"], detach=True, name=names("kill"))
    started = client.api.inspect_container(sleeper.id)["State"]["StartedAt"]
    sleeper.restart(timeout=1)
    assert client.api.inspect_container(sleeper.id)["State"]["StartedAt"] > started
    sleeper.kill()
    assert sleeper.wait()["StatusCode"] == 137
    exited = client.containers.list(all=True, filters={"exited": 137})
    assert sleeper.id in [c.id for c in exited]


def test_errors_are_docker_py_exceptions(client: Any) -> None:
    with pytest.raises(docker.errors.NotFound):
        client.containers.get("pyetest-dpy-none")
    with pytest.raises(docker.errors.ImageNotFound):
        client.containers.create("pyetest-dpy-none")
    with pytest.raises(docker.errors.APIError) as tty:
        client.containers.create("busybox", "true", tty=True)
    assert tty.value.status_code == 501 and "TTY" in tty.value.explanation
    with pytest.raises(docker.errors.APIError) as network:
        client.networks.create("pyetest-dpy-net")
    assert network.value.status_code == 501
    assert [n.name for n in client.networks.list()] == ["bridge"]
    assert client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Subnet"] == "10.62.0.0/24"


def test_pull_from_a_loopback_registry(client: Any, tmp_path: Path, busybox_archive: Path) -> None:
    from tests.registry_helpers import skopeo_push, start_registry

    registry = start_registry(tmp_path / "registry", auth="none")
    try:
        skopeo_push(busybox_archive, registry, "pyetest/dpy:v1")
        image = client.images.pull(f"{registry.host}/pyetest/dpy", tag="v1")
        assert f"{registry.host}/pyetest/dpy:v1" in image.tags
        assert image.id == client.images.get("busybox").id
        with pytest.raises(docker.errors.NotFound):
            client.images.pull(f"{registry.host}/pyetest/dpy", tag="nosuch")
        client.images.remove(f"{registry.host}/pyetest/dpy:v1")
    finally:
        registry.stop()
