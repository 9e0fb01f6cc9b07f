"""The container runtime layer: bundle/spec building, overlay rootfs, the monitor and runc.

The privileged tests run real containers with runc from a busybox-static rootfs built here,
and check after each test that no runc container, mount, cgroup or monitor is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.runtime import bundle, rootfs, userdb
from engine.runtime.jsonlog import MAX_LOG_LINE, JsonFileLog
from engine.runtime.runc import ContainerStartError, ExitStatus, Runtime
from netd.dns.hosts import hosts_file
from netd.dns.resolvconf import HOST_RESOLV_CONF, bridge_resolv_conf
from tests.conftest import require_root, require_tool

REPO = Path(__file__).resolve().parent.parent
RFC3339_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
CGROUP_ROOT = Path("/sys/fs/cgroup")
BOUND = 20.0  # seconds any wait-for-a-condition loop in this file may take at most

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nstaff:x:50:nobody\nnogroup:x:65534:\n"


# -- helpers ---------------------------------------------------------------------------------


def _is_static_elf(path: Path) -> bool:
    """True when ``path`` is an ELF64 executable without a PT_INTERP (dynamic loader) header."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    order = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[32:40], order)
    phentsize = int.from_bytes(data[54:56], order)
    phnum = int.from_bytes(data[56:58], order)
    for i in range(phnum):
        start = phoff + i * phentsize
        if int.from_bytes(data[start : start + 4], order) == 3:  # PT_INTERP
            return False
    return True


def build_busybox_rootfs(target: Path) -> Path:
    """A minimal image rootfs: a static busybox, its applet symlinks, root and nobody."""
    busybox = Path(require_tool("busybox")).resolve()
    if not _is_static_elf(busybox):
        pytest.fail(f"{busybox} is not static: apt-get install -y busybox-static")
    for sub in ("bin", "etc", "dev", "proc", "sys", "tmp", "root", "work"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(target / "tmp", 0o1777)
    shutil.copy2(busybox, target / "bin" / "busybox")
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        link = target / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (target / "etc" / "passwd").write_text(PASSWD)
    (target / "etc" / "group").write_text(GROUP)
    return target


def _cgroup_dirs(container_id: str) -> list[Path]:
    return [p for p in CGROUP_ROOT.glob(f"*/pyengine/{container_id}") if p.is_dir()]


def _monitor_pids(container_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine.runtime.monitor" in argv and container_id.encode() in argv:
            pids.append(int(proc.name))
    return pids


def _runc_ids(runc_root: Path) -> list[str]:
    result = subprocess.run(
        ["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True
    )
    return result.stdout.split()


def _log_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _output(path: Path, stream: str = "stdout") -> str:
    return "".join(e["log"] for e in _log_entries(path) if e["stream"] == stream)


def _wait_for_output(path: Path, text: str) -> None:
    deadline = time.monotonic() + BOUND
    while text not in _output(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log within {BOUND} s: {_output(path)!r}")
        time.sleep(0.05)


@dataclass
class Container:
    id: str
    dir: Path
    rootfs: Path
    upper: Path
    log: Path
    exit_file: Path
    monitor_pid: int = 0
    pid: int = 0


@dataclass
class Harness:
    """Builds bundles over the busybox image and runs them; remembers all it made."""

    runtime: Runtime
    base: Path
    image: Path
    containers: list[Container] = field(default_factory=list)

    def prepare(
        self,
        args: list[str],
        *,
        env: list[str] | None = None,
        cwd: str = "/",
        user: str = "",
        hostname: str = "pyebox",
        ip: str | None = None,
        netns_path: str | None = None,
    ) -> Container:
        cid = f"pyetest-rt-{uuid.uuid4().hex[:10]}"
        cdir = self.base / cid
        c = Container(
            id=cid,
            dir=cdir,
            rootfs=cdir / "bundle" / "rootfs",
            upper=cdir / "overlay" / "upper",
            log=cdir / "container.log",
            exit_file=cdir / "exit.json",
        )
        self.containers.append(c)
        rootfs.mount_overlay([self.image], c.upper, cdir / "overlay" / "work", c.rootfs)
        resolv_conf = bridge_resolv_conf(HOST_RESOLV_CONF.read_text())
        hosts = hosts_file(hostname, "", [ip] if ip else [])
        files = bundle.write_network_files(cdir, hostname, hosts, resolv_conf)
        spec = bundle.runtime_spec(
            rootfs=c.rootfs,
            args=args,
            env=env if env is not None else [f"PATH={bundle.DEFAULT_PATH}"],
            cwd=cwd,
            user=userdb.resolve_user(c.rootfs, user),
            hostname=hostname,
            netns_path=netns_path,
            bind_files=files,
            cgroups_path=f"/pyengine/{cid}",
        )
        (cdir / "bundle" / "config.json").write_text(json.dumps(spec))
        return c

    async def start(self, c: Container) -> None:
        c.monitor_pid, c.pid = await self.runtime.start(c.id, c.dir / "bundle", c.log, c.exit_file)

    async def run(self, c: Container) -> ExitStatus:
        await self.start(c)
        return await asyncio.wait_for(self.runtime.wait(c.monitor_pid, c.exit_file), BOUND)

    def cleanup(self) -> list[str]:
        """Remove whatever a container left; returns what had been left (must be nothing)."""
        leftovers = []
        runc_root = self.runtime.state_root
        for c in self.containers:
            for pid in _monitor_pids(c.id):
                leftovers.append(f"monitor {pid} of {c.id}")
                os.kill(pid, signal.SIGKILL)
            if c.id in _runc_ids(runc_root):
                leftovers.append(f"runc container {c.id}")
                subprocess.run(
                    ["runc", "--root", str(runc_root), "delete", "-f", c.id], capture_output=True
                )
            for directory in _cgroup_dirs(c.id):
                leftovers.append(f"cgroup {directory}")
                try:
                    directory.rmdir()
                except OSError:
                    pass
            if rootfs.is_mounted(c.rootfs):
                rootfs.unmount(c.rootfs)
        return leftovers


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("pyetest-rt-image") / "rootfs")


@pytest.fixture
def harness(tmp_path: Path, busybox_image: Path) -> Iterator[Harness]:
    require_root()
    require_tool("runc")
    h = Harness(runtime=Runtime(tmp_path / "runc"), base=tmp_path, image=busybox_image)
    try:
        yield h
    finally:
        leftovers = h.cleanup()
    assert not leftovers, f"left behind: {leftovers}"
    assert _runc_ids(tmp_path / "runc") == []
    assert rootfs.mounts_under(tmp_path) == []


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    require_tool("ip")
    name = f"pyetest-rt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


# -- bundle: pure functions ------------------------------------------------------------------


def _write_etc(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        PASSWD + "www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"
    )
    (root / "etc" / "group").write_text(GROUP + "www-data:x:33:\nweb:x:70:www-data,nobody\n")
    return root


def test_resolve_user_forms(tmp_path: Path) -> None:
    root = _write_etc(tmp_path)
    assert userdb.resolve_user(root, "") == (0, 0, [])
    assert userdb.resolve_user(root, "nobody") == (65534, 65534, [50, 70])
    assert userdb.resolve_user(root, "33") == (33, 33, [70])
    assert userdb.resolve_user(root, "1234") == (1234, 0, [])
    assert userdb.resolve_user(root, "1234:99") == (1234, 99, [])
    # An explicit group replaces the supplementary groups, as in runc.
    assert userdb.resolve_user(root, "www-data:staff") == (33, 50, [])
    assert userdb.resolve_user(root, "nobody:0") == (65534, 0, [])


def test_resolve_user_unknown_names(tmp_path: Path) -> None:
    root = _write_etc(tmp_path / "a")
    with pytest.raises(ValueError) as err:
        userdb.resolve_user(root, "alice")
    assert str(err.value) == "unable to find user alice: no matching entries in passwd file"
    with pytest.raises(ValueError, match="unable to find group wheel: no matching entries"):
        userdb.resolve_user(root, "nobody:wheel")
    empty = tmp_path / "b"
    empty.mkdir()
    with pytest.raises(ValueError) as err:
        userdb.resolve_user(empty, "www-data")
    assert str(err.value) == "unable to find user www-data: no matching entries in passwd file"
    assert userdb.resolve_user(empty, "") == (0, 0, [])


def test_image_process_docker_rules() -> None:
    image = {
        "Entrypoint": ["/entry.sh"],
        "Cmd": ["serve", "--port", "80"],
        "Env": ["PATH=/opt/bin:/bin", "MODE=prod", "KEEP=1"],
        "WorkingDir": "/srv",
        "User": "www-data",
    }
    args, env, cwd, user = bundle.image_process(image, None, None, ["MODE=dev", "NEW=x"])
    assert args == ["/entry.sh", "serve", "--port", "80"]
    assert env == ["PATH=/opt/bin:/bin", "MODE=dev", "KEEP=1", "NEW=x"]
    assert (cwd, user) == ("/srv", "www-data")
    # A command override replaces Cmd only.
    assert bundle.image_process(image, ["sh"], None, [])[0] == ["/entry.sh", "sh"]
    # An entrypoint override drops the image's Cmd too.
    assert bundle.image_process(image, None, ["/bin/true"], [])[0] == ["/bin/true"]
    assert bundle.image_process(image, ["a"], ["/bin/echo"], [])[0] == ["/bin/echo", "a"]
    # --entrypoint "" clears the entrypoint but keeps the image's Cmd.
    assert bundle.image_process(image, None, [], [])[0] == ["serve", "--port", "80"]
    # A bare KEY removes the variable.
    assert "KEEP=1" not in bundle.image_process(image, None, None, ["KEEP"])[1]


def test_image_process_defaults_and_errors() -> None:
    args, env, cwd, user = bundle.image_process({"Cmd": ["sh"]}, None, None, [])
    assert (args, cwd, user) == (["sh"], "/", "")
    assert env == [f"PATH={bundle.DEFAULT_PATH}"]
    with pytest.raises(ValueError, match="^no command specified$"):
        bundle.image_process({"Env": ["A=b"]}, None, None, [])
    with pytest.raises(ValueError, match="^no command specified$"):
        bundle.image_process({"Entrypoint": ["/e"]}, None, [], [])


def test_write_network_files(tmp_path: Path) -> None:
    host_resolv = tmp_path / "host-resolv.conf"
    host_resolv.write_text(
        "# generated\nsearch example.test\nnameserver 127.0.0.53\nnameserver 198.18.0.53\n"
        "nameserver ::1\noptions edns0\n"
    )
    files = bundle.write_network_files(
        tmp_path / "c1",
        "pyebox",
        hosts_file("pyebox", "", ["10.88.0.5"]),
        bridge_resolv_conf(host_resolv.read_text()),
    )
    assert set(files) == {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
    hosts = files["/etc/hosts"].read_text()
    assert hosts.startswith("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    assert hosts.endswith("10.88.0.5\tpyebox\n")
    assert files["/etc/hostname"].read_text() == "pyebox\n"
    resolv = files["/etc/resolv.conf"].read_text()
    assert "nameserver 198.18.0.53" in resolv
    assert "127.0.0.53" not in resolv and "nameserver ::1" not in resolv
    assert "search example.test" in resolv and "options edns0" in resolv
    assert "8.8.8.8" not in resolv

    host_resolv.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    resolv_conf = bridge_resolv_conf(host_resolv.read_text())
    files = bundle.write_network_files(tmp_path / "c2", "h2", hosts_file("h2", "", []), resolv_conf)
    resolv = files["/etc/resolv.conf"].read_text()
    assert resolv.splitlines() == [
        "options edns0 trust-ad",
        "nameserver 8.8.8.8",
        "nameserver 8.8.4.4",
    ]
    assert "\th2" not in files["/etc/hosts"].read_text()


def test_runtime_spec_security_profile(tmp_path: Path) -> None:
    binds = {"/etc/hosts": tmp_path / "hosts", "/etc/resolv.conf": tmp_path / "resolv.conf"}
    spec = bundle.runtime_spec(
        rootfs=tmp_path / "rootfs",
        args=["sh"],
        env=["PATH=/bin"],
        cwd="/srv",
        user=(33, 33, [70]),
        hostname="pyebox",
        netns_path="/run/netns/pyetest-x",
        bind_files=binds,
        cgroups_path="/pyengine/abc",
    )
    process = spec["process"]
    assert process["args"] == ["sh"] and process["cwd"] == "/srv"
    assert process["user"] == {"uid": 33, "gid": 33, "additionalGids": [70]}
    assert "HOSTNAME=pyebox" in process["env"] and "PATH=/bin" in process["env"]
    assert process["noNewPrivileges"] is False and process["terminal"] is False
    assert set(process["capabilities"]["bounding"]) == set(bundle.DEFAULT_CAPABILITIES)
    assert len(bundle.DEFAULT_CAPABILITIES) == 14
    assert "CAP_SYS_ADMIN" not in process["capabilities"]["effective"]
    (nofile,) = process["rlimits"]
    assert nofile["type"] == "RLIMIT_NOFILE" and nofile["soft"] == nofile["hard"] > 0
    assert spec["root"] == {"path": str(tmp_path / "rootfs"), "readonly": False}
    assert spec["hostname"] == "pyebox"
    linux = spec["linux"]
    assert linux["cgroupsPath"] == "/pyengine/abc"
    assert {"type": "network", "path": "/run/netns/pyetest-x"} in linux["namespaces"]
    assert {ns["type"] for ns in linux["namespaces"]} == {"pid", "ipc", "uts", "mount", "network"}
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    mounts = {m["destination"]: m for m in spec["mounts"]}
    for destination in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"):
        assert destination in mounts
    assert "ro" in mounts["/sys"]["options"] and "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert mounts["/etc/hosts"] == {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": str(tmp_path / "hosts"),
        "options": ["rbind", "rprivate"],
    }
    own_netns = bundle.runtime_spec(
        rootfs=tmp_path,
        args=["sh"],
        env=[],
        cwd="/",
        user=(0, 0, []),
        hostname="h",
        netns_path=None,
        bind_files={},
        cgroups_path="/pyengine/x",
    )
    assert {"type": "network"} in own_netns["linux"]["namespaces"]
    assert "additionalGids" not in own_netns["process"]["user"]


# -- monitor: the json-file log format -------------------------------------------------------


def test_json_file_log_lines_partials_and_long_lines(tmp_path: Path) -> None:
    log = JsonFileLog(tmp_path / "c.log")
    log.open()
    log.write("stdout", b"one\ntwo\npart")
    log.write("stderr", b"oops\n")
    log.write("stdout", b"ial\n")
    log.write("stdout", b"x" * (MAX_LOG_LINE + 10) + b"\n")
    log.write("stdout", "é".encode()[:1])  # half a UTF-8 character: held back...
    log.write("stdout", "é".encode()[1:] + b"\n")  # ...until the rest arrives
    log.close()
    entries = _log_entries(tmp_path / "c.log")
    assert [(e["stream"], e["log"]) for e in entries] == [
        ("stdout", "one\n"),
        ("stdout", "two\n"),
        ("stdout", "part"),
        ("stderr", "oops\n"),
        ("stdout", "ial\n"),
        ("stdout", "x" * MAX_LOG_LINE),
        ("stdout", "x" * 10 + "\n"),
        ("stdout", "é\n"),
    ]
    assert all(RFC3339_NANO.match(e["time"]) for e in entries)
    first = (tmp_path / "c.log").read_text().splitlines()[0]
    assert first.startswith('{"log":"one\\n","stream":"stdout","time":"')


# -- rootfs: real overlay mounts -------------------------------------------------------------


def _make_layers(base: Path, count: int, name: str) -> list[Path]:
    layers = []
    for i in range(count):
        layer = base / f"{name}-{i:03d}"
        layer.mkdir(parents=True)
        (layer / "which").write_text(str(i))
        (layer / f"only-{i}").write_text("")
        layers.append(layer)
    return layers


def test_overlay_lowest_first_order_and_unmount(tmp_path: Path) -> None:
    require_root()
    layers = _make_layers(tmp_path, 3, "layer")
    target = tmp_path / "merged"
    rootfs.mount_overlay(layers, tmp_path / "upper", tmp_path / "work", target)
    try:
        assert rootfs.is_mounted(target)
        assert (target / "which").read_text() == "2"  # the last (top-most) layer wins
        assert {p.name for p in target.iterdir()} == {"which", "only-0", "only-1", "only-2"}
        (target / "which").write_text("upper")
        assert (tmp_path / "upper" / "which").read_text() == "upper"
        assert (layers[2] / "which").read_text() == "2"
    finally:
        rootfs.unmount(target)
    assert not rootfs.is_mounted(target)
    rootfs.unmount(target)  # idempotent
    rootfs.unmount(tmp_path / "never-existed")


def test_overlay_many_layers_beyond_one_page(tmp_path: Path) -> None:
    require_root()
    layers = _make_layers(tmp_path, 100, "layer-with-a-rather-long-directory-name-" + "x" * 40)
    assert len(":".join(map(str, layers))) > os.sysconf("SC_PAGE_SIZE")
    target = tmp_path / "merged"
    rootfs.mount_overlay(layers, tmp_path / "upper", tmp_path / "work", target)
    try:
        assert (target / "which").read_text() == "99"
        assert len(list(target.iterdir())) == 101
    finally:
        rootfs.unmount(target)
    assert not rootfs.is_mounted(target)


def test_overlay_failure_leaves_nothing(tmp_path: Path) -> None:
    require_root()
    with pytest.raises(FileNotFoundError, match="lower layer is not a directory"):
        rootfs.mount_overlay([tmp_path / "missing"], tmp_path / "u", tmp_path / "w", tmp_path / "m")
    lower = _make_layers(tmp_path, 1, "l")
    # workdir inside upperdir is refused by the kernel.
    with pytest.raises(OSError):
        rootfs.mount_overlay(lower, tmp_path / "u", tmp_path / "u" / "w", tmp_path / "m")
    assert not rootfs.is_mounted(tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "u").exists()


# -- runtime: real containers with runc -------------------------------------------------------


def test_echo_hello(harness: Harness) -> None:
    c = harness.prepare(["echo", "hello"])
    status = asyncio.run(harness.run(c))
    assert status.exit_code == 0 and status.error == ""
    assert RFC3339_NANO.match(status.finished_at)
    (entry,) = _log_entries(c.log)
    assert {k: entry[k] for k in ("log", "stream")} == {"log": "hello\n", "stream": "stdout"}
    assert RFC3339_NANO.match(entry["time"])
    recorded = json.loads(c.exit_file.read_text())
    assert recorded["ExitCode"] == 0 and recorded["Error"] == ""
    assert not harness.runtime.is_running(c.monitor_pid)


def test_stderr_and_exit_code(harness: Harness) -> None:
    c = harness.prepare(["sh", "-c", "echo err >&2; exit 3"])
    status = asyncio.run(harness.run(c))
    assert status.exit_code == 3
    entries = _log_entries(c.log)
    assert [(e["log"], e["stream"]) for e in entries] == [("err\n", "stderr")]


def test_env_cwd_and_user(harness: Harness) -> None:
    image = {
        "Cmd": ["sh", "-c", 'echo "$FOO $BAR"; pwd; id -u; id -g; id -G'],
        "Env": ["FOO=image", "BAR=kept"],
        "WorkingDir": "/work",
        "User": "nobody",
    }
    args, env, cwd, user = bundle.image_process(image, None, None, ["FOO=override"])
    c = harness.prepare(args, env=env, cwd=cwd, user=user)
    status = asyncio.run(harness.run(c))
    assert status.exit_code == 0, _output(c.log, "stderr")
    assert _output(c.log).splitlines() == ["override kept", "/work", "65534", "65534", "65534 50"]


def test_hostname_and_hosts_inside(harness: Harness) -> None:
    c = harness.prepare(
        ["sh", "-c", "hostname; cat /etc/hostname; cat /etc/hosts; cat /etc/resolv.conf"],
        hostname="pyebox-host",
        ip="10.88.0.5",
    )
    status = asyncio.run(harness.run(c))
    assert status.exit_code == 0, _output(c.log, "stderr")
    out = _output(c.log)
    assert out.startswith("pyebox-host\npyebox-host\n127.0.0.1\tlocalhost\n")
    assert "10.88.0.5\tpyebox-host\n" in out
    assert "nameserver " in out


def test_joins_given_netns(harness: Harness, netns: str) -> None:
    netns_path = f"/run/netns/{netns}"
    c = harness.prepare(
        ["sh", "-c", "ip -o link; readlink /proc/self/ns/net"], netns_path=netns_path
    )
    status = asyncio.run(harness.run(c))
    assert status.exit_code == 0, _output(c.log, "stderr")
    lines = _output(c.log).splitlines()
    interfaces = {line.split(":")[1].strip() for line in lines[:-1]}
    assert interfaces == {"lo"}
    assert lines[-1] == f"net:[{os.stat(netns_path).st_ino}]"


def test_overlay_rootfs_writes_land_in_upper(harness: Harness) -> None:
    c = harness.prepare(["sh", "-c", "echo data > /created; echo more >> /etc/group; rm /bin/yes"])
    status = asyncio.run(harness.run(c))
    assert status.exit_code == 0, _output(c.log, "stderr")
    assert (c.upper / "created").read_text() == "data\n"
    assert (c.upper / "etc" / "group").read_text() == GROUP + "more\n"
    whiteout = (c.upper / "bin" / "yes").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert not (harness.image / "created").exists()
    assert (harness.image / "etc" / "group").read_text() == GROUP
    assert (harness.image / "bin" / "yes").is_symlink()


def test_stop_with_trapped_sigterm(harness: Harness) -> None:
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    c = harness.prepare(["sh", "-c", script])

    async def scenario() -> ExitStatus:
        await harness.start(c)
        assert harness.runtime.is_running(c.monitor_pid)
        await asyncio.to_thread(_wait_for_output, c.log, "ready")
        return await harness.runtime.stop(c.id, c.monitor_pid, c.exit_file, timeout=BOUND)

    status = asyncio.run(scenario())
    assert status.exit_code == 7
    assert _output(c.log) == "ready\ngot TERM\n"
    assert not harness.runtime.is_running(c.monitor_pid)


def test_stop_kills_after_timeout_when_sigterm_ignored(harness: Harness) -> None:
    c = harness.prepare(["sh", "-c", 'trap "" TERM; echo ready; sleep 100'])

    async def scenario() -> ExitStatus:
        await harness.start(c)
        await asyncio.to_thread(_wait_for_output, c.log, "ready")
        return await harness.runtime.stop(
            c.id, c.monitor_pid, c.exit_file, stop_signal="SIGTERM", timeout=1
        )

    status = asyncio.run(scenario())
    assert status.exit_code == 137


def test_kill_with_signal_number_and_after_exit(harness: Harness) -> None:
    c = harness.prepare(
        ["sh", "-c", "trap 'exit 12' USR1; echo ready; while :; do sleep 0.1; done"]
    )

    async def scenario() -> ExitStatus:
        await harness.start(c)
        await asyncio.to_thread(_wait_for_output, c.log, "ready")
        await harness.runtime.kill(c.id, int(signal.SIGUSR1))
        status = await asyncio.wait_for(harness.runtime.wait(c.monitor_pid, c.exit_file), BOUND)
        await harness.runtime.kill(c.id, "SIGKILL")  # gone already: not an error
        return status

    assert asyncio.run(scenario()).exit_code == 12


def test_unknown_executable_fails_cleanly(harness: Harness) -> None:
    c = harness.prepare(["pyetest-no-such-binary", "arg"])
    with pytest.raises(ContainerStartError) as err:
        asyncio.run(harness.start(c))
    message = str(err.value)
    assert "\n" not in message
    assert 'exec: "pyetest-no-such-binary": executable file not found in $PATH' in message
    assert _runc_ids(harness.runtime.state_root) == []
    assert _monitor_pids(c.id) == []
    assert _cgroup_dirs(c.id) == []
    assert not c.exit_file.exists()


def test_output_longer_than_a_log_line_is_split(harness: Harness) -> None:
    count = 3 * MAX_LOG_LINE + 100
    c = harness.prepare(["sh", "-c", f"head -c {count} /dev/zero | tr '\\0' a; echo; echo end"])
    status = asyncio.run(harness.run(c))
    assert status.exit_code == 0
    entries = [e["log"] for e in _log_entries(c.log)]
    assert "".join(entries) == "a" * count + "\nend\n"
    assert max(len(e) for e in entries) <= MAX_LOG_LINE
    assert entries[-1] == "end\n"


def test_monitor_ignores_hangup_and_interrupt(harness: Harness) -> None:
    c = harness.prepare(["sh", "-c", "trap 'exit 9' TERM; echo ready; while :; do sleep 0.1; done"])

    async def scenario() -> ExitStatus:
        await harness.start(c)
        await asyncio.to_thread(_wait_for_output, c.log, "ready")
        os.kill(c.monitor_pid, signal.SIGHUP)
        os.kill(c.monitor_pid, signal.SIGINT)
        await asyncio.sleep(0.2)
        assert harness.runtime.is_running(c.monitor_pid)
        return await harness.runtime.stop(c.id, c.monitor_pid, c.exit_file, timeout=BOUND)

    assert asyncio.run(scenario()).exit_code == 9


FAKE_DAEMON = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from engine.runtime.runc import Runtime

    async def main():
        state_root, cid, bundle_dir, log, exit_file = sys.argv[1:6]
        runtime = Runtime(Path(state_root))
        monitor_pid, pid = await runtime.start(cid, Path(bundle_dir), Path(log), Path(exit_file))
        print(monitor_pid, pid, flush=True)
        time.sleep(3600)

    asyncio.run(main())
    """
)


def test_monitor_survives_its_daemon(harness: Harness) -> None:
    """A daemon that starts a container and dies: the monitor carries on, and a new Runtime
    (no longer its parent) can still wait for it and get the exit status."""
    script = "echo ready; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo bye; exit 4"
    c = harness.prepare(["sh", "-c", script])
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FAKE_DAEMON,
            str(harness.runtime.state_root),
            c.id,
            str(c.dir / "bundle"),
            str(c.log),
            str(c.exit_file),
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert daemon.stdout is not None
        line = daemon.stdout.readline().decode()
        assert line, "the fake daemon did not start the container"
        c.monitor_pid, c.pid = map(int, line.split())
    finally:
        daemon.kill()
        daemon.wait()
    _wait_for_output(c.log, "ready")
    # Parent gone: the monitor (now an orphan) and the container still run.
    assert harness.runtime.is_running(c.monitor_pid)
    assert c.id in _runc_ids(harness.runtime.state_root)
    os.kill(c.pid, 0)

    (c.rootfs / "tmp" / "go").write_text("")
    status = asyncio.run(asyncio.wait_for(harness.runtime.wait(c.monitor_pid, c.exit_file), BOUND))
    assert status.exit_code == 4
    assert _output(c.log) == "ready\nbye\n"
    assert not harness.runtime.is_running(c.monitor_pid)


def test_wait_reports_a_monitor_that_died(harness: Harness) -> None:
    c = harness.prepare(["sh", "-c", "echo ready; sleep 100"])

    async def scenario() -> ExitStatus:
        await harness.start(c)
        await asyncio.to_thread(_wait_for_output, c.log, "ready")
        os.kill(c.monitor_pid, signal.SIGKILL)
        status = await asyncio.wait_for(harness.runtime.wait(c.monitor_pid, c.exit_file), BOUND)
        await harness.runtime.kill(c.id, "SIGKILL")
        await harness.runtime.delete(c.id)
        return status

    status = asyncio.run(scenario())
    assert (status.exit_code, status.error) == (255, "monitor died")
    assert _runc_ids(harness.runtime.state_root) == []


# -- runtime: failures before runc answers ---------------------------------------------------


def _fake_runc(tmp_path: Path) -> str:
    """A runc stand-in whose `create` hangs and whose other commands succeed."""
    script = tmp_path / "fake-runc"
    script.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = create ] && exec sleep 30; done\n')
    script.chmod(0o755)
    return str(script)


def _empty_bundle(tmp_path: Path) -> Path:
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    return bundle_dir


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (proc(5): stat fields 3 and 5)."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members


def _group_is_gone(pgid: int) -> bool:
    deadline = time.monotonic() + BOUND
    while _live_group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_start_timeout_kills_the_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.runtime.runc as runtime_module

    monkeypatch.setattr(runtime_module, "START_TIMEOUT", 0.5)
    runtime = Runtime(tmp_path / "state", runc=_fake_runc(tmp_path))
    bundle_dir = _empty_bundle(tmp_path)
    cid = f"pyetest-rt-{uuid.uuid4().hex[:10]}"
    with pytest.raises(ContainerStartError, match="did not start within 0.5 s"):
        asyncio.run(runtime.start(cid, bundle_dir, tmp_path / "log", tmp_path / "exit.json"))
    assert _monitor_pids(cid) == []
    assert runtime._children == {}


def test_cancelled_start_kills_the_monitor(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "state", runc=_fake_runc(tmp_path))
    bundle_dir = _empty_bundle(tmp_path)
    cid = f"pyetest-rt-{uuid.uuid4().hex[:10]}"
    started: list[int] = []

    async def scenario() -> None:
        task = asyncio.create_task(
            runtime.start(cid, bundle_dir, tmp_path / "log", tmp_path / "exit.json")
        )
        deadline = time.monotonic() + BOUND
        while not runtime._children and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        started.extend(runtime._children)
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    (monitor_pid,) = started
    assert _group_is_gone(monitor_pid)  # the monitor and its hanging `runc create`
    assert _monitor_pids(cid) == []


def test_missing_runc_is_a_start_error(tmp_path: Path) -> None:
    runtime = Runtime(tmp_path / "state", runc=str(tmp_path / "no-such-runc"))
    bundle_dir = _empty_bundle(tmp_path)
    cid = f"pyetest-rt-{uuid.uuid4().hex[:10]}"
    with pytest.raises(ContainerStartError, match="No such file or directory"):
        asyncio.run(runtime.start(cid, bundle_dir, tmp_path / "log", tmp_path / "exit.json"))
    assert _monitor_pids(cid) == []
    assert not (tmp_path / "exit.json").exists()
