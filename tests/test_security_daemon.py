"""The daemon's own defences, on a real pyengined with real runc: Docker's default seccomp
profile and ``--security-opt``, the modes of the data root and its state files, one daemon per
data root, and a corrupt container record that must not stop the daemon from starting.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.http import Client, DaemonError
from engine.runtime import seccomp
from engine.runtime.bundle import DEFAULT_CAPABILITIES
from tests.conftest import (
    BIN,
    Daemon,
    assert_nothing_left,
    free_port,
    start_daemon,
    stop_daemon,
)

BRIDGE = "pyes2a"
BIP = "10.172.0.1/24"
OTHER_BRIDGE = "pyes2b"
SECRET = "pyes2-secret-4f1c9e"
EDQUOT = 122  # "Disk quota exceeded": an errno nothing but the test profile gives mkdir


class Holder:
    """The module's daemon; the corrupt-record test restarts it on the same data root."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemon = start_daemon(tmp, BRIDGE, BIP, True)

    def restart(self) -> Daemon:
        stop_daemon(self.daemon)
        self.daemon = start_daemon(self.tmp, BRIDGE, BIP, True)
        return self.daemon


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Holder]:
    h = Holder(tmp_path_factory.mktemp(BRIDGE))
    try:
        h.daemon.cli("load", "-i", str(busybox_archive), check=True)
        yield h
    finally:
        for cid in h.daemon.cli("ps", "-a", "-q").stdout.split():
            h.daemon.cli("rm", "-f", cid)
        stop_daemon(h.daemon)
    assert_nothing_left(h.daemon)


@pytest.fixture
def d(holder: Holder) -> Daemon:
    return holder.daemon


def run(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return d.cli("run", "--rm", *args, timeout=60)


def status_field(d: Daemon, field: str, *opts: str) -> str:
    out = run(d, *opts, "busybox", "grep", f"^{field}:", "/proc/self/status")
    assert out.returncode == 0, out.stderr
    return out.stdout.split(":", 1)[1].strip()


# ---- seccomp and no-new-privileges ---------------------------------------------------------


def test_default_profile_is_dockers() -> None:
    """The data file resolves as moby's setupSeccomp does for Docker's default capabilities."""
    oci = seccomp.linux_seccomp(seccomp.SecurityOptions(), DEFAULT_CAPABILITIES)
    assert oci is not None
    assert oci["defaultAction"] == "SCMP_ACT_ERRNO" and oci["defaultErrnoRet"] == 1
    allowed = {n for r in oci["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert {"read", "openat", "clone", "chroot", "ptrace", "arch_prctl"} <= allowed
    # Gated on capabilities a default container lacks (CAP_SYS_ADMIN, CAP_SYS_BOOT...).
    assert not {"unshare", "mount", "setns", "reboot", "kexec_load", "bpf"} & allowed
    with_admin = seccomp.linux_seccomp(
        seccomp.SecurityOptions(), [*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"]
    )
    assert with_admin is not None
    assert any("unshare" in r["names"] for r in with_admin["syscalls"])
    assert seccomp.linux_seccomp(seccomp.SecurityOptions(seccomp="unconfined"), []) is None


_KEYS = ["defaultAction", "defaultErrnoRet", "architectures", "archMap", "syscalls", "names",
         "name", "action", "errnoRet", "args", "index", "value", "valueTwo", "op", "includes",
         "excludes", "caps", "arches", "minKernel", "architecture", "subArchitectures"]  # fmt: skip
_ATOMS = st.one_of(
    st.none(), st.booleans(), st.integers(-1, 1 << 70), st.floats(allow_nan=False),
    st.sampled_from(["", "SCMP_ACT_ALLOW", "SCMP_ARCH_X86", "SCMP_CMP_EQ", "4.8", "amd64"]),
)  # fmt: skip
_JSON = st.recursive(
    _ATOMS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(profile=_JSON)
def test_any_profile_is_accepted_or_a_value_error(profile: object) -> None:
    """Whatever JSON a request carries as a profile: a one-line ValueError (a 400), or a
    profile that converts to runc's form; never another exception (a 500)."""
    text = json.dumps(profile)
    try:
        seccomp.parse_security_opts([f"seccomp={text}"])
    except ValueError as e:
        assert "\n" not in str(e)
        return
    json.dumps(seccomp.linux_seccomp(seccomp.SecurityOptions(seccomp=text), DEFAULT_CAPABILITIES))


def test_seccomp_filter_by_default_and_unconfined(d: Daemon) -> None:
    """Issue 13: ``Seccomp: 0`` in a container. Docker's profile is a filter (mode 2) that
    refuses unshare(2) without CAP_SYS_ADMIN; unconfined has no filter and lets it through."""
    assert status_field(d, "Seccomp") == "2"
    blocked = run(d, "busybox", "unshare", "-U", "true")
    assert blocked.returncode != 0
    assert "Operation not permitted" in blocked.stdout + blocked.stderr
    assert status_field(d, "Seccomp", "--security-opt", "seccomp=unconfined") == "0"
    free = run(d, "--security-opt", "seccomp=unconfined", "busybox", "unshare", "-U", "true")
    assert free.returncode == 0, free.stdout + free.stderr


def test_seccomp_profile_file(d: Daemon, tmp_path: Path) -> None:
    """``--security-opt seccomp=<file>``: the CLI sends the file's JSON, runc enforces it."""
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": EDQUOT}
        ],
    }
    path = tmp_path / "pyes2-profile.json"
    path.write_text(json.dumps(profile))
    out = run(d, "--security-opt", f"seccomp={path}", "busybox", "mkdir", "/tmp/pyes2")
    assert out.returncode != 0
    assert os.strerror(EDQUOT) in out.stdout + out.stderr
    assert run(d, "busybox", "mkdir", "/tmp/pyes2").returncode == 0


@pytest.mark.parametrize(
    "profile",
    [
        {"defaultAction": "SCMP_ACT_ALLOW", "flags": []},
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {
                    "name": "personality",
                    "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}],
                },
                {"names": ["pye_no_such_syscall"], "action": "SCMP_ACT_KILL"},
            ],
        },
    ],
    ids=["no-flags", "arches-args"],
)
def test_profiles_runc_accepts(d: Daemon, tmp_path: Path, profile: dict[str, object]) -> None:
    """What the create accepts, runc runs: no profile that passes the check fails the start."""
    path = tmp_path / "pyes2-profile.json"
    path.write_text(json.dumps(profile))
    out = run(d, "--security-opt", f"seccomp={path}", "busybox", "true")
    assert out.returncode == 0, out.stderr


def test_no_new_privileges(d: Daemon) -> None:
    assert status_field(d, "NoNewPrivs") == "0"
    assert status_field(d, "NoNewPrivs", "--security-opt", "no-new-privileges") == "1"
    assert status_field(d, "NoNewPrivs", "--security-opt", "no-new-privileges=true") == "1"
    opts = ("--security-opt", "no-new-privileges=true", "--security-opt", "no-new-privileges=0")
    assert status_field(d, "NoNewPrivs", *opts) == "0"


@pytest.mark.parametrize(
    "opt",
    [
        "apparmor=unconfined",
        "no-new-privileges=maybe",
        "seccomp={not json",
        'seccomp={"defaultAction":"SCMP_ACT_NOPE"}',
        'seccomp={"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"]}]}',
        "seccomp=" + "[" * 100_000,
        'seccomp={"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_LOG"]}',
        "label",
    ],
)
def test_bad_security_opt_is_a_400(d: Daemon, opt: str) -> None:
    body = {"Image": "busybox", "Cmd": ["true"], "HostConfig": {"SecurityOpt": [opt]}}
    with pytest.raises(DaemonError) as caught:
        Client(d.host).create(None, body)
    assert caught.value.status == 400, str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_security_opt_cli(d: Daemon, tmp_path: Path) -> None:
    out = d.cli("create", "--security-opt", "seccomp=unconfined2", "busybox")
    assert out.returncode == 125 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = d.cli("create", "--security-opt", "pyes2=1", "busybox")
    assert out.returncode == 125 and "invalid --security-opt" in out.stderr, out.stderr


# ---- modes of the data root --------------------------------------------------------------


def _content_dirs(data_root: Path) -> list[Path]:
    """What holds an image's or a container's own files, with the image's own modes."""
    return [data_root / "image" / "layers", data_root / "image" / "blobs",
            *data_root.glob("containers/*/overlay"),
            *data_root.glob("containers/*/bundle/rootfs")]  # fmt: skip


def test_state_is_root_only(d: Daemon) -> None:
    """Issue 13: data root 755, container.json 644 with the Env in it. Now: root 0710, every
    state file 0600 (Docker's config.v2.json), no directory open to others."""
    port = free_port()
    cid = d.cli(
        "run", "-d", "-e", f"SECRET={SECRET}", "-p", f"127.0.0.1:{port}:80",
        "busybox", "sleep", "60",
        check=True,
    ).stdout.strip()  # fmt: skip
    try:
        root = d.data_root
        assert stat.S_IMODE(root.stat().st_mode) == 0o710
        # What group root may reach through the 0710 root: nothing it can list or read.
        for path in [*root.iterdir(), *(root / "containers").iterdir()]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode & 0o067 == 0, f"{path} is open to others ({oct(mode)})"
        skip = _content_dirs(root)
        holding_secret, state_files = [], []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if any(here == s or s in here.parents for s in skip):
                dirnames[:] = []
                continue
            for name in filenames:
                path = here / name
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                if name.endswith(".json") or name.endswith(".lock"):
                    state_files.append(path)
                    assert stat.S_IMODE(st.st_mode) == 0o600, f"{path}: {oct(st.st_mode)}"
                if st.st_size < 1 << 20 and SECRET.encode() in path.read_bytes():
                    holding_secret.append(path)
                    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, f"{path}: {oct(st.st_mode)}"
        names = {p.name for p in holding_secret}
        assert {"container.json", "config.json"} <= names, names
        assert any(p.parent.name == "proxies" for p in state_files), "no proxy record seen"
    finally:
        d.cli("rm", "-f", cid)


def test_data_root_mode_tightened(tmp_path: Path) -> None:
    """A data root made world-readable before the daemon starts is set back to 0710; the
    lock is taken on it (the daemon itself starts in the other tests)."""
    from engine import datadir

    root = tmp_path / "pyes2-root"
    root.mkdir(mode=0o755)
    fd = datadir.claim(root)
    try:
        assert stat.S_IMODE(root.stat().st_mode) == 0o710
        assert (root / datadir.LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        os.close(fd)


# ---- one daemon per data root --------------------------------------------------------------


def test_second_daemon_on_the_same_root_refuses(d: Daemon, tmp_path: Path) -> None:
    """Issue 13: a second pyengined unlinked the first one's socket and shared its state."""
    sock = Path(d.host.removeprefix("unix://"))
    other = tmp_path / "pyes2-other.sock"
    cmd = [
        str(BIN / "pyengined"), "-H", f"unix://{other}", "--data-root", str(d.data_root),
        "--bridge", OTHER_BRIDGE, "--bip", "10.172.1.1/24", "--firewall-table", OTHER_BRIDGE,
    ]  # fmt: skip
    second = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = second.communicate(timeout=15)
    finally:
        if second.poll() is None:  # it started: stop it the way that removes what it made
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=60)
    assert second.returncode != 0
    lines = output.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"data root {d.data_root} is in use by pyengined pid {d.process.pid}" in lines[0]
    assert sock.exists() and not other.exists()
    assert d.cli("version").returncode == 0
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert OTHER_BRIDGE not in links


# ---- a corrupt record ----------------------------------------------------------------------


def test_corrupt_record_is_set_aside(holder: Holder) -> None:
    """Issue 13: one unreadable container.json stopped the daemon from starting. Now it is
    renamed aside and logged; the daemon starts and keeps serving the other containers."""
    d = holder.daemon
    good = d.cli("run", "-d", "--name", "pyes2-good", "busybox", "sleep", "120", check=True)
    good_id = good.stdout.strip()
    bad_id = d.cli("create", "--name", "pyes2-bad", "busybox", "true", check=True).stdout.strip()
    record = d.data_root / "containers" / bad_id / "container.json"
    assert record.exists()
    stop_daemon(d)
    good_record = d.data_root / "containers" / good_id / "container.json"
    good_record.chmod(0o644)  # as versions before 0600 wrote it
    original = record.read_bytes()
    record.write_text('{"id": "' + bad_id + '", "name": ')  # cut short mid-write
    try:
        d = holder.restart()
    except AssertionError:
        # It did not start: the record back, so that the fixture can remove what runs.
        record.write_bytes(original)
        holder.restart()
        raise
    listed = {c["Id"] for c in Client(d.host).containers(all=True)}
    assert good_id in listed and bad_id not in listed
    assert json.loads(d.cli("inspect", "pyes2-good", check=True).stdout)[0]["State"]["Running"]
    assert "corrupt record" in d.log() and str(record) in d.log()
    assert stat.S_IMODE(good_record.stat().st_mode) == 0o600
    aside = list(record.parent.glob("container.json.corrupt-*"))
    assert len(aside) == 1 and not record.exists()
    # The name is free again, and the daemon still runs new containers.
    assert run(d, "--name", "pyes2-bad", "busybox", "true").returncode == 0
    d.cli("rm", "-f", good_id, check=True)
    assert good_id not in {c["Id"] for c in Client(d.host).containers(all=True)}


def test_corrupt_exit_status_is_set_aside(holder: Holder) -> None:
    """A container that ended while no daemon ran leaves its exit status in exit.json; that
    file unreadable, the daemon still starts and the container is exited (status lost)."""
    d = holder.daemon
    cid = d.cli("run", "-d", "busybox", "sleep", "1", check=True).stdout.strip()
    stop_daemon(d)  # live restore: the container goes on, and ends while no daemon runs
    exit_file = d.data_root / "containers" / cid / "exit.json"
    deadline = time.monotonic() + 20
    while not exit_file.exists():
        assert time.monotonic() < deadline, "the container's monitor wrote no exit status"
        time.sleep(0.1)
    exit_file.write_text('{"ExitCode": ')
    try:
        d = holder.restart()
    except AssertionError:
        exit_file.unlink()
        holder.restart()
        raise
    state = json.loads(d.cli("inspect", cid, check=True).stdout)[0]["State"]
    assert not state["Running"] and state["ExitCode"] == 255, state
    assert f"corrupt record {exit_file}" in d.log()
    d.cli("rm", cid, check=True)


def _proxy_pids(d: Daemon) -> dict[int, int]:
    """Host port → pid of its proxy, from the daemon's proxy records."""
    pids = {}
    for path in (d.data_root / "proxies").glob("*.json"):
        for record in json.loads(path.read_text())["proxies"]:
            pids[record["spec"]["host_port"]] = record["process"]["pid"]
    return pids


def test_corrupt_proxy_record_spares_the_others(holder: Holder) -> None:
    """One container's proxy record unreadable: the proxies of the others are adopted as they
    run."""
    d = holder.daemon
    broken, kept = free_port(), free_port()
    cids = [
        d.cli(
            "run", "-d", "-p", f"127.0.0.1:{port}:80", "busybox", "sleep", "120", check=True
        ).stdout.strip()  # fmt: skip
        for port in (broken, kept)
    ]
    before = _proxy_pids(d)
    assert set(before) == {broken, kept}
    stop_daemon(d)  # live restore: the containers and their proxies go on
    for path in (d.data_root / "proxies").glob("*.json"):
        if json.loads(path.read_text())["proxies"][0]["spec"]["host_port"] == broken:
            path.write_text("{")
    d = holder.restart()
    try:
        after = _proxy_pids(d)
        assert after.get(kept) == before[kept], "the intact record's proxy was not adopted"
        assert broken in after, "the port of the corrupt record is not published again"
        assert "ignoring a corrupt proxy record" in d.log()
    finally:
        d.cli("rm", "-f", *cids)


def test_corrupt_network_state_is_set_aside(holder: Holder) -> None:
    """netd's records too: unreadable, they are set aside and the daemon starts with the
    default network (a user network is gone with them, and says so in the log)."""
    d = holder.daemon
    for cid in d.cli("ps", "-a", "-q").stdout.split():
        d.cli("rm", "-f", cid, check=True)
    stop_daemon(d)
    state_dir = d.data_root / "network"
    records = {state_dir / "endpoints.json": b"\x00\xff" * 8, state_dir / "network.json": b"[1"}
    state_dir.mkdir(mode=0o700, exist_ok=True)
    for path, garbage in records.items():
        path.write_bytes(garbage)  # as a crash mid-write on a file system without rename order
    try:
        d = holder.restart()
    except AssertionError:
        for path in records:
            path.unlink(missing_ok=True)
        holder.restart()
        raise
    for path in records:
        assert f"corrupt record {path}" in d.log()
        assert len(list(state_dir.glob(f"{path.name}.corrupt-*"))) == 1
    out = run(d, "busybox", "true")
    assert out.returncode == 0, out.stderr


def test_docker_cli_security_opts(d: Daemon, tmp_path: Path) -> None:
    """Docker's own CLI: it reads the profile file and sends its JSON, as pyengine does."""
    from tests.conftest import require
    from tests.test_docker_cli import DOCKER

    require(DOCKER.exists(), f"needs Debian's docker.io CLI at {DOCKER}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=d.host, DOCKER_CONFIG=str(tmp_path / "docker-config"))
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": EDQUOT}
        ],
    }
    path = tmp_path / "pyes2-profile.json"
    path.write_text(json.dumps(profile, indent=2))
    script = "grep NoNewPrivs /proc/self/status; mkdir /tmp/pyes2"
    out = subprocess.run(
        [str(DOCKER), "run", "--rm", "--security-opt", f"seccomp={path}",
         "--security-opt", "no-new-privileges", "busybox", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode != 0
    assert "NoNewPrivs:\t1" in out.stdout and os.strerror(EDQUOT) in out.stderr, out
    info = subprocess.run(
        [str(DOCKER), "info", "--format", "{{json .SecurityOptions}}"],
        capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "name=seccomp,profile=builtin" in info.stdout, info


def test_corrupt_image_store_state_is_set_aside(holder: Holder, busybox_archive: Path) -> None:
    """repositories.json unreadable: set aside and logged; the store works again at once
    (an image loaded anew runs), where every image operation failed before."""
    d = holder.daemon
    state = d.data_root / "image" / "repositories.json"
    stop_daemon(d)
    original = state.read_bytes()
    state.write_bytes(original[: len(original) // 2])
    try:
        d = holder.restart()
        out = d.cli("load", "-i", str(busybox_archive))
        assert out.returncode == 0, out.stderr
    except AssertionError:
        stop_daemon(holder.daemon)
        state.write_bytes(original)
        holder.restart()
        raise
    assert f"corrupt record {state}" in d.log()
    out = run(d, "busybox", "true")
    assert out.returncode == 0, out.stderr
