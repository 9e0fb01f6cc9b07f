"""containerd 1.6's ``ctr run --cni`` attaches a task through pyengine-cni: a containerd of the
test's own (root, state and socket under a test directory, no CRI plugin) and a ``ctr`` in a
private mount namespace, in which the test's configuration and plugin directories are mounted
on ``/etc/cni/net.d`` and ``/opt/cni/bin`` (ctr reads only those: gocni's defaults), over
overlays of ``/etc`` and ``/opt`` whose upper layers are the test's; the host's directories are
never written. The task prints its address; ``--rm`` makes ctr DEL it on exit."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cni_helpers import PLUGIN, REFERENCE_PLUGINS, allocations, leftovers, sweep
from tests.conftest import require_root, require_tool

pytestmark = pytest.mark.privileged

TIMEOUT = 60  # seconds for one ctr command, and for containerd to start or stop


@dataclass
class Containerd:
    base: Path
    process: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"containerd exited with {process.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise AssertionError("containerd did not start")


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    require_root()
    binary = require_tool("containerd")
    require_tool("ctr")
    require_tool("unshare")
    base = Path(tempfile.mkdtemp(prefix="pyecni-ctd-", dir="/tmp"))
    for sub in ("root", "state", "net.d", "bin", "data", "rootfs/bin"):
        (base / sub).mkdir(parents=True)
    (base / "config.toml").write_text(
        "version = 2\n"
        f'root = "{base / "root"}"\n'
        f'state = "{base / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{base / "containerd.sock"}"\n'
        "[ttrpc]\n"
        f'  address = "{base / "containerd.sock.ttrpc"}"\n'
    )
    sweep()
    log = open(base / "containerd.log", "wb")  # closed below, after containerd stops
    process = subprocess.Popen(
        [binary, "--config", str(base / "config.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_socket(base / "containerd.sock", process)
        yield Containerd(base, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT)
        log.close()
        sweep()
        shutil.rmtree(base, ignore_errors=True)


def ctr_run_with_cni(ctd: Containerd, name: str, *command: str) -> subprocess.CompletedProcess[str]:
    """``ctr run --cni --rm`` in a private mount namespace that shows the test's directories
    at ctr's fixed CNI paths."""
    b = ctd.base
    for sub in ("etc-up", "etc-work", "opt-up", "opt-work"):
        (b / sub).mkdir(exist_ok=True)
    script = "\n".join(
        [
            "set -e",
            f"mount -t overlay pyecni-etc -o lowerdir=/etc,upperdir={b}/etc-up,"
            f"workdir={b}/etc-work /etc",
            "mkdir -p /etc/cni/net.d",
            f"mount --bind {b}/net.d /etc/cni/net.d",
            f"mount -t overlay pyecni-opt -o lowerdir=/opt,upperdir={b}/opt-up,"
            f"workdir={b}/opt-work /opt",
            "mkdir -p /opt/cni/bin",
            f"mount --bind {b}/bin /opt/cni/bin",
            f"exec ctr --address {ctd.socket} -n pyecni run --cni --rm "
            f'--rootfs {b}/rootfs {name} "$@"',
        ]
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_ctr_run_cni_gets_an_address_from_the_plugin(containerd: Containerd) -> None:
    b = containerd.base
    shutil.copy(require_tool("busybox"), b / "rootfs" / "bin" / "busybox")
    (b / "bin" / "pyengine").symlink_to(PLUGIN)
    (b / "bin" / "loopback").symlink_to(REFERENCE_PLUGINS / "loopback")
    conflist = {
        "cniVersion": "1.0.0",
        "name": "pyecni-ctr",
        "plugins": [
            {
                "type": "pyengine",
                "bridge": "pyecni3",
                "table": "pyecni_ctr",
                "dataDir": str(b / "data"),
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.197.30.0/24"}]]},
            }
        ],
    }
    (b / "net.d" / "pyecni-ctr.conflist").write_text(json.dumps(conflist))
    result = ctr_run_with_cni(
        containerd, "pyecni-ctr1", "/bin/busybox", "sh", "-c",
        "/bin/busybox ip -o -4 addr show eth0; /bin/busybox ip route",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "inet 10.197.30.2/24" in result.stdout
    assert "default via 10.197.30.1 dev eth0" in result.stdout
    # ctr's --rm ran DEL: nothing of the attachment is left.
    assert allocations(b / "data") == {}
    assert json.loads((b / "data" / "attachments.json").read_text())["attachments"] == {}
    assert leftovers() == []
