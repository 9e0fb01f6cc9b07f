"""Hostile API requests against a real pyengined: each is a 4xx with one JSON message, never a
500, and the daemon keeps answering. Also the CLI's one-line errors when the daemon is gone."""

from __future__ import annotations

import base64
import io
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api_helpers import RawApi, remove_all_and_stop
from tests.conftest import BIN, Daemon, assert_nothing_left, start_daemon

BRIDGE, BIP = "pyes3a", "10.173.0.1/24"
DOCKER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp(BRIDGE), BRIDGE, BIP, True)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        yield d
    finally:
        remove_all_and_stop(d)
    assert_nothing_left(d)


@pytest.fixture
def api(daemon: Daemon) -> Iterator[RawApi]:
    api = RawApi(daemon.host)
    yield api
    assert api.ping(), f"the daemon stopped answering:\n{daemon.log()[-3000:]}"
    assert "internal error" not in daemon.log(), daemon.log()[-3000:]


def containers(api: RawApi) -> list[dict]:
    return api.request("GET", "/containers/json", {"all": "1"}).json()


def assert_refused(answer, *words: str, status: int = 400) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    message = answer.json()["message"]
    assert "\n" not in message
    for word in words:
        assert word in message, message


# ---- bodies of the wrong shape -----------------------------------------------------------------

WRONG_TYPES = [
    # The issue's: a string where Docker wants a list of bindings (was a 500 AttributeError).
    ({"HostConfig": {"PortBindings": {"80/tcp": "8080"}}}, "HostConfig.PortBindings"),
    ({"HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": 8080}]}}}, "HostPort"),
    ({"HostConfig": {"PortBindings": {"80/tcp": ["8080"]}}}, "HostConfig.PortBindings"),
    ({"HostConfig": {"PortBindings": ["80:80"]}}, "HostConfig.PortBindings"),
    ({"HostConfig": []}, "HostConfig"),
    ({"HostConfig": "x"}, "HostConfig"),
    ({"HostConfig": {"LogConfig": {"Config": ["max-size=1m"]}}}, "LogConfig.Config"),
    ({"HostConfig": {"LogConfig": {"Config": {"max-size": 10}}}}, "LogConfig.Config"),
    ({"HostConfig": {"RestartPolicy": "always"}}, "RestartPolicy"),
    ({"HostConfig": {"AutoRemove": "yes"}}, "AutoRemove"),
    ({"HostConfig": {"NetworkMode": 1}}, "NetworkMode"),
    ({"Env": "A=1"}, "Env"),
    ({"Env": [1]}, "Env"),
    ({"Env": [None]}, "Env[0]"),
    ({"Cmd": ["sh", None]}, "Cmd[1]"),
    ({"Labels": {"a": None}}, "Labels"),
    ({"Labels": ["a=b"]}, "Labels"),
    ({"Labels": {"a": 1}}, "Labels"),
    ({"Cmd": {"true": 1}}, "Cmd"),
    ({"ExposedPorts": ["80/tcp"]}, "ExposedPorts"),
    ({"StopTimeout": "10"}, "StopTimeout"),
    ({"StopTimeout": 10**30}, "out of range"),
    ({"StopTimeout": 1e400}, ""),  # json.dumps writes Infinity: not JSON
    ({"Image": ["busybox"]}, "Image"),
    ({"NetworkingConfig": {"EndpointsConfig": {"bridge": "x"}}}, "EndpointsConfig"),
    ({"NetworkingConfig": {"EndpointsConfig": {"bridge": {"Aliases": "a"}}}}, "Aliases"),
    ({"Image": "busybox\u0000"}, "NUL"),
]


@pytest.mark.parametrize(("extra", "field"), WRONG_TYPES)
def test_a_wrong_type_is_a_400_naming_the_field(api: RawApi, extra: dict, field: str) -> None:
    before = len(containers(api))
    answer = api.request("POST", "/containers/create", body={"Image": "busybox", **extra})
    assert_refused(answer, field)
    assert len(containers(api)) == before


def test_network_bodies_of_the_wrong_shape_are_a_400(api: RawApi) -> None:
    for body, field in [
        ({"Name": "pyes3n", "IPAM": {"Config": [None]}}, "IPAM.Config[0]"),
        ({"Name": "pyes3n", "IPAM": {"Config": {"Subnet": "10.173.9.0/24"}}}, "IPAM.Config"),
        ({"Name": "pyes3n", "ConfigFrom": 1}, "ConfigFrom"),
        ({"Name": "pyes3n", "Options": {"a": None}}, "Options"),
        ({"Name": ["pyes3n"]}, "Name"),
    ]:
        assert_refused(api.request("POST", "/networks/create", body=body), field)
    for path in ("/networks/bridge/connect", "/networks/bridge/disconnect"):
        assert_refused(api.request("POST", path, body={"Container": 1}), "Container")
    body = {"Container": "x", "EndpointConfig": {"Aliases": [None]}}
    assert_refused(api.request("POST", "/networks/bridge/connect", body=body), "Aliases[0]")


def test_deep_json_is_a_400(api: RawApi) -> None:
    """The issue's 100,000-deep array (was a 500 RecursionError), at the top and in a field."""
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_refused(api.request("POST", "/containers/create", body=deep), "nested")
    body = b'{"Image": "busybox", "Labels": {"a": ' + deep + b"}}"
    assert_refused(api.request("POST", "/containers/create", body=body), "nested")
    # Deep enough to pass json.loads, still refused before any handler walks it.
    body = b'{"Image": "busybox", "Healthcheck": ' + b"[" * 500 + b"]" * 500 + b"}"
    assert_refused(api.request("POST", "/containers/create", body=body), "nested")
    filters = "[" * 5000 + "]" * 5000
    answer = api.request("GET", "/containers/json", {"filters": filters[:4000]})
    assert answer.status == 400, answer.body[:200]
    deep_net = b'{"Name": "pyes3x", "Labels": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert_refused(api.request("POST", "/networks/create", body=deep_net), "nested")


def test_deep_registry_auth_header_is_a_400(api: RawApi) -> None:
    """``X-Registry-Auth`` is JSON too (base64url): refused before any registry is asked."""
    deep = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode()
    answer = api.request(
        "POST",
        "/images/create",
        {"fromImage": "pyes3.invalid/x", "tag": "latest"},
        headers={"X-Registry-Auth": deep},
    )
    assert_refused(answer, "X-Registry-Auth")


def _archive(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_image_archive_with_deep_json_is_a_400(api: RawApi) -> None:
    """An archive's manifest.json or index.json nested 100,000 deep (was a 500 RecursionError)
    or with a 5,000-digit number."""
    deep = b"[" * 100_000 + b"]" * 100_000
    for members in (
        {"manifest.json": deep},
        {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": deep},
        {"manifest.json": b"[" + b"1" * 5000 + b"]"},
    ):
        answer = api.request("POST", "/images/load", body=_archive(members))
        assert_refused(answer, "JSON")


def test_log_sizes_out_of_range_are_a_400(api: RawApi) -> None:
    """The issue's max-size of 400 nines (was a 500 OverflowError), and a max-file as large."""
    for options, words in [
        ({"max-size": "9" * 400}, ("invalid size",)),
        ({"max-size": "9" * 400 + "g"}, ("invalid size",)),
        ({"max-size": "١٠m"}, ("invalid size",)),  # Arabic-Indic digits
        ({"max-file": "9" * 400}, ("max-file",)),
        ({"max-file": "100000"}, ("max-file",)),
    ]:
        body = {
            "Image": "busybox",
            "HostConfig": {"LogConfig": {"Type": "json-file", "Config": options}},
        }
        assert_refused(api.request("POST", "/containers/create", body=body), *words)


def test_non_json_numbers_and_bad_utf8_are_a_400(api: RawApi) -> None:
    for raw in (
        b'{"Image": "busybox", "StopTimeout": NaN}',
        b'{"Image": "busybox", "StopTimeout": 1' + b"0" * 5000 + b"}",
        b'{"Image": "busybox\xff"}',
        b'{"Image": "\\ud800"}',
        b"[]",
        b'"busybox"',
        b"{",
    ):
        assert_refused(api.request("POST", "/containers/create", body=raw))


def test_query_values_out_of_range_are_a_400(api: RawApi) -> None:
    cid = api.request("POST", "/containers/create", body={"Image": "busybox"}).json()["Id"]
    for method, path, query in [
        ("POST", f"/containers/{cid}/stop", {"t": "inf"}),
        ("POST", f"/containers/{cid}/stop", {"t": "nan"}),
        ("POST", f"/containers/{cid}/kill", {"signal": "9" * 400}),
        ("GET", f"/containers/{cid}/logs", {"stdout": "1", "tail": "9" * 5000}),
        ("GET", "/containers/json", {"limit": "1" + "0" * 5000}),
        ("GET", "/containers/json", {"filters": '{"name": [1]}'}),
        ("GET", "/containers/json", {"filters": '{"name": ["\\u0000"]}'}),
        ("GET", "/networks", {"filters": '{"name": {"a": 1e999}}'}),
    ]:
        answer = api.request(method, path, query)
        assert 400 <= answer.status < 500, (path, query, answer.status, answer.body[:200])
    assert api.request("DELETE", f"/containers/{cid}").status == 204


def test_bodies_past_the_cap_are_a_413_and_archives_still_load(
    daemon: Daemon, api: RawApi, nginx_archive: Path
) -> None:
    """JSON bodies are read whole only up to 1 MiB; an image archive (25 MB) is streamed."""
    big = b'{"Image": "busybox", "Labels": {"a": "' + b"x" * (2 << 20) + b'"}}'
    answer = api.request("POST", "/containers/create", body=big)
    assert_refused(answer, "too large", status=413)
    big_net = b'{"Name": "pyes3big", "Labels": {"a": "' + b"x" * (2 << 20) + b'"}}'
    assert_refused(api.request("POST", "/networks/create", body=big_net), status=413)
    assert nginx_archive.stat().st_size > 2 << 20
    daemon.cli("load", "-i", str(nginx_archive), check=True)
    assert re.search(r"^nginx\s+latest\s", daemon.cli("images", check=True).stdout, re.M)


# ---- names ---------------------------------------------------------------------------------


def test_a_name_with_a_trailing_newline_is_refused(api: RawApi) -> None:
    """The issue's ``?name=acc%0A`` created ``acc\\n`` (Python's ``$`` matches before a final
    newline); Docker's pattern, anchored at both ends, refuses it, and the same for rename and
    for network names."""
    for name in ("acc%0A", "acc%0D%0A", "%0Aacc", "a", "acc%00", "acc%20"):
        answer = api.request("POST", "/containers/create", f"name={name}", {"Image": "busybox"})
        assert_refused(answer, "Invalid container name")
    assert not [c for c in containers(api) if "\n" in c["Names"][0]]

    answer = api.request("POST", "/containers/create", "name=pyes3-ok", {"Image": "busybox"})
    assert answer.status == 201, answer.body
    answer = api.request("POST", "/containers/pyes3-ok/rename", "name=pyes3-new%0A")
    assert_refused(answer, "Invalid container name")
    assert api.request("DELETE", "/containers/pyes3-ok").status == 204

    answer = api.request("POST", "/networks/create", body={"Name": "pyes3net\n"})
    assert 400 <= answer.status < 500, answer.body
    names = [n["Name"] for n in api.request("GET", "/networks").json()]
    assert not [n for n in names if "\n" in n]


def test_300_unnamed_creates_all_get_distinct_names(api: RawApi) -> None:
    """The issue's 300 × ``docker create busybox true``: create #255 never returned (the name
    lists held 255 pairs and the generator looped on the event loop) and the daemon stopped
    answering. Docker's lists, a digit on retry, then the short id: never runs out."""
    api.remove_all_containers()
    started = time.monotonic()
    names = []
    try:
        for i in range(300):
            answer = api.request("POST", "/containers/create", body={"Image": "busybox"})
            assert answer.status == 201, (i, answer.status, answer.body)
            names.append(api.request("GET", f"/containers/{answer.json()['Id']}/json").json())
        assert api.ping()
        listed = {c["Names"][0] for c in containers(api)}
        names = [c["Name"] for c in names]
        assert len(set(names)) == 300 and set(names) == listed
        for name in names:
            assert DOCKER_NAME.fullmatch(name.lstrip("/")), name
        assert time.monotonic() - started < 60
    finally:
        api.remove_all_containers()


# ---- the CLI when the daemon is gone -----------------------------------------------------------


def _serve(path: Path, answer: bytes, stop: threading.Event) -> socket.socket:
    """A unix-socket server that reads each request and answers ``answer`` (maybe nothing) then
    closes: what a client sees when the daemon dies mid-request."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    server.settimeout(0.2)

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(answer)
                except OSError:
                    pass

    threading.Thread(target=loop, daemon=True).start()
    return server


def _cli(host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pyengine"), "-H", host, *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # closed without an answer: http.client.RemoteDisconnected
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[",
        b"garbage\r\n\r\n",
    ],
    ids=["closed", "short-body", "short-chunk", "not-http"],
)
def test_cli_one_line_when_the_daemon_dies_mid_request(tmp_path: Path, answer: bytes) -> None:
    sock = tmp_path / "pyes3-dying.sock"
    stop = threading.Event()
    server = _serve(sock, answer, stop)
    try:
        for args in (("ps",), ("images",), ("network", "ls"), ("logs", "x"), ("rm", "x")):
            assert_one_line_error(_cli(f"unix://{sock}", *args), str(sock))
    finally:
        stop.set()
        server.close()


def test_cli_one_line_when_the_real_daemon_is_killed(daemon: Daemon, api: RawApi) -> None:
    """The issue's ``kill -9`` of pyengined under a foreground ``pyengine run``: the client
    printed a 41-line traceback (http.client.RemoteDisconnected). Then the daemon is started
    again on the same data root and still has the container."""
    run = subprocess.Popen(
        [str(BIN / "pyengine"), "-H", daemon.host, "run", "--name", "pyes3-victim"]
        + ["busybox", "sh", "-c", "echo up; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert run.stdout is not None
        assert run.stdout.readline() == "up\n"  # running, and the client is following it
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=10)
        _, stderr = run.communicate(timeout=20)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        again = start_daemon(daemon.data_root.parent, BRIDGE, BIP, True)
        daemon.process = again.process
    assert run.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert daemon.host in stderr, stderr
    assert api.request("GET", "/containers/pyes3-victim/json").status == 200
    assert api.request("DELETE", "/containers/pyes3-victim", {"force": "1"}).status == 204


def test_cli_one_line_when_there_is_no_daemon(tmp_path: Path) -> None:
    assert_one_line_error(_cli("unix:///nonexistent", "ps"), "Cannot connect")
    not_a_socket = tmp_path / "plain-file"
    not_a_socket.write_text("")
    assert_one_line_error(_cli(f"unix://{not_a_socket}", "ps"), "Cannot connect")
    assert_one_line_error(_cli(f"unix://{tmp_path}", "ps"))
