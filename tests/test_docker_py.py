"""docker-py (``docker`` on PyPI) drives pyengined: the calls scripts and test suites make.

One pyengined in kernel-DNAT mode (``--userland-proxy=false``; the docker CLI tests use the
proxy) on its own bridge, subnet and nft table; the user-defined networks the tests create
live in 10.64.0.0/16. Traffic goes only to loopback and to the bridges of that daemon.
"""

from __future__ import annotations

import re
import subprocess
import urllib.error
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    require,
    require_tool,
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
ID_RE = re.compile(r"^[0-9a-f]{64}$")


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
    assert client.api.api_version == "1.47"  # negotiated from /version
    version = client.api.version()
    assert version["ApiVersion"] == "1.47" and version["MinAPIVersion"] == "1.24"
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
    with pytest.raises(docker.errors.APIError) as exec_error:
        client.api.exec_create("pyetest-dpy-none", ["true"])
    assert exec_error.value.status_code == 404
    with pytest.raises(docker.errors.NotFound):
        client.networks.get("pyetest-dpy-none")
    builtin = client.networks.list(filters={"type": "builtin"})
    assert sorted(n.name for n in builtin) == ["bridge", "host", "none"]
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


# ---- networks: user-defined bridge networks in 10.64.N.0/24, one N per test --------------------


@pytest.fixture
def networks(client: Any) -> Iterator[Callable[[str], str]]:
    """Network names for one test (``pyetest-dpy-net-...``); afterwards the containers on each
    are force-removed, then the network itself."""
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(f"pyetest-dpy-net-{suffix}")
        return used[-1]

    yield name
    for net in reversed(used):
        for c in client.containers.list(all=True, filters={"network": net}):
            c.remove(force=True)
        try:
            client.networks.get(net).remove()
        except docker.errors.NotFound:
            pass


def pool(subnet: str, **kwargs: Any) -> Any:
    return docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet, **kwargs)])


def sandbox_addresses(container: Any) -> dict[str, str]:
    """Interface → IPv4 address/prefix inside a running container's network namespace."""
    container.reload()
    key = container.attrs["NetworkSettings"]["SandboxKey"]
    assert key, f"{container.name} has no network namespace"
    out = subprocess.run(
        [require_tool("nsenter"), f"--net={key}", "ip", "-o", "-4", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return {f[1]: f[3] for f in (line.split() for line in out.splitlines()) if f[1] != "lo"}


def endpoint_of(container: Any, network: str) -> dict[str, Any]:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"][network]


def test_network_create_list_get_remove(client: Any, networks: Callable[[str], str]) -> None:
    name = networks("one")
    net = client.networks.create(
        name,
        driver="bridge",
        ipam=pool("10.64.1.0/24", gateway="10.64.1.254", iprange="10.64.1.128/25"),
        internal=True,
        labels={"pyetest": "dpy"},
        options={"com.docker.network.bridge.enable_icc": "false"},
    )
    assert ID_RE.match(net.id) and net.name == name
    attrs = net.attrs
    assert attrs["Driver"] == "bridge" and attrs["Scope"] == "local"
    assert attrs["Internal"] is True and attrs["EnableIPv6"] is False
    assert attrs["IPAM"]["Config"] == [
        {"Subnet": "10.64.1.0/24", "Gateway": "10.64.1.254", "IPRange": "10.64.1.128/25"}
    ]
    assert attrs["Labels"] == {"pyetest": "dpy"}
    assert attrs["Options"] == {"com.docker.network.bridge.enable_icc": "false"}
    assert net.containers == []

    assert [n.id for n in client.networks.list(names=[name])] == [net.id]
    assert [n.id for n in client.networks.list(ids=[net.id[:12]])] == [net.id]
    assert [n.id for n in client.networks.list(filters={"label": "pyetest=dpy"})] == [net.id]
    assert client.networks.list(filters={"label": "pyetest=other"}) == []
    custom = client.networks.list(filters={"type": "custom"})
    assert net.id in [n.id for n in custom] and "bridge" not in [n.name for n in custom]
    assert client.networks.get(name).id == net.id
    assert client.networks.get(net.id[:12]).name == name
    assert client.networks.get(net.id, verbose=True, scope="local").name == name

    with pytest.raises(docker.errors.APIError) as duplicate:
        client.networks.create(name, ipam=pool("10.64.2.0/24"))
    assert duplicate.value.status_code == 409 and "already exists" in duplicate.value.explanation
    with pytest.raises(docker.errors.APIError) as overlap:
        client.networks.create(networks("overlap"), ipam=pool("10.64.1.0/25"))
    assert overlap.value.status_code == 409 and name in overlap.value.explanation

    net.remove()
    with pytest.raises(docker.errors.NotFound):
        client.networks.get(name)
    assert client.networks.list(names=[name]) == []


def test_network_create_refusals(client: Any) -> None:
    before = sorted(n.id for n in client.networks.list())
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"driver": "overlay"}, 501, 'network driver "overlay"'),
        (
            {
                "enable_ipv6": True,
                "ipam": docker.types.IPAMConfig(
                    pool_configs=[
                        docker.types.IPAMPool(subnet="fd00:64:1::/64"),
                        docker.types.IPAMPool(subnet="fd00:64:2::/64"),
                    ]
                ),
            },
            501,
            "several IPv6 subnets",
        ),
        ({"ipam": pool("fd00:64::/64")}, 400, "needs EnableIPv6"),
        ({"ipam": pool("10.64.3.0/24", aux_addresses={"a": "10.64.3.5"})}, 501, "aux-address"),
        ({"ipam": pool("10.64.3.1/24")}, 400, "it should be 10.64.3.0/24"),
        ({"ipam": pool("10.64.3.0/24"), "scope": "global"}, 501, 'scope "global"'),
        ({"ipam": pool("10.64.3.0/24"), "options": {"pyetest": "1"}}, 400, '"pyetest"'),
    ]
    for kwargs, status, needle in cases:
        with pytest.raises(docker.errors.APIError) as refused:
            client.networks.create("pyetest-dpy-net-refused", **kwargs)
        assert refused.value.status_code == status, (kwargs, refused.value)
        assert needle in refused.value.explanation, (kwargs, refused.value)
    with pytest.raises(docker.errors.APIError) as predefined:
        client.networks.create("bridge")
    assert predefined.value.status_code == 403
    assert sorted(n.id for n in client.networks.list()) == before


def test_run_on_a_network_connect_disconnect_rename(
    client: Any, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    front = client.networks.create(networks("front"), ipam=pool("10.64.4.0/24"))
    back = client.networks.create(networks("back"), ipam=pool("10.64.5.0/24"))
    c = client.containers.run(
        "busybox", ["sleep", "300"], detach=True, name=names("multi"), network=front.name
    )
    ep = endpoint_of(c, front.name)
    assert IPv4Address(ep["IPAddress"]) in IPv4Network("10.64.4.0/24")
    assert ep["NetworkID"] == front.id and ep["Gateway"] == "10.64.4.1"
    assert c.attrs["HostConfig"]["NetworkMode"] == front.name
    assert c.attrs["NetworkSettings"]["IPAddress"] == ""  # the default network's field
    front.reload()
    assert [x.id for x in front.containers] == [c.id]

    back.connect(c, aliases=["pyetest-db"], ipv4_address="10.64.5.9")
    ep = endpoint_of(c, back.name)
    assert ep["IPAddress"] == "10.64.5.9" and "pyetest-db" in ep["Aliases"]
    assert ep["IPAMConfig"] == {"IPv4Address": "10.64.5.9"}
    front_ip = endpoint_of(c, front.name)["IPAddress"]
    assert sandbox_addresses(c) == {"eth0": f"{front_ip}/24", "eth1": "10.64.5.9/24"}
    back.reload()
    assert [x.id for x in back.containers] == [c.id]
    assert back.attrs["Containers"][c.id]["IPv4Address"] == "10.64.5.9/24"
    with pytest.raises(docker.errors.APIError) as twice:
        back.connect(c)
    assert twice.value.status_code == 403 and "already exists" in twice.value.explanation

    new_name = names("renamed")
    c.rename(new_name)
    c.reload()
    assert c.name == new_name
    back.reload()
    assert back.attrs["Containers"][c.id]["Name"] == new_name
    listed = client.containers.list(filters={"network": back.name})
    assert [x.name for x in listed] == [new_name]

    with pytest.raises(docker.errors.APIError) as in_use:
        back.remove()
    assert in_use.value.status_code == 403 and "active endpoints" in in_use.value.explanation

    back.disconnect(c)
    assert set(sandbox_addresses(c)) == {"eth0"}
    back.reload()
    assert back.containers == []
    c.reload()
    assert set(c.attrs["NetworkSettings"]["Networks"]) == {front.name}
    with pytest.raises(docker.errors.NotFound):
        back.disconnect(c)
    back.remove()
    with pytest.raises(docker.errors.NotFound):
        client.networks.get(back.id)


def test_connect_a_created_container_and_endpoint_config(
    client: Any, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    first = client.networks.create(networks("first"), ipam=pool("10.64.6.0/24"))
    second = client.networks.create(networks("second"), ipam=pool("10.64.7.0/24"))
    endpoint = client.api.create_endpoint_config(ipv4_address="10.64.6.6", aliases=["pyetest-a"])
    c = client.containers.create(
        "busybox",
        ["sleep", "300"],
        name=names("created"),
        network=first.name,
        networking_config={first.name: endpoint},
    )
    second.connect(c, ipv4_address="10.64.7.7")
    ep = endpoint_of(c, second.name)
    assert ep["IPAddress"] == "" and ep["IPAMConfig"] == {"IPv4Address": "10.64.7.7"}
    assert endpoint_of(c, first.name)["Aliases"] == ["pyetest-a"]
    c.start()
    assert sandbox_addresses(c) == {"eth0": "10.64.6.6/24", "eth1": "10.64.7.7/24"}
    assert endpoint_of(c, second.name)["IPAddress"] == "10.64.7.7"

    # What pyengined cannot do on an endpoint is refused (501), not ignored.
    second.disconnect(c)
    with pytest.raises(docker.errors.APIError) as driver_opt:
        second.connect(c, driver_opt={"pyetest": "1"})
    assert driver_opt.value.status_code == 501 and "driver options" in driver_opt.value.explanation
    # At API 1.44+ (negotiated: 1.47) the endpoint's MacAddress is honoured.
    second.connect(c, mac_address="02:42:0a:40:07:63")
    assert endpoint_of(c, second.name)["MacAddress"] == "02:42:0a:40:07:63"
    second.disconnect(c)
    with pytest.raises(docker.errors.APIError) as link_local:
        second.connect(c, link_local_ips=["169.254.7.7"])
    assert link_local.value.status_code == 501
    assert set(sandbox_addresses(c)) == {"eth0"}
    with pytest.raises(docker.errors.APIError) as on_create:
        client.containers.create(
            "busybox",
            ["true"],
            network=first.name,
            networking_config={
                first.name: client.api.create_endpoint_config(driver_opt={"a": "b"})
            },
        )
    assert on_create.value.status_code == 501
    # Docker refuses aliases and addresses on the default network.
    for config in ({"Aliases": ["pyetest-x"]}, {"IPAMConfig": {"IPv4Address": "10.62.0.99"}}):
        with pytest.raises(docker.errors.APIError) as default:
            client.api.create_container(
                "busybox", ["true"], networking_config={"EndpointsConfig": {"bridge": config}}
            )
        assert default.value.status_code == 400 and "user defined networks" in (
            default.value.explanation
        )


def test_networks_prune(
    client: Any, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    labelled = client.networks.create(
        networks("prune-l"), ipam=pool("10.64.8.0/24"), labels={"pyetest.prune": "yes"}
    )
    plain = client.networks.create(networks("prune-p"), ipam=pool("10.64.9.0/24"))
    used = client.networks.create(
        networks("prune-u"), ipam=pool("10.64.10.0/24"), labels={"pyetest.prune": "yes"}
    )
    client.containers.run(
        "busybox", ["sleep", "300"], detach=True, name=names("prune"), network=used.name
    )
    pruned = client.networks.prune(filters={"label": "pyetest.prune=yes"})
    assert pruned == {"NetworksDeleted": [labelled.name]}
    assert client.networks.prune() == {"NetworksDeleted": [plain.name]}
    assert sorted(n.name for n in client.networks.list()) == sorted(
        ["bridge", "host", "none", used.name]
    )


def test_traffic_and_published_port_on_a_network(
    client: Any, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    net = client.networks.create(networks("web"), ipam=pool("10.64.11.0/24"))
    port = free_port()
    web = client.containers.run(
        "nginx", detach=True, name=names("net-web"), network=net.name, ports={"80/tcp": port}
    )
    status, body = wait_http(f"http://127.0.0.1:{port}/")
    assert status == 200 and "Welcome to nginx" in body
    web.reload()
    assert web.ports == {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
    ip = endpoint_of(web, net.name)["IPAddress"]
    probe = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80"
    out = client.containers.run("busybox", ["sh", "-c", probe], network=net.name, remove=True)
    assert out.startswith(b"HTTP/1.1 200 OK")
