"""engine.runtime.containerfs, engine.runtime.resources and engine.runtime.top without a
daemon: a hostile tree and hostile archives against a root in a tmp directory (nothing may be
read or written outside it), Docker's limit checks and the spec they make, ps output parsing.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runtime import containerfs, resources, top
from engine.runtime.containerfs import CopyError, ExtractOptions, PathNotFound
from engine.runtime.resources import ResourceError, Resources


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    """(root, outside, root fd): ``outside`` is a sibling the root's links point at."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "tmp").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    (root / "escape").symlink_to("/")
    (root / "up").symlink_to("../../../../../../..")
    (root / "abs-out").symlink_to(outside)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield root, outside, fd
    finally:
        os.close(fd)


def _tar(*members: tuple[str, str, bytes | str]) -> io.BytesIO:
    """(kind, name, data or link target) → a tar stream."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[
                kind
            ]
            info.linkname = str(payload)
            tar.addfile(info)
    buf.seek(0)
    return buf


def _read_tar(root_fd: int, path: str) -> dict[str, tarfile.TarInfo]:
    buf = io.BytesIO()
    containerfs.write_tar(root_fd, path, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_reads_resolve_inside_the_root(layout: tuple[Path, Path, int]) -> None:
    root, outside, fd = layout
    with pytest.raises(PathNotFound):
        containerfs.stat_path(fd, f"/escape{outside}/secret")
    with pytest.raises(PathNotFound):
        containerfs.stat_path(fd, "/abs-out/secret")
    with pytest.raises(PathNotFound):
        containerfs.stat_path(fd, "/up/" + str(outside) + "/secret")
    assert containerfs.stat_path(fd, "/escape/etc/passwd").name == "passwd"
    assert containerfs.stat_path(fd, "/up/etc/passwd").size > 0
    # The last component is not followed: the link itself, with its target in the root.
    st = containerfs.stat_path(fd, "/abs-out")
    assert st.mode & (1 << 27) and st.link_target == str(outside)
    members = _read_tar(fd, "/abs-out")
    assert members["abs-out"].issym()
    # A tree's links are archived as links, never followed.
    members = _read_tar(fd, "/")
    assert members["./escape"].issym() and "./escape/etc" not in members
    assert not any("secret" in name for name in members)


@pytest.mark.parametrize(
    "members",
    [
        [("file", "../../secret-x", b"x")],
        [("file", "a/../../secret-x", b"x")],
        [("hard", "h", "../../outside/secret")],
    ],
    ids=["dotdot", "nested-dotdot", "hardlink-out"],
)
def test_members_climbing_out_are_refused(
    layout: tuple[Path, Path, int], members: list[tuple[str, str, bytes | str]]
) -> None:
    root, outside, fd = layout
    with pytest.raises(CopyError):
        containerfs.extract_tar(fd, "/tmp", _tar(*members), ExtractOptions())
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (root.parent / "secret-x").exists()


def test_links_in_the_archive_and_the_tree_stay_inside(layout: tuple[Path, Path, int]) -> None:
    root, outside, fd = layout
    archive = _tar(
        ("sym", "l1", "/"),
        ("sym", "l2", "../../../../.."),
        ("sym", "l3", str(outside)),
        ("file", "l1/tmp/one", b"1"),
        ("file", "l2/tmp/two", b"2"),
        ("file", "l3/three", b"3"),
        ("file", "/absolute", b"4"),
        ("dir", "d", ""),
        ("file", "d/f", b"5"),
        ("hard", "d/h", "d/f"),
    )
    containerfs.extract_tar(fd, "/tmp", archive, ExtractOptions())
    assert (root / "tmp" / "one").read_bytes() == b"1"
    assert (root / "tmp" / "two").read_bytes() == b"2"
    assert (root / outside.relative_to("/") / "three").read_bytes() == b"3"
    assert (root / "tmp" / "absolute").read_bytes() == b"4"
    assert os.path.samefile(root / "tmp" / "d" / "h", root / "tmp" / "d" / "f")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    # Through the tree's own links too.
    containerfs.extract_tar(fd, "/escape/tmp", _tar(("file", "via-escape", b"e")), ExtractOptions())
    containerfs.extract_tar(fd, "/abs-out", _tar(("file", "via-abs", b"a")), ExtractOptions())
    assert (root / "tmp" / "via-escape").read_bytes() == b"e"
    assert (root / outside.relative_to("/") / "via-abs").read_bytes() == b"a"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_file_member_replaces_a_symlink_not_its_target(layout: tuple[Path, Path, int]) -> None:
    root, outside, fd = layout
    (root / "tmp" / "victim").symlink_to(outside / "secret")
    containerfs.extract_tar(fd, "/tmp", _tar(("file", "victim", b"new")), ExtractOptions())
    assert (outside / "secret").read_text() == "host secret\n"
    assert not (root / "tmp" / "victim").is_symlink()
    assert (root / "tmp" / "victim").read_bytes() == b"new"


def test_extract_errors(layout: tuple[Path, Path, int]) -> None:
    root, _outside, fd = layout
    with pytest.raises(CopyError, match="not a directory"):
        containerfs.extract_tar(fd, "/etc/passwd", _tar(("file", "x", b"x")), ExtractOptions())
    with pytest.raises(PathNotFound):
        containerfs.extract_tar(fd, "/nope", _tar(("file", "x", b"x")), ExtractOptions())
    with pytest.raises(CopyError, match="too long"):
        containerfs.stat_path(fd, "9" * 5000)
    with pytest.raises(CopyError, match="too long"):
        containerfs.extract_tar(fd, "9" * 5000, _tar(("file", "x", b"x")), ExtractOptions())
    with pytest.raises(CopyError, match="invalid tar"):
        containerfs.extract_tar(fd, "/tmp", io.BytesIO(b"junk" * 300), ExtractOptions())
    (root / "tmp" / "dir").mkdir()
    with pytest.raises(CopyError, match="cannot overwrite"):
        containerfs.extract_tar(
            fd, "/tmp", _tar(("file", "dir", b"x")), ExtractOptions(no_overwrite_dir_non_dir=True)
        )


def test_resource_checks_and_spec() -> None:
    for bad in (
        Resources(memory=1024),
        Resources(memory=64 << 20, memory_swap=32 << 20),
        Resources(memory_swap=64 << 20),
        Resources(nano_cpus=10**9, cpu_quota=50_000),
        Resources(nano_cpus=-1),
        Resources(cpu_period=10),
        Resources(cpu_quota=10),
        Resources(cpuset_cpus="0-99999"),
        Resources(cpuset_cpus="x"),
        Resources(memory_reservation=1024),
    ):
        with pytest.raises(ResourceError):
            resources.check(bad)
    r = resources.normalize(Resources(memory=64 << 20, nano_cpus=5 * 10**8, pids_limit=-1))
    spec = resources.linux_resources(r)
    assert spec["memory"]["limit"] == 64 << 20
    assert spec["cpu"] == {"period": 100_000, "quota": 50_000}
    assert "pids" not in spec
    merged = resources.merge_update(r, Resources(cpu_quota=20_000, pids_limit=-1))
    assert merged.nano_cpus == 0 and merged.cpu_quota == 20_000
    assert resources.linux_resources(merged)["pids"] == {"limit": -1}
    with pytest.raises(ResourceError, match="memoryswap"):
        resources.merge_update(r, Resources(memory=1 << 30))


def test_ps_args_and_output() -> None:
    assert top.parse_ps_args("") == ["-ef"]
    assert top.parse_ps_args("aux") == ["aux"]
    with pytest.raises(top.TopError, match="not allowed"):
        top.parse_ps_args("-o user=PID")
    with pytest.raises(top.TopError):
        top.parse_ps_args("-ef\n")
    out = "UID PID PPID CMD\nroot 10 1 sleep 300\nroot 11 1 other thing\n"
    result = top.parse_ps_output(out, {10})
    assert result.titles == ["UID", "PID", "PPID", "CMD"]
    assert result.processes == [["root", "10", "1", "sleep 300"]]
    with pytest.raises(top.TopError, match="PID field"):
        top.parse_ps_output("UID CMD\nroot x\n", {1})


def _snapshot(path: Path) -> list[tuple[str, int, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out.append((str(p), st.st_mode, data))
    return sorted(out)


def test_random_archives_stay_inside(tmp_path: Path) -> None:
    """Archives of links, ``..`` and absolute names in any order: whatever they do inside the
    root, nothing outside it changes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    names = st.lists(
        st.sampled_from(["a", "b", "..", ".", "tmp", "l", "m", str(outside).lstrip("/")]),
        min_size=1,
        max_size=4,
    ).map("/".join)
    targets = st.sampled_from(
        ["/", "..", "../..", "../../../../..", str(outside), f"{outside}/secret", "a", "/tmp"]
    )
    member = st.one_of(
        st.tuples(st.just("file"), names, st.just(b"data")),
        st.tuples(st.just("dir"), names, st.just("")),
        st.tuples(st.just("sym"), names, targets),
        st.tuples(st.just("hard"), names, names),
    )
    before = _snapshot(outside)
    parent_before = sorted(p.name for p in tmp_path.iterdir())

    @settings(
        max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(members=st.lists(member, min_size=1, max_size=8), absolute=st.booleans())
    def check(members: list[tuple[str, str, bytes | str]], absolute: bool) -> None:
        root = Path(tempfile.mkdtemp(dir=tmp_path, prefix="root"))
        (root / "tmp").mkdir()
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            named = [(k, ("/" if absolute else "") + n, p) for k, n, p in members]
            with contextlib.suppress(CopyError, OSError):
                containerfs.extract_tar(fd, "/tmp", _tar(*named), ExtractOptions())
            with contextlib.suppress(CopyError, OSError):
                containerfs.write_tar(fd, "/tmp", io.BytesIO())
        finally:
            os.close(fd)
            shutil.rmtree(root)
        assert _snapshot(outside) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == parent_before

    check()
