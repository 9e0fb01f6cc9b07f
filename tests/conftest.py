"""Shared fixtures: privilege policy, image archives, and pyengined daemons under test names."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.launcher import DaemonOptions, LaunchError, launch, stop_process

IN_CI = os.environ.get("CI") == "true"
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMAGE_CACHE = Path(os.environ.get("IMAGE_CACHE", "/var/cache/pyengine/images"))


def require(condition: bool, reason: str) -> None:
    """Skip outside CI; under CI=true a missing privilege or tool is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root and the real kernel")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"needs {name} on PATH")
    assert path is not None
    return path


def free_port(proto: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, proto) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def image_archive(name: str) -> Path:
    path = IMAGE_CACHE / f"{name}-oci.tar"
    if not path.exists():
        require_root()
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "engine.images.build", name, "--out", str(path)],
            check=True,
            cwd=REPO,
        )
    return path


@dataclass
class Daemon:
    """A pyengined under test names: its own socket, data root, bridge, subnet and nft table."""

    host: str
    data_root: Path
    bridge: str
    bip: str
    table: str
    userland_proxy: bool
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def gateway(self) -> str:
        return self.bip.split("/")[0]

    def cli(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "pyengine"), "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"pyengine {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_daemon(
    tmp: Path, name: str, bip: str, userland_proxy: bool, *extra_args: str, timeout: float = 30
) -> Daemon:
    require_root()
    require_tool("runc")
    options = DaemonOptions(
        socket_path=tmp / "pyengine.sock",
        data_root=tmp / "data",
        bridge=name,
        bip=bip,
        firewall_table=name,
        userland_proxy=userland_proxy,
        extra_args=extra_args,
    )
    launched = launch(options, tmp / "pyengined.log")
    daemon = Daemon(
        options.host,
        options.data_root,
        name,
        bip,
        name,
        userland_proxy,
        launched.process,
        launched.log_path,
    )
    try:
        launched.wait_until_answering(timeout=timeout)
    except LaunchError as exc:
        if exc.returncode is not None:
            raise AssertionError(f"pyengined exited at start:\n{daemon.log()}") from None
        stop_daemon(daemon)
        raise AssertionError(
            f"pyengined did not answer within {timeout} s:\n{daemon.log()}"
        ) from None
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    stop_process(daemon.process)


@pytest.fixture(scope="session")
def nginx_archive() -> Path:
    return image_archive("nginx")


@pytest.fixture(scope="session")
def busybox_archive() -> Path:
    return image_archive("busybox")


@pytest.fixture(scope="session")
def redis_archive() -> Path:
    return image_archive("redis")


# Each proxy mode gets a daemon of its own, with names no other test or the demo uses.
MODES = {
    True: ("pyetp0", "10.49.0.1/24"),
    False: ("pyetd0", "10.50.0.1/24"),
}


@pytest.fixture(scope="module", params=[True, False], ids=["userland-proxy", "kernel-dnat"])
def daemon(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    nginx_archive: Path,
    busybox_archive: Path,
) -> Iterator[Daemon]:
    userland_proxy: bool = request.param
    name, bip = MODES[userland_proxy]
    tmp = tmp_path_factory.mktemp(name)
    d = start_daemon(tmp, name, bip, userland_proxy)
    try:
        d.cli("load", "-i", str(nginx_archive), check=True)
        d.cli("load", "-i", str(busybox_archive), check=True)
        yield d
    finally:
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
        stop_daemon(d)
    assert_nothing_left(d)


def assert_nothing_left(d: Daemon) -> None:
    """A stopped daemon leaves no bridge, nft table, namespace, proxy or mount behind."""
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert d.bridge not in links, f"bridge {d.bridge} left behind"
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert f"inet {d.table}" not in tables, f"nft table {d.table} left behind"
    procs = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert str(d.data_root) not in procs, "a process of the test daemon is still running"
    assert str(d.data_root) not in Path("/proc/mounts").read_text(), "a rootfs is still mounted"
    # Forked proxies do not name the data root on their command line; the supervisor's record
    # of the running proxies is gone once it stopped them all.
    assert not (d.data_root / "proxies").exists(), "proxies were left running"
