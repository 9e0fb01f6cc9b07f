"""Podman 4.3 with its CNI backend runs nginx with ``-p 18083:80`` through pyengine-cni: a
test-owned plugin and configuration directory (``CONTAINERS_CONF``), a private
``--root``/``--runroot`` on vfs, cgroupfs, no events; the port answers from loopback and from a
client namespace, and ``podman rm -f`` leaves no link, table, map element or address."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cni_helpers import PLUGIN, REFERENCE_PLUGINS, allocations, leftovers, sweep
from tests.conftest import image_archive, require_root, require_tool
from tests.netns_helpers import (
    create_external_host,
    delete_external_host,
    kernel_mappings,
    netns_socket,
)

pytestmark = pytest.mark.privileged

NETWORK = "pyecni-podman"
TABLE = "pyecni_podman"
PORT = 18083
TIMEOUT = 120  # seconds for one podman command


@dataclass
class Podman:
    base: Path
    argv: list[str]
    env: dict[str, str]

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=TIMEOUT
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {result.stderr.strip()}")
        return result


def write_config(base: Path) -> None:
    for sub in ("bin", "net.d", "tmp"):
        (base / sub).mkdir()
    (base / "bin" / "pyengine").symlink_to(PLUGIN)
    (base / "bin" / "loopback").symlink_to(REFERENCE_PLUGINS / "loopback")
    # Podman's default ulimits (nofile 1048576, nproc 32768) are refused on some hosts with
    # "error setting rlimit type 7: operation not permitted": ask for less.
    (base / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=1024:4096", "nproc=4096:4096"]\n'
        "[network]\n"
        'network_backend = "cni"\n'
        f'cni_plugin_dirs = ["{base / "bin"}"]\n'
        f'network_config_dir = "{base / "net.d"}"\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "none"\n'
    )
    conflist = {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "pyengine",
                "bridge": "pyecni2",
                "table": TABLE,
                "dataDir": str(base / "data"),
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.197.20.0/24", "gateway": "10.197.20.1"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
                "capabilities": {"portMappings": True},
            }
        ],
    }
    (base / "net.d" / f"{NETWORK}.conflist").write_text(json.dumps(conflist, indent=2))


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    require_root()
    binary = require_tool("podman")
    # Podman refuses a runroot longer than 50 characters: a short base, not pytest's tmp_path.
    base = Path(tempfile.mkdtemp(prefix="pyecni-podman-", dir="/tmp"))
    write_config(base)
    env = {**os.environ, "CONTAINERS_CONF": str(base / "containers.conf")}
    argv = [
        binary,
        "--root", str(base / "root"),
        "--runroot", str(base / "runroot"),
        "--storage-driver", "vfs",
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "none",
        "--tmpdir", str(base / "tmp"),
    ]  # fmt: skip
    pod = Podman(base, argv, env)
    sweep()
    try:
        pod("load", "-i", str(image_archive("nginx")))
        yield pod
    finally:
        pod("rm", "-af", check=False)
        pod("system", "reset", "--force", check=False)
        sweep()
        shutil.rmtree(base, ignore_errors=True)


def http_status(netns: str | None, ip: str, port: int, deadline: float) -> str:
    """The status line of ``GET /``, retried until ``deadline`` (nginx may still be starting)."""
    while True:
        try:
            with netns_socket(netns) as sock:
                sock.settimeout(3)
                sock.connect((ip, port))
                sock.sendall(b"GET / HTTP/1.0\r\nHost: pyecni\r\n\r\n")
                data = b""
                while b"\r\n" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data.split(b"\r\n", 1)[0].decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_podman_publishes_through_pyengine_cni(podman: Podman) -> None:
    ext = create_external_host("pyecni-pext", "pyecni-px0", "10.197.251.1/30", "10.197.251.2/30")
    try:
        podman(
            "run", "-d", "--name", "pyecni-nginx", "--network", NETWORK,
            "-p", f"{PORT}:80", "docker.io/library/nginx:latest",
        )  # fmt: skip
        inspect = json.loads(podman("inspect", "pyecni-nginx").stdout)[0]
        address = inspect["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
        assert address.startswith("10.197.20.")
        assert kernel_mappings("nftables", TABLE) == [("0.0.0.0", "tcp", PORT, address, 80)]
        deadline = time.monotonic() + 20
        assert http_status(None, "127.0.0.1", PORT, deadline) == "HTTP/1.1 200 OK"
        assert http_status(ext.netns, ext.host_ip, PORT, deadline) == "HTTP/1.1 200 OK"
        assert list(allocations(podman.data_dir)) == [address]
        podman("rm", "-f", "pyecni-nginx")
        assert allocations(podman.data_dir) == {}
        assert json.loads((podman.data_dir / "attachments.json").read_text())["attachments"] == {}
    finally:
        podman("rm", "-f", "pyecni-nginx", check=False)
        delete_external_host(ext)
    assert leftovers() == []
