"""Copy-up and mount points beneath a rootfs (engine/volumes/copyup.py), on a tmp directory tree
standing for a container's rootfs; no daemon. Needs root (owners, device nodes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from engine.volumes.copyup import MountPathError, copy_up, prepare_destination
from tests.conftest import require_root

pytestmark = pytest.mark.privileged


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    require_root()
    root = tmp_path / "rootfs"
    (root / "srv" / "sub").mkdir(parents=True)
    (root / "srv").chmod(0o750)
    os.chown(root / "srv", 101, 102)
    (root / "srv" / "f").write_text("data")
    os.chown(root / "srv" / "f", 101, 102)
    (root / "srv" / "f").chmod(0o4755)
    os.utime(root / "srv" / "f", ns=(1_000_000_000, 2_000_000_000))
    (root / "srv" / "sub" / "g").write_text("g")
    os.symlink("/etc/shadow", root / "srv" / "abs")
    os.symlink("../../..", root / "srv" / "up")
    os.mkfifo(root / "srv" / "fifo", 0o640)
    os.symlink("/", root / "toroot")
    os.symlink("../../../srv", root / "escape")
    return root


def test_copy_keeps_owners_modes_times_and_symlinks(rootfs: Path, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    assert copy_up(rootfs, "/srv", volume) == 6
    f = volume / "f"
    st = f.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 101, 102)
    assert st.st_mtime_ns == 2_000_000_000 and f.read_text() == "data"
    assert os.readlink(volume / "abs") == "/etc/shadow"  # copied as a link, never followed
    assert os.readlink(volume / "up") == "../../.."
    assert stat.S_ISFIFO((volume / "fifo").lstat().st_mode)
    assert stat.S_IMODE((volume / "fifo").lstat().st_mode) == 0o640
    assert (volume / "sub" / "g").read_text() == "g"
    root = volume.stat()
    assert (stat.S_IMODE(root.st_mode), root.st_uid) == (0o750, 101)


def test_symlinked_paths_resolve_inside(rootfs: Path, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    # ../../../srv from the rootfs' top stays at the top: it is the rootfs' /srv.
    assert prepare_destination(rootfs, "/escape", True) == "/srv"
    for path in ("/toroot", "/toroot/..", "/srv/up"):
        with pytest.raises(MountPathError, match="resolves to the container's root"):
            prepare_destination(rootfs, path, True)
    assert copy_up(rootfs, "/", volume) == 0
    assert prepare_destination(rootfs, "/toroot/new/dir", True) == "/new/dir"
    assert (rootfs / "new" / "dir").is_dir() and not Path("/new").exists()
    assert prepare_destination(rootfs, "/srv/up/etc/motd", False) == "/etc/motd"
    assert (rootfs / "etc" / "motd").is_file()
    # A file bind onto a symlink follows it inside the rootfs (runc's securejoin): the host's
    # /etc/shadow is never the mount point.
    host_shadow = os.stat("/etc/shadow")
    assert prepare_destination(rootfs, "/srv/abs", False) == "/etc/shadow"
    assert (rootfs / "etc" / "shadow").is_file()
    after = os.stat("/etc/shadow")
    assert (after.st_ino, after.st_mtime_ns) == (host_shadow.st_ino, host_shadow.st_mtime_ns)
    os.symlink("../etc", rootfs / "srv" / "todir")
    for path in ("/srv/todir", "/srv/up"):
        with pytest.raises(MountPathError, match="not a file"):
            prepare_destination(rootfs, path, False)
