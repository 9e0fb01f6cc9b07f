"""Mount requests as moby's linux parser reads them (volume/mounts/linux_parser_test.go), and
whatever a body holds is a MountRequests or a 400, never another exception. No daemon."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidParameter
from engine.volumes.parse import (
    BIND,
    TMPFS,
    VOLUME,
    MountSpecError,
    image_volume_paths,
    parse_bind,
    parse_mount,
    parse_mount_requests,
)


@pytest.mark.parametrize(
    ("raw", "kind", "source", "target", "read_only"),
    [
        ("/tmp:/tmp1", BIND, "/tmp", "/tmp1", False),
        ("/tmp:/tmp2:ro", BIND, "/tmp", "/tmp2", True),
        ("/tmp:/tmp3:rw,rshared", BIND, "/tmp", "/tmp3", False),
        ("name:/tmp", VOLUME, "name", "/tmp", False),
        ("name:/tmp:ro,nocopy", VOLUME, "name", "/tmp", True),
        ("/tmp", VOLUME, "", "/tmp", False),
        ("rel/path:/x", VOLUME, "rel/path", "/x", False),  # a (bad) volume name: store's 400
        ("/a//b/:/c/../d/", BIND, "/a/b", "/d", False),
    ],
)
def test_binds(raw: str, kind: str, source: str, target: str, read_only: bool) -> None:
    r = parse_bind(raw)
    assert (r.type, r.source, r.target, r.read_only) == (kind, source, target, read_only)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "invalid volume specification: ''"),
        (":/x", "invalid volume specification"),
        ("/tmp:ro", "invalid volume specification"),
        ("/tmp:/x:ro:rw", "invalid volume specification"),
        ("/tmp:/x:ro,rw", "invalid mode: ro,rw"),
        ("/tmp:/x:bogus", "invalid mode: bogus"),
        ("/tmp:x", "mount path must be absolute"),
        ("/tmp:/", "destination can't be '/'"),
        ("/tmp:/x:nocopy", "VolumeOptions must not be specified"),
        ("name:/x:rshared", "BindOptions must not be specified"),
        ("/x:/y:z,Z", "invalid mode"),
    ],
)
def test_bad_binds(raw: str, message: str) -> None:
    with pytest.raises(MountSpecError, match=message.replace("(", r"\(")):
        parse_bind(raw)


def test_mounts() -> None:
    r = parse_mount(
        {"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"SizeBytes": 1024, "Mode": 0o1777}}, 0
    )
    assert r.type == TMPFS and r.tmpfs_options == ["size=1024", "mode=1777"]
    r = parse_mount(
        {"Type": "bind", "Source": "/s", "Target": "/t", "BindOptions": {"Propagation": "rslave"}},
        0,
    )
    assert r.propagation == "rslave" and not r.create_source
    for bad, message in [
        ({"Type": "bind", "Target": "/t"}, "field Source must not be empty"),
        ({"Type": "volume", "Target": "/t", "ReadOnly": True}, "anonymous volumes"),
        ({"Type": "tmpfs", "Source": "x", "Target": "/t"}, "Source must not be specified"),
        (
            {"Type": "volume", "Target": "/t", "BindOptions": {"Propagation": "shared"}},
            "BindOptions",
        ),
        ({"Type": "npipe", "Target": "/t"}, "mount type unknown"),
        ({"Type": "volume", "Target": "/t", "ReadOnly": "yes"}, "want bool"),
        ({"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"SizeBytes": True}}, "want int"),
    ]:
        with pytest.raises(MountSpecError, match=message):
            parse_mount(bad, 0)


def test_duplicates_and_image_volumes() -> None:
    with pytest.raises(MountSpecError, match="local only"):
        parse_mount_requests({}, {"VolumeDriver": "nfs"})
    with pytest.raises(MountSpecError, match="Duplicate mount point: /d"):
        parse_mount_requests({}, {"Binds": ["/a:/d"], "Tmpfs": {"/d/": ""}})
    assert list(image_volume_paths({"Volumes": {"/a/../b/": {}}})) == ["/b"]
    for bad in ({"Volumes": ["/x"]}, {"Volumes": {"rel": {}}}, {"Volumes": {"/": {}}}):
        with pytest.raises(MountSpecError):
            image_volume_paths(bad)


TEXT = st.text(st.sampled_from("/:.,=-_aZ09 \x00éro"), max_size=24)
VALUE: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), TEXT, st.lists(TEXT, max_size=2),
    st.dictionaries(TEXT, TEXT, max_size=2),
)  # fmt: skip
MOUNT_KEYS = ["Type", "Source", "Target", "ReadOnly", "BindOptions", "VolumeOptions"]
OPTION_KEYS = ["Propagation", "NoCopy", "Labels", "SizeBytes", "Mode", "DriverConfig"]
MOUNT = st.dictionaries(
    st.sampled_from([*MOUNT_KEYS, "TmpfsOptions"]),
    st.one_of(
        VALUE,
        st.sampled_from(["bind", "volume", "tmpfs", "/t"]),
        st.dictionaries(st.sampled_from(OPTION_KEYS), VALUE),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    binds=st.lists(TEXT, max_size=3),
    mounts=st.lists(MOUNT, max_size=3),
    tmpfs=st.dictionaries(TEXT, TEXT, max_size=2),
    volumes_from=st.lists(TEXT, max_size=2),
    volumes=st.dictionaries(TEXT, st.just({}), max_size=2),
)
def test_any_body_is_parsed_or_a_400(
    binds: list[str], mounts: list[Any], tmpfs: dict[str, str], volumes_from: list[str],
    volumes: dict[str, Any],
) -> None:  # fmt: skip
    host_config = {"Binds": binds, "Mounts": mounts, "Tmpfs": tmpfs, "VolumesFrom": volumes_from}
    try:
        parsed = parse_mount_requests({"Volumes": volumes}, host_config)
    except InvalidParameter:
        return
    for m in parsed.mounts:
        assert m.target.startswith("/") and m.target != "/" and "\x00" not in m.target
