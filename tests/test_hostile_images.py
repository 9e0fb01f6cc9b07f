"""Hostile images against the real daemon: layers that try to act outside their own directory
and /etc/passwd files that try to make the daemon read the host's files, read forever or block.

One pyengined (bridge pyes1a, 10.171.0.0/24) serves the module; busybox is loaded first and
must still run after every attack.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import inroot
from engine.images.layers import unpack_layer
from engine.runtime import userdb
from tests.conftest import Daemon, assert_nothing_left, require_root, start_daemon, stop_daemon
from tests.test_images import (
    Entry,
    oci_members,
    read_tar,
    sha256,
    tar_bytes,
    uncompressed,
    write_tar,
)

pytestmark = pytest.mark.privileged

BRIDGE = "pyes1a"
BIP = "10.171.0.1/24"
MARKER_USER = "pyemarker"


@pytest.fixture(scope="module")
def busybox_layer(busybox_archive: Path) -> bytes:
    """The layer blob of the busybox image the daemon has loaded."""
    members = read_tar(busybox_archive)
    index = json.loads(members["index.json"])
    manifest = json.loads(members[f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"])
    return members[f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp(BRIDGE), BRIDGE, BIP, False)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        yield d
    finally:
        try:
            for cid in d.cli("ps", "-a", "-q", timeout=30).stdout.split():
                d.cli("rm", "-f", cid, timeout=30)
        finally:
            stop_daemon(d)
    assert_nothing_left(d)


def _config(diff_ids: list[str], user: str = "") -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["true"], "Env": ["PATH=/bin"], "User": user},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(config).encode()


def _load(
    d: Daemon, tmp_path: Path, ref: str, layers: list[bytes], user: str = ""
) -> subprocess.CompletedProcess[str]:
    diff_ids = [sha256(uncompressed(layer)) for layer in layers]
    members = oci_members(layers, ref, _config(diff_ids, user))
    archive = write_tar(tmp_path / f"{ref.replace('/', '-')}.tar", members)
    return d.cli("load", "-i", str(archive), timeout=60)


def _layer_dirs(d: Daemon) -> set[str]:
    return {p.name for p in (d.data_root / "image" / "layers").iterdir()}


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _assert_busybox_runs(d: Daemon) -> None:
    result = d.cli("run", "--rm", "busybox", "true", timeout=60)
    assert result.returncode == 0, result.stderr


def _assert_answers(d: Daemon) -> None:
    started = time.monotonic()
    d.cli("version", timeout=10, check=True)
    assert time.monotonic() - started < 5


# --- layers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [".wh...", ".wh..", ".wh.", "etc/.wh...", "etc/.wh./x", "etc/.wh.../x"]
)
def test_whiteout_names_that_leave_the_layer_are_refused(
    daemon: Daemon, busybox_layer: bytes, tmp_path: Path, name: str
) -> None:
    """Issue 13: a second layer with a member ``.wh...`` removed the whole layers/ directory."""
    before = _layer_dirs(daemon)
    evil = tar_bytes([Entry("etc/", tarfile.DIRTYPE, mode=0o755), Entry(name)])
    error = _one_line_error(_load(daemon, tmp_path, "pyetest/whiteout", [busybox_layer, evil]))
    assert "whiteout" in error and name in error, error
    assert _layer_dirs(daemon) == before
    assert "pyetest/whiteout" not in daemon.cli("images").stdout
    _assert_busybox_runs(daemon)


def test_valid_whiteouts_still_load(daemon: Daemon, busybox_layer: bytes, tmp_path: Path) -> None:
    hide = tar_bytes(
        [
            Entry("bin/.wh.vi"),
            Entry("etc/", tarfile.DIRTYPE, mode=0o755),
            Entry("etc/.wh..wh..opq"),
            Entry("etc/only", data=b"1"),
            Entry(".wh..wh.plnk/", tarfile.DIRTYPE, mode=0o700),  # AUFS metadata: skipped
            Entry(".wh..wh.plnk/1.2", data=b"x"),
        ]
    )
    assert _load(daemon, tmp_path, "pyetest/hide", [busybox_layer, hide]).returncode == 0
    try:
        script = "ls -a /etc; echo =; ls -a /; ls /bin/vi"
        shown = daemon.cli("run", "--rm", "pyetest/hide", "sh", "-c", script)
        assert shown.returncode != 0 and "/bin/vi" in shown.stderr, shown.stderr
        etc, root = shown.stdout.split("=\n")
        bind_mounts = {"hostname", "hosts", "resolv.conf"}
        assert set(etc.split()) - bind_mounts == {".", "..", "only"}, shown.stdout
        assert ".wh..wh.plnk" not in root.split()
    finally:
        daemon.cli("rmi", "pyetest/hide")


def test_symlink_then_file_stays_in_the_layer(
    daemon: Daemon, busybox_layer: bytes, tmp_path: Path
) -> None:
    outside = tmp_path / "pye-outside"
    outside.mkdir()
    evil = tar_bytes(
        [
            Entry("a", tarfile.SYMTYPE, link=str(outside)),
            Entry("a/pwned", data=b"gotcha"),
            Entry("up", tarfile.SYMTYPE, link="../" * 30 + str(outside).lstrip("/")),
            Entry("up/pwned2", data=b"gotcha"),
            Entry("dir/", tarfile.DIRTYPE, mode=0o755),
            Entry("dir/sub", tarfile.SYMTYPE, link="../../../.."),
            Entry("dir/sub/pwned3", data=b"gotcha"),
        ]
    )
    result = _load(daemon, tmp_path, "pyetest/symlinks", [busybox_layer, evil])
    assert result.returncode == 0, result.stderr
    try:
        assert list(outside.iterdir()) == []
        shown = daemon.cli(
            "run", "--rm", "pyetest/symlinks", "cat", f"{outside}/pwned", f"{outside}/pwned2"
        )
        assert shown.stdout == "gotchagotcha", shown.stderr
        assert daemon.cli("run", "--rm", "pyetest/symlinks", "cat", "/pwned3").stdout == "gotcha"
    finally:
        daemon.cli("rmi", "pyetest/symlinks")


@pytest.mark.parametrize(
    "route", ["dotdot", "dotdot-in-middle", "absolute", "via-symlink", "via-symlink-parent"]
)
def test_hard_links_out_of_the_layer_are_refused(
    daemon: Daemon, busybox_layer: bytes, tmp_path: Path, route: str
) -> None:
    secret = tmp_path / "pye-secret"
    secret.write_text("host secret\n")
    host = str(secret).lstrip("/")
    entries = {
        "dotdot": [Entry("stolen", tarfile.LNKTYPE, link="../" * 30 + host)],
        "dotdot-in-middle": [Entry("stolen", tarfile.LNKTYPE, link="etc/" + "../" * 30 + host)],
        "absolute": [Entry("stolen", tarfile.LNKTYPE, link=str(secret))],
        "via-symlink": [
            Entry("hostdir", tarfile.SYMTYPE, link=str(secret.parent)),
            Entry("stolen", tarfile.LNKTYPE, link=f"hostdir/{secret.name}"),
        ],
        "via-symlink-parent": [
            Entry("up", tarfile.SYMTYPE, link="../" * 30),
            Entry("stolen", tarfile.LNKTYPE, link=f"up/{host}"),
        ],
    }[route]
    result = _load(daemon, tmp_path, "pyetest/hardlink", [busybox_layer, tar_bytes(entries)])
    error = _one_line_error(result)
    assert "hard link" in error, error
    assert os.stat(secret).st_nlink == 1
    assert "pyetest/hardlink" not in daemon.cli("images").stdout
    _assert_busybox_runs(daemon)


# --- user lookup ------------------------------------------------------------------------------


def _passwd_layer(kind: str, marker: Path) -> tuple[bytes, str, str]:
    """(layer, image User, what the start error must say) for one hostile /etc/passwd."""
    etc = Entry("etc/", tarfile.DIRTYPE, mode=0o755)
    host = str(marker).lstrip("/")
    missing = f"unable to find user {MARKER_USER}"
    cases = {
        "dev-zero": (
            [
                Entry("dev/", tarfile.DIRTYPE, mode=0o755),
                Entry("dev/zero", tarfile.CHRTYPE, mode=0o666, device=(1, 5)),
                etc,
                Entry("etc/passwd", tarfile.SYMTYPE, link="/dev/zero"),
            ],
            "nobody",
            "/etc/passwd is not a regular file",
        ),
        "dev-zero-of-the-host": (
            [etc, Entry("etc/passwd", tarfile.SYMTYPE, link="../" * 30 + "dev/zero")],
            "nobody",
            "unable to find user nobody",
        ),
        "host-file-relative": (
            [etc, Entry("etc/passwd", tarfile.SYMTYPE, link="../" * 30 + host)],
            MARKER_USER,
            missing,
        ),
        "host-file-absolute": (
            [etc, Entry("etc/passwd", tarfile.SYMTYPE, link=str(marker))],
            MARKER_USER,
            missing,
        ),
        "host-file-via-directory": (
            [Entry("etc", tarfile.SYMTYPE, link=str(marker.parent))],
            MARKER_USER,
            missing,
        ),
        "loop": (
            [etc, Entry("etc/passwd", tarfile.SYMTYPE, link="../etc/passwd")],
            "nobody",
            "too many levels of symbolic links",
        ),
        "fifo": ([etc, Entry("etc/passwd", tarfile.FIFOTYPE)], "nobody", "not a regular file"),
        "huge": (
            [etc, Entry("etc/passwd", data=b"#" * (2 << 20) + b"\nnobody:x:1:1::/:/bin/sh\n")],
            "nobody",
            "/etc/passwd is larger than",
        ),
        "group-fifo": ([etc, Entry("etc/group", tarfile.FIFOTYPE)], "0:wheel", "/etc/group"),
        "uid-out-of-range": ([etc], "99999999999", "uids and gids must be in range"),
    }
    entries, user, expected = cases[kind]
    return tar_bytes(entries), user, expected


@pytest.mark.parametrize(
    "kind",
    [
        "dev-zero",
        "dev-zero-of-the-host",
        "host-file-relative",
        "host-file-absolute",
        "host-file-via-directory",
        "loop",
        "fifo",
        "huge",
        "group-fifo",
        "uid-out-of-range",
    ],
)
def test_hostile_passwd_gives_a_clear_start_error(
    daemon: Daemon, busybox_layer: bytes, tmp_path: Path, kind: str
) -> None:
    """Issue 13: /etc/passwd -> /dev/zero made the daemon read until the OOM killer came; a
    symlink out of the rootfs read the host's file; a FIFO blocked the event loop for good."""
    marker = tmp_path / "passwd"
    marker.write_text(f"{MARKER_USER}:x:4242:4242::/:/bin/sh\n")
    layer, user, expected = _passwd_layer(kind, marker)
    ref = f"pyetest/passwd-{kind}"
    loaded = _load(daemon, tmp_path, ref, [busybox_layer, layer], user=user)
    assert loaded.returncode == 0, loaded.stderr
    name = f"pyes1-{kind}"
    try:
        result = daemon.cli("run", "--name", name, ref, "true", timeout=20)
        error = _one_line_error(result)
        assert expected in error, error
        _assert_answers(daemon)
        inspected = json.loads(daemon.cli("inspect", name, check=True).stdout)
        assert inspected[0]["State"]["Status"] == "created"
    finally:
        daemon.cli("rm", "-f", name)
        daemon.cli("rmi", ref)
    _assert_busybox_runs(daemon)


# --- the resolver both rely on (no daemon) ----------------------------------------------------


def test_inroot_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("in the root\n")
    (tmp_path / "host-only").write_text("host\n")
    os.symlink("/", root / "abs")
    os.symlink("../../../..", root / "up")
    os.symlink("up/etc", root / "etc-link")
    os.symlink("loop", root / "loop")
    os.symlink(str(tmp_path / "host-only"), root / "host-abs")
    os.symlink("../" * 20 + str(tmp_path / "host-only").lstrip("/"), root / "host-rel")
    os.mkfifo(root / "fifo")
    inside = os.stat(root / "etc" / "passwd")
    root_fd = os.open(root, inroot.DIR_FLAGS)
    try:
        for path in ("abs/etc/passwd", "up/etc/passwd", "/../../etc/passwd", "etc-link/passwd"):
            fd = inroot.open_path(root_fd, path)
            try:
                st = os.fstat(fd)
                assert (st.st_dev, st.st_ino) == (inside.st_dev, inside.st_ino), path
            finally:
                os.close(fd)
        for path in ("host-abs", "host-rel", "abs" + str(tmp_path / "host-only")):
            with pytest.raises(FileNotFoundError):
                os.close(inroot.open_path(root_fd, path))
        with pytest.raises(OSError, match="symbolic links"):
            inroot.open_path(root_fd, "loop")
        fd = inroot.open_path(root_fd, "fifo")  # O_PATH: does not wait for a writer
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
        os.close(fd)
        fd, resolved = inroot.open_dir(root_fd, ["up", "etc-link"])
        os.close(fd)
        assert resolved == ["etc"]
    finally:
        os.close(root_fd)
    assert userdb.read_file(root, "/up/etc/passwd") == "in the root\n"
    assert userdb.read_file(root, "/host-rel") is None
    with pytest.raises(userdb.UserLookupError, match="/fifo is not a regular file"):
        userdb.read_file(root, "/fifo")


def test_unpack_keeps_special_mode_bits_as_docker(tmp_path: Path) -> None:
    """Set-uid, set-gid and sticky bits are kept as the tar has them (Docker's createTarFile
    chmods every non-symlink with the header's mode after the chown)."""
    require_root()
    source = tmp_path / "layer.tar"
    source.write_bytes(
        tar_bytes(
            [
                Entry("mail/", tarfile.DIRTYPE, mode=0o2775, gid=8),
                Entry("tmp/", tarfile.DIRTYPE, mode=0o1777),
                Entry("su", data=b"x", mode=0o4755),
                Entry("su-link", tarfile.LNKTYPE, link="su"),
                Entry("wall", data=b"x", mode=0o2755, gid=5),
            ]
        )
    )
    dest = tmp_path / "out"
    unpack_layer(source, dest)
    modes = {n: stat.S_IMODE(os.lstat(dest / n).st_mode) for n in ("mail", "tmp", "su", "wall")}
    assert modes == {"mail": 0o2775, "tmp": 0o1777, "su": 0o4755, "wall": 0o2755}
    assert os.lstat(dest / "su-link").st_ino == os.lstat(dest / "su").st_ino
