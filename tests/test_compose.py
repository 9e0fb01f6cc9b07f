"""Debian's docker-compose 1.29 brings up a multi-service stack on pyengined.

The stack is what a new user writes first: a front nginx publishing a port and proxying, by
service name, to an app nginx that serves a bind-mounted directory, and redis with a named
volume and a healthcheck the app waits for (``depends_on: condition: service_healthy``). The
test drives it the way that user does — ``up -d``, the page through the front, ``exec -T``,
``logs``, ``down`` then ``up`` (the volume's data stays), ``down -v`` — in both proxy modes,
and checks that nothing is left behind: no container, volume, network, link, rule or process.

Names: daemons ``pyecp0``/``pyecp1`` on 10.193.0.0/24 and 10.193.1.0/24; the stack's network
bridge ``pyecpn0`` on 10.193.10.0/24; project ``pyecp``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    require_tool,
    start_daemon,
    stop_daemon,
)

PROJECT = "pyecp"
STACK_BRIDGE = "pyecpn0"
MODES = {True: ("pyecp0", "10.193.0.1/24"), False: ("pyecp1", "10.193.1.1/24")}

COMPOSE_FILE = """\
services:
  db:
    image: redis:latest
    volumes: ["data:/data"]
    healthcheck:
      test: ["CMD", "redis-cli", "ping"]
      interval: 1s
      timeout: 3s
      retries: 30
  app:
    image: nginx:latest
    volumes: ["./html:/var/www/html:ro"]
    depends_on:
      db:
        condition: service_healthy
  front:
    image: nginx:latest
    ports: ["127.0.0.1:{port}:80"]
    volumes: ["./front.conf:/etc/nginx/sites-enabled/default:ro"]
    depends_on: [app]
volumes:
  data: {{}}
networks:
  default:
    driver_opts:
      com.docker.network.bridge.name: {bridge}
    ipam:
      config:
        - subnet: 10.193.10.0/24
"""
FRONT_CONF = "server { listen 80 default_server; location / { proxy_pass http://app/; } }\n"
PAGE = "served by the app, through the front\n"


class Stack:
    def __init__(self, daemon: Daemon, directory: Path, port: int) -> None:
        self.daemon = daemon
        self.directory = directory
        self.port = port

    def compose(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        env.update(DOCKER_HOST=self.daemon.host, COMPOSE_PROJECT_NAME=PROJECT)
        result = subprocess.run(
            ["docker-compose", "--no-ansi", *args],
            cwd=self.directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n--- daemon log tail:\n"
                + "\n".join(self.daemon.log().splitlines()[-30:])
            )
        return result

    def page(self, timeout: float = 30) -> str:
        """The front's answer on its published port (nginx may take a moment to listen)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def api(self, *args: str) -> str:
        return self.daemon.cli(*args, check=True).stdout


@pytest.fixture(scope="module", params=[True, False], ids=["userland-proxy", "kernel-dnat"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    nginx_archive: Path,
    redis_archive: Path,
) -> Iterator[Stack]:
    require_tool("docker-compose")
    name, bip = MODES[request.param]
    d = start_daemon(tmp_path_factory.mktemp(name), name, bip, request.param)
    # Not under pytest's 0700 tmp tree: nginx's workers (www-data) read the bind mounts.
    directory = Path(tempfile.mkdtemp(prefix="pyecp-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        (directory / "html").mkdir(mode=0o755)
        (directory / "html" / "index.html").write_text(PAGE)
        (directory / "front.conf").write_text(FRONT_CONF)
        port = free_port()
        compose_file = COMPOSE_FILE.format(port=port, bridge=STACK_BRIDGE)
        (directory / "docker-compose.yml").write_text(compose_file)
        for archive in (nginx_archive, redis_archive):
            d.cli("load", "-i", str(archive), check=True)
        yield Stack(d, directory, port)
    finally:
        try:
            Stack(d, directory, 0).compose("down", "-v", "--timeout", "1", check=False)
            for cid in d.cli("ps", "-a", "-q").stdout.split():
                d.cli("rm", "-f", "-v", cid)
        finally:
            stop_daemon(d)
            shutil.rmtree(directory, ignore_errors=True)
    assert_nothing_left(d)


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def test_compose_stack_up_exec_health_logs_down(stack: Stack) -> None:
    stack.compose("up", "-d")
    assert stack.page() == PAGE
    # compose numbers a service's containers from a list filtered by two labels (both must
    # match, as moby's filters do): one container each.
    names = {line.split()[-1] for line in stack.api("ps").splitlines()[1:]}
    assert names == {f"{PROJECT}_{s}_1" for s in ("db", "app", "front")}, names
    db = stack.compose("ps", "-q", "db").stdout.strip()
    health = json.loads(stack.api("inspect", db))[0]["State"]["Health"]
    assert health["Status"] == "healthy", health  # up waited for it (service_healthy)
    assert health["Log"] and health["Log"][-1]["ExitCode"] == 0
    out = stack.compose("exec", "-T", "db", "redis-cli", "set", "pyecp-key", "kept")
    assert out.stdout.strip() == "OK"
    logs = stack.compose("logs", "--no-color", "app").stdout
    assert "GET / HTTP/1.0" in logs, logs  # the front's proxied request, in the app's log

    # down keeps the named volume: up again, the data is there.
    stack.compose("down", "--timeout", "5")
    assert not link_exists(STACK_BRIDGE)
    volumes = stack.api("volume", "ls", "-q").split()
    assert f"{PROJECT}_data" in volumes
    stack.compose("up", "-d")
    assert stack.page() == PAGE
    out = stack.compose("exec", "-T", "db", "redis-cli", "get", "pyecp-key")
    assert out.stdout.strip() == "kept"

    # down -v: containers, the network and its bridge, the volume, and the port all go.
    stack.compose("down", "-v", "--timeout", "5")
    assert stack.api("ps", "-a", "-q").strip() == ""
    assert f"{PROJECT}_data" not in stack.api("volume", "ls", "-q").split()
    assert f"{PROJECT}_default" not in stack.api("network", "ls")
    assert not link_exists(STACK_BRIDGE)
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert STACK_BRIDGE not in ruleset
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/", timeout=2)
