"""A registry whose token realm is a plain-http server on another host gets no credentials.

The registry (Debian's docker-registry on 127.0.0.1, token auth) names as its realm an
``http://`` server the test runs on 127.0.0.2, which records every ``Authorization`` header
it is sent. ``pyengine login`` and ``pyengine pull`` with a stored login, through a real
pyengined, must fail with one line and never hand that server the Basic credentials: the
registry's answer travels over plain http, so anyone on the path could have written that
realm. (A realm on the registry's own host, as in tests/test_registry.py, still gets them.)
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.credentials import CredentialStore
from tests.conftest import (
    BIN,
    Daemon,
    assert_nothing_left,
    free_port,
    require_tool,
    start_daemon,
    stop_daemon,
)
from tests.registry_helpers import ISSUER, PASSWORD, SERVICE, USER

BRIDGE, BIP = "pyes5f", "10.182.2.1/24"
REALM_HOST = "127.0.0.2"  # loopback, but another host than the registry's 127.0.0.1


class Recorder:
    """An http server on ``REALM_HOST`` that answers 401 and records Authorization headers."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.requests = 0
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                recorder.requests += 1
                if self.headers.get("Authorization"):
                    recorder.authorizations.append(self.headers["Authorization"])
                body = b'{"details": "no"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer((REALM_HOST, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://{REALM_HOST}:{self.server.server_address[1]}/token"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, recorder: Recorder) -> Iterator[str]:
    """docker-registry on 127.0.0.1 with token auth whose realm is the recorder."""
    binary = require_tool("docker-registry")
    openssl = require_tool("openssl")
    tmp = tmp_path_factory.mktemp("pyes5-registry")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=pyengine-test-realm", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    config = tmp / "config.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: pyengine-test-http-secret\n"
        f"auth:\n  token:\n    realm: {recorder.realm}\n    service: {SERVICE}\n"
        f"    issuer: {ISSUER}\n    rootcertbundle: {cert}\n"
    )
    with open(tmp / "registry.log", "wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp / "registry.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5).close()
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    assert recorder.realm in e.headers.get("WWW-Authenticate", "")
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "docker-registry did not answer in 30 s"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp(BRIDGE), BRIDGE, BIP, False)
    try:
        yield d
    finally:
        stop_daemon(d)
    assert_nothing_left(d)


def pyengine(d: Daemon, config_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pyengine"), "-H", d.host, *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "XDG_CONFIG_HOME": str(config_home)},
    )


def assert_refused(result: subprocess.CompletedProcess[str], recorder: Recorder) -> None:
    assert not recorder.authorizations, f"the realm got credentials: {recorder.authorizations}"
    assert result.returncode != 0, result.stdout
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, f"not one line: {err}"
    assert "Traceback" not in err
    assert "refusing to send credentials" in err, err
    assert recorder.realm in err, err


def test_login_sends_no_credentials_to_a_plain_http_realm(
    auth_daemon: Daemon, registry: str, recorder: Recorder, tmp_path: Path
) -> None:
    result = pyengine(auth_daemon, tmp_path, "login", "-u", USER, "-p", PASSWORD, registry)
    assert_refused(result, recorder)
    assert not (tmp_path / "pyengine" / "auth.json").exists()  # no login kept


def test_pull_sends_no_credentials_to_a_plain_http_realm(
    auth_daemon: Daemon, registry: str, recorder: Recorder, tmp_path: Path
) -> None:
    CredentialStore(tmp_path / "pyengine" / "auth.json").save(registry, USER, PASSWORD)
    result = pyengine(auth_daemon, tmp_path, "pull", f"{registry}/library/busybox:latest")
    assert_refused(result, recorder)
    # Without a login the realm is asked anonymously: there is nothing to leak.
    anonymous = tmp_path / "anonymous"
    result = pyengine(auth_daemon, anonymous, "pull", f"{registry}/library/busybox:latest")
    assert result.returncode != 0
    assert recorder.requests >= 1
    assert not recorder.authorizations
