"""Today's Docker clients (API 1.44 to 1.47) against pyengined: the docker CLI 28 at a pinned and
at a negotiated version, docker-py at 1.44 and "auto", compose v1's network create, network prune
filters, and ``--mac-address`` seen inside the container's namespace.

One pyengined (userland proxy) on its own bridge ``pyea0``; the user-defined networks live in
10.183.0.0/16. No traffic leaves the machine: the tests read interfaces, they send nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client.http import UnixHTTPConnection
from tests.conftest import (
    Daemon,
    assert_nothing_left,
    require,
    require_tool,
    start_daemon,
    stop_daemon,
)

try:
    import docker
    import docker.errors
    import docker.types
except ImportError:  # reported by the fixture (a failure under CI)
    docker = None  # type: ignore[assignment]

NAME, BIP = "pyea0", "10.183.0.1/24"
DOCKER = Path("/usr/local/bin/docker")  # the docker CLI 28
PREFIX = "pyetest-v-"


def api(
    d: Daemon, method: str, path: str, version: str | None = "1.47", body: Any = None
) -> tuple[int, Any]:
    """One request at API ``version`` (None: no /v1.NN prefix): (status, decoded JSON or text)."""
    conn = UnixHTTPConnection(d.host.removeprefix("unix://"), 60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Host": "pyengine", "Content-Type": "application/json"}
        conn.request(method, (f"/v{version}" if version else "") + path, data, headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Daemon]:
    require_tool("nsenter")
    tmp = tmp_path_factory.mktemp(NAME)
    daemon = start_daemon(tmp, NAME, BIP, userland_proxy=True)
    try:
        daemon.cli("load", "-i", str(busybox_archive), check=True)
        yield daemon
    finally:
        for cid in daemon.cli("ps", "-a", "-q").stdout.split():
            daemon.cli("rm", "-f", cid)
        for net in daemon.cli("network", "ls", "-q").stdout.split():
            daemon.cli("network", "rm", net)
        stop_daemon(daemon)
    assert_nothing_left(daemon)


@pytest.fixture
def cleanup(d: Daemon) -> Iterator[Callable[[str], str]]:
    """Names for one test's containers and networks; all removed afterwards, even on failure."""
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(PREFIX + suffix)
        return used[-1]

    yield name
    for n in used:
        d.cli("rm", "-f", n)
    for n in used:
        d.cli("network", "rm", n)


def docker_cli(d: Daemon, version: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=d.host, DOCKER_CONFIG=str(d.data_root.parent / "docker-config"))
    if version:
        env["DOCKER_API_VERSION"] = version
    return subprocess.run(
        [str(DOCKER), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: {result.stderr.strip()}"
    return result.stdout


def links_inside(sandbox_key: str) -> dict[str, str]:
    """Interface name → MAC inside a container's network namespace (its SandboxKey)."""
    out = subprocess.run(
        ["nsenter", f"--net={sandbox_key}", "ip", "-j", "link"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return {link["ifname"]: link.get("address", "") for link in json.loads(out)}


# ---- versions -----------------------------------------------------------------------------------


def test_every_version_from_1_24_to_1_47(d: Daemon) -> None:
    status, version = api(d, "GET", "/version", None)
    assert status == 200
    assert version["ApiVersion"] == "1.47" and version["MinAPIVersion"] == "1.24"
    for minor in range(24, 48):
        status, body = api(d, "GET", "/_ping", f"1.{minor}")
        assert status == 200 and body == "OK", minor
    for wrong, words in (("1.48", "too new"), ("2.0", "too new"), ("1.23", "too old")):
        status, body = api(d, "GET", "/version", wrong)
        assert status == 400 and words in body["message"], (wrong, body)
    # Shapes that follow the version: /images/json's VirtualSize went in 1.44.
    assert all("VirtualSize" in i for i in api(d, "GET", "/images/json", "1.41")[1])
    assert not any("VirtualSize" in i for i in api(d, "GET", "/images/json", "1.44")[1])
    assert "KernelMemory" in api(d, "GET", "/info", "1.41")[1]
    info = api(d, "GET", "/info", "1.47")[1]
    assert "KernelMemory" not in info and info["CDISpecDirs"] == []


@pytest.mark.parametrize("version", ["1.44", "1.47", None], ids=["1.44", "1.47", "negotiated"])
def test_docker_cli(d: Daemon, cleanup: Callable[[str], str], version: str | None) -> None:
    require(DOCKER.exists(), f"needs the docker CLI 28 at {DOCKER}")
    tag = (version or "auto").replace(".", "")
    net, net2, ctr = cleanup(f"net{tag}"), cleanup(f"net2{tag}"), cleanup(f"c{tag}")
    third = {"144": 1, "147": 2, "auto": 3}[tag]
    server = json.loads(ok(docker_cli(d, version, "version", "--format", "{{json .Server}}")))
    assert server["ApiVersion"] == "1.47" and server["MinAPIVersion"] == "1.24"
    ok(docker_cli(d, version, "network", "create", "--subnet", f"10.183.{third}.0/24", net))
    ok(docker_cli(d, version, "network", "create", "--subnet", f"10.183.{third + 10}.0/24", net2))
    mac = f"02:aa:bb:00:00:{third:02x}"
    cid = ok(
        docker_cli(
            d,
            version,
            "run",
            "-d",
            "--name",
            ctr,
            "--network",
            net,
            "--network-alias",
            "web",
            "--mac-address",
            mac,
            "busybox",
            "sleep",
            "600",
        )
    ).strip()
    ok(docker_cli(d, version, "network", "connect", net2, ctr))
    info = json.loads(ok(docker_cli(d, version, "inspect", ctr)))[0]
    assert info["Id"] == cid and info["State"]["Running"]
    nets = info["NetworkSettings"]["Networks"]
    assert nets[net]["MacAddress"] == mac
    assert nets[net]["IPAddress"].startswith(f"10.183.{third}.")
    # Up to 1.44 Docker adds the short id to the aliases; from 1.45 they are the client's own.
    assert nets[net]["Aliases"] == (["web", cid[:12]] if version == "1.44" else ["web"])
    assert nets[net]["DNSNames"] == [ctr, cid[:12], "web"]
    assert nets[net2]["MacAddress"].startswith("02:42:")
    inside = links_inside(info["NetworkSettings"]["SandboxKey"])
    assert inside["eth0"] == mac and inside["eth1"] == nets[net2]["MacAddress"]
    listed = json.loads(
        ok(docker_cli(d, version, "ps", "--format", "{{json .}}", "-f", f"id={cid}"))
    )
    assert listed["Names"] == ctr and net in listed["Networks"]
    members = json.loads(ok(docker_cli(d, version, "network", "inspect", net)))[0]["Containers"]
    assert members[cid]["MacAddress"] == mac
    ok(docker_cli(d, version, "rm", "-f", ctr))
    # In the foreground, on two networks at once (several EndpointsConfig: 1.44+).
    out = ok(
        docker_cli(
            d, version, "run", "--rm", "--network", net, "--network", net2, "busybox",
            "cat", "/sys/class/net/eth0/address", "/sys/class/net/eth1/address",
        )
    )  # fmt: skip
    assert len(out.split()) == 2 and all(m.startswith("02:42:0a:b7:") for m in out.split()), out
    ok(docker_cli(d, version, "network", "rm", net, net2))


def test_cli_bad_mac_is_one_line(d: Daemon, cleanup: Callable[[str], str]) -> None:
    require(DOCKER.exists(), f"needs the docker CLI 28 at {DOCKER}")
    name = cleanup("badmac")
    result = docker_cli(
        d, "1.47", "create", "--name", name, "--mac-address", "03:00:00:00:00:01", "busybox"
    )
    assert result.returncode != 0 and "unicast" in result.stderr, result.stderr


# ---- docker-py ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpy(d: Daemon) -> Iterator[Any]:
    require(docker is not None, "needs docker-py (pip install docker)")
    client = docker.APIClient(base_url=d.host, version="1.44", timeout=60)
    try:
        yield client
    finally:
        client.close()


def test_docker_py_two_networks_with_macs_at_create(
    d: Daemon, dpy: Any, cleanup: Callable[[str], str]
) -> None:
    a, b, ctr = cleanup("pya"), cleanup("pyb"), cleanup("pyc")
    for net, third in ((a, 21), (b, 22)):
        ipam = docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=f"10.183.{third}.0/24")]
        )
        dpy.create_network(net, driver="bridge", ipam=ipam)
    mac_a, mac_b = "02:aa:bb:00:21:01", "02:aa:bb:00:22:01"
    networking = dpy.create_networking_config(
        {
            a: dpy.create_endpoint_config(mac_address=mac_a, aliases=["one"]),
            b: dpy.create_endpoint_config(mac_address=mac_b, ipv4_address="10.183.22.50"),
        }
    )
    created = dpy.create_container(
        "busybox",
        ["sleep", "600"],
        name=ctr,
        host_config=dpy.create_host_config(network_mode=a),
        networking_config=networking,
    )
    dpy.start(created["Id"])
    info = dpy.inspect_container(created["Id"])
    nets = info["NetworkSettings"]["Networks"]
    assert (nets[a]["MacAddress"], nets[b]["MacAddress"]) == (mac_a, mac_b)
    assert nets[b]["IPAddress"] == "10.183.22.50"
    inside = links_inside(info["NetworkSettings"]["SandboxKey"])
    assert inside["eth0"] == mac_a and inside["eth1"] == mac_b
    # /sys/class/net as the container sees it (its own mount and network namespaces).
    inner = subprocess.run(
        [
            "nsenter",
            "-t",
            str(info["State"]["Pid"]),
            "-n",
            "-m",
            "cat",
            "/sys/class/net/eth1/address",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert inner.stdout.strip() == mac_b, inner.stderr

    # Below 1.44 Docker refuses a second network at create.
    old = docker.APIClient(base_url=d.host, version="1.43", timeout=60)
    try:
        with pytest.raises(docker.errors.APIError) as err:
            old.create_container(
                "busybox",
                ["true"],
                name=cleanup("pyold"),
                host_config=old.create_host_config(network_mode=a),
                networking_config=networking,
            )
        assert err.value.status_code == 400
        assert "Container cannot be connected to network endpoints" in str(err.value)
    finally:
        old.close()


def test_docker_py_auto_negotiates_1_47(d: Daemon) -> None:
    require(docker is not None, "needs docker-py (pip install docker)")
    client = docker.DockerClient(base_url=d.host, version="auto", timeout=60)
    try:
        assert client.api.api_version == "1.47"
        assert client.version()["ApiVersion"] == "1.47"
        assert client.ping() is True
    finally:
        client.close()


def test_container_wide_mac_address(d: Daemon, cleanup: Callable[[str], str]) -> None:
    """Below 1.44 ``Config.MacAddress`` is the MAC; from 1.44 it is moved to the endpoint with
    Docker's deprecation warning, and must agree with the endpoint's own."""
    name, name2, name3 = cleanup("cw1"), cleanup("cw2"), cleanup("cw3")
    body = {"Image": "busybox", "Cmd": ["sleep", "600"], "MacAddress": "02:aa:bb:00:31:01"}
    status, created = api(d, "POST", f"/containers/create?name={name}", "1.41", body)
    assert status == 201 and created["Warnings"] == []
    status, info = api(d, "GET", f"/containers/{name}/json", "1.41")
    assert info["Config"]["MacAddress"] == "02:aa:bb:00:31:01"
    assert info["NetworkSettings"]["Networks"]["bridge"]["MacAddress"] == "02:aa:bb:00:31:01"
    assert "DNSNames" not in info["NetworkSettings"]["Networks"]["bridge"]
    status, info = api(d, "GET", f"/containers/{name}/json", "1.44")
    assert "MacAddress" not in info["Config"]
    assert info["NetworkSettings"]["Networks"]["bridge"]["DNSNames"] is None
    assert api(d, "POST", f"/containers/{name}/start", "1.41")[0] == 204
    status, info = api(d, "GET", f"/containers/{name}/json", "1.41")
    assert links_inside(info["NetworkSettings"]["SandboxKey"])["eth0"] == "02:aa:bb:00:31:01"

    status, created = api(d, "POST", f"/containers/create?name={name2}", "1.44", body)
    assert status == 201 and "deprecated" in created["Warnings"][0]
    mismatch = {
        **body,
        "NetworkingConfig": {"EndpointsConfig": {"default": {"MacAddress": "02:aa:bb:00:31:02"}}},
    }
    status, answer = api(d, "POST", f"/containers/create?name={name3}", "1.44", mismatch)
    assert status == 400 and "must match" in answer["message"]


@pytest.mark.parametrize(
    "mac, words",
    [("01:00:5e:00:00:01", "unicast"), ("02:42:ac", "not a valid"), ("00:00:00:00:00:00", "zeros")],
)
def test_bad_mac_address_is_400(
    d: Daemon, cleanup: Callable[[str], str], mac: str, words: str
) -> None:
    name = cleanup("bad")
    endpoint = {"EndpointsConfig": {"bridge": {"MacAddress": mac}}}
    body = {
        "Image": "busybox",
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkingConfig": endpoint,
    }
    status, answer = api(d, "POST", f"/containers/create?name={name}", "1.44", body)
    assert status == 400 and words in answer["message"], answer
    status, answer = api(
        d,
        "POST",
        f"/containers/create?name={name}",
        "1.41",
        {"Image": "busybox", "MacAddress": mac},
    )
    assert status == 400 and words in answer["message"], answer


def test_pyengine_client_mac_address(d: Daemon, cleanup: Callable[[str], str]) -> None:
    name = cleanup("cli")
    d.cli(
        "run",
        "-d",
        "--name",
        name,
        "--mac-address",
        "02:AA:BB:00:41:01",
        "busybox",
        "sleep",
        "600",
        check=True,
    )
    info = json.loads(d.cli("inspect", name, check=True).stdout)[0]
    assert info["NetworkSettings"]["MacAddress"] == "02:aa:bb:00:41:01"
    assert links_inside(info["NetworkSettings"]["SandboxKey"])["eth0"] == "02:aa:bb:00:41:01"
    result = d.cli("create", "--name", cleanup("cli2"), "--mac-address", "nope", "busybox")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- networks: compose v1's create, prune filters -----------------------------------------------


def test_compose_v1_attachable_network(d: Daemon, cleanup: Callable[[str], str]) -> None:
    """What Debian's docker-compose 1.29 sends for a project's default network (API 1.25)."""
    name = cleanup("compose_default")
    body = {
        "Name": name,
        "Driver": "bridge",
        "Options": {},
        "IPAM": {"Driver": "default", "Config": []},
        "CheckDuplicate": True,
        "Labels": {"com.docker.compose.network": "default", "com.docker.compose.project": "p"},
        "Internal": False,
        "Attachable": True,
    }
    status, created = api(d, "POST", "/networks/create", "1.25", body)
    assert status == 201, created
    status, net = api(d, "GET", f"/networks/{name}", "1.25")
    assert net["Attachable"] is True and net["Labels"]["com.docker.compose.project"] == "p"
    status, plain = api(d, "GET", "/networks/bridge", "1.47")
    assert plain["Attachable"] is False


def test_network_prune_filters(d: Daemon, cleanup: Callable[[str], str]) -> None:
    keep, old, labelled = cleanup("pkeep"), cleanup("pold"), cleanup("plab")
    for name, labels in ((keep, ["keep=yes"]), (old, []), (labelled, ["tier=x"])):
        d.cli("network", "create", name, *(f"--label={x}" for x in labels), check=True)

    def prune(filters: dict[str, list[str]]) -> tuple[int, Any]:
        from urllib.parse import quote

        return api(d, "POST", "/networks/prune?filters=" + quote(json.dumps(filters)))

    def present() -> set[str]:
        return {n["Name"] for n in api(d, "GET", "/networks")[1]}

    # Created within the last hour: "until=1h" keeps them all.
    assert prune({"until": ["1h"]}) == (200, {"NetworksDeleted": []})
    # label!=keep: every unused network without that label, newer than a past timestamp kept.
    assert prune({"until": [str(int(time.time()) - 3600)], "label!": ["keep"]})[1] == {
        "NetworksDeleted": []
    }
    status, answer = prune({"label!": ["keep=yes"], "label": ["tier"]})
    assert status == 200 and answer["NetworksDeleted"] == [labelled]
    status, answer = prune({"until": ["2999-01-01T00:00:00Z"], "label!": ["keep"]})
    assert status == 200 and answer["NetworksDeleted"] == [old]
    assert keep in present() and old not in present()
    status, answer = prune({"until": ["yesterday"]})
    assert status == 400 and "failed to parse" in answer["message"]
    if DOCKER.exists():  # the docker CLI's spelling of the same filters
        prune_cli = ("network", "prune", "-f", "--filter", "label=keep=yes", "--filter", "until=1s")
        time.sleep(1.1)
        assert keep in ok(docker_cli(d, None, *prune_cli))
        assert keep not in present()


# ---- parsers (no daemon) ------------------------------------------------------------------------


def test_parse_until_reads_docker_spellings() -> None:
    from engine.api.common import BadParameter
    from engine.api.timefilter import parse_until

    now = 1_700_000_000.0
    assert parse_until("1h30m", now) == now - 5400
    assert parse_until("1.5s", now) == now - 1.5
    assert parse_until("1700000000.25", now) == 1700000000.25
    assert parse_until("0", now) == 0.0  # "0" is a timestamp, not a duration (as Docker)
    assert parse_until("2023-11-14T22:13:20Z", now) == now
    assert parse_until("2023-11-14T23:13:20+01:00", now) == now
    for bad in ("", "1x", "yesterday", "2023-13-01", "1h-5m"):
        with pytest.raises(BadParameter):
            parse_until(bad, now)


def test_parse_mac() -> None:
    from common.macaddr import parse_mac

    assert parse_mac("02:AA:bb:00:00:01") == "02:aa:bb:00:00:01"
    assert parse_mac("02-aa-bb-00-00-01") == "02:aa:bb:00:00:01"
    for bad in (
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "02:aa:bb:00:00",
        "02:aa-bb:00:00:01",
        "02:aa:bb:00:00:01:02",
        "g2:aa:bb:00:00:01",
        " 02:aa:bb:00:00:01",
    ):
        with pytest.raises(ValueError):
            parse_mac(bad)
