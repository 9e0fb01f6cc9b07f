"""The image store, layer unpacking, references and the offline image builder.

Everything here is real: real tar files, real mknod/xattrs, a real overlayfs mount (in a private
mount namespace) and real binaries run with chroot. The nginx build (``-m slow``) runs mmdebstrap
against the Debian mirror and takes about 30 s.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.reference import Reference, familiar, normalize
from engine.images import build as imagebuild
from engine.images.layers import LayerError, unpack_layer
from engine.images.oci import host_architecture
from engine.images.store import Image, ImageConflict, ImageLoadError, ImageNotFound, ImageStore
from tests.conftest import REPO, require, require_root

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


# --- building test archives by hand -----------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    link: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    device: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


def tar_bytes(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.linkname = e.kind, e.mode, e.link
            info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
            info.devmajor, info.devminor = e.device
            info.pax_headers = dict(e.pax)
            info.size = len(e.data) if e.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(e.data) if e.kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def write_tar(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    entries = [Entry(name, data=data) for name, data in sorted(files.items())]
    entries += [Entry(n, tarfile.SYMTYPE, link=t) for n, t in (symlinks or {}).items()]
    path.write_bytes(tar_bytes(entries))
    return path


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def image_config(diff_ids: list[str], cmd: list[str] | None = None) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-02T03:04:05Z",
        "config": {"Cmd": cmd or ["sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(config).encode()


def uncompressed(layer: bytes) -> bytes:
    return gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer


def oci_members(layers: list[bytes], ref: str | None, config: bytes | None = None) -> dict:
    """The files of an OCI-layout archive for one image made of ``layers`` (plain or gzip)."""
    config = config or image_config([sha256(uncompressed(layer)) for layer in layers])
    members = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    descriptors = []
    for layer in layers:
        members[f"blobs/sha256/{sha256(layer)[7:]}"] = layer
        gz = layer[:2] == b"\x1f\x8b"
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
        descriptors.append({"mediaType": media, "digest": sha256(layer), "size": len(layer)})
    members[f"blobs/sha256/{sha256(config)[7:]}"] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": descriptors,
        }
    ).encode()  # no top-level mediaType, as umoci writes it
    members[f"blobs/sha256/{sha256(manifest)[7:]}"] = manifest
    descriptor: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": sha256(manifest),
        "size": len(manifest),
    }
    if ref:
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": ref}
    members["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [descriptor]}).encode()
    return members


def docker_members(images: list[tuple[bytes, list[bytes], list[str]]]) -> tuple[dict, dict]:
    """``docker save`` files (and symlinks) for (config, uncompressed layers, tags) images."""
    files: dict[str, bytes] = {}
    symlinks: dict[str, str] = {}
    manifest = []
    for config, layers, tags in images:
        config_name = f"{sha256(config)[7:]}.json"
        files[config_name] = config
        layer_names = []
        for layer in layers:
            hex_digest = sha256(layer)[7:]
            files[f"{hex_digest}.tar"] = layer
            # skopeo also writes the legacy <id>/layer.tar as a symlink to the real file
            symlinks[f"{hex_digest}/layer.tar"] = f"../{hex_digest}.tar"
            layer_names.append(f"{hex_digest}/layer.tar")
        manifest.append({"Config": config_name, "RepoTags": tags, "Layers": layer_names})
    files["manifest.json"] = json.dumps(manifest).encode()
    return files, symlinks


def assert_store_empty(store: ImageStore) -> None:
    assert store.list() == []
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "layers").iterdir()) == []
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp")] == []


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("busybox") is not None, "busybox-static is not installed")
    out = tmp_path_factory.mktemp("busybox") / "busybox-oci.tar"
    imagebuild.build_busybox_image(out, epoch=imagebuild.DEFAULT_SOURCE_DATE_EPOCH)
    return out


@pytest.fixture(scope="module")
def busybox_layer(built_busybox_archive: Path) -> bytes:
    """The gzip layer blob inside the busybox archive."""
    members = read_tar(built_busybox_archive)
    index = json.loads(members["index.json"])
    manifest = json.loads(members[f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"])
    return members[f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}"]


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    require_root()
    return ImageStore(tmp_path / "image")


# --- references -------------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.25-alpine", "docker.io/library/nginx:1.25-alpine"),
        ("library/nginx", "docker.io/library/nginx:latest"),
        ("docker.io/nginx", "docker.io/library/nginx:latest"),
        ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        ("foo/bar:1", "docker.io/foo/bar:1"),
        ("foo/bar/baz", "docker.io/foo/bar/baz:latest"),
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("127.0.0.1:5000/team/app:v1.2", "127.0.0.1:5000/team/app:v1.2"),
        ("[::1]:5000/x:t", "[::1]:5000/x:t"),
        ("registry.example.com/a__b/c-d.e:T_1", "registry.example.com/a__b/c-d.e:T_1"),
        (f"nginx@{DIGEST}", f"docker.io/library/nginx@{DIGEST}"),
        (f"nginx:1@{DIGEST}", f"docker.io/library/nginx:1@{DIGEST}"),
        ("foo:5000", "docker.io/library/foo:5000"),
    ],
)
def test_normalize(ref: str, expected: str) -> None:
    assert normalize(ref) == expected
    assert normalize(expected) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "Nginx",
        "docker.io/library/NGINX",
        "nginx:",
        ":latest",
        "nginx:bad tag",
        "nginx:-dash",
        "-nginx",
        "nginx/",
        "a//b",
        "nginx@sha256:abc",
        "nginx@sha256:" + "ab" * 33,
        "ab" * 32,
        "x/" + "a" * 260,
    ],
)
def test_normalize_rejects(ref: str) -> None:
    with pytest.raises(ValueError, match="^invalid reference format"):
        normalize(ref)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("docker.io/library/nginx:latest", "nginx:latest"),
        ("nginx", "nginx"),
        ("docker.io/foo/bar:1", "foo/bar:1"),
        ("docker.io/library/a/b", "library/a/b"),
        ("localhost:5000/x:latest", "localhost:5000/x:latest"),
        (f"docker.io/library/nginx@{DIGEST}", f"nginx@{DIGEST}"),
    ],
)
def test_familiar(ref: str, expected: str) -> None:
    assert familiar(ref) == expected


def test_reference_parse_fields() -> None:
    ref = Reference.parse(f"localhost:5000/team/app:v1@{DIGEST}")
    assert ref == Reference("localhost:5000", "team/app", "v1", DIGEST)
    assert ref.name == "localhost:5000/team/app"
    assert Reference.parse("nginx") == Reference("docker.io", "library/nginx", None, None)
    assert str(Reference.parse("nginx").with_default_tag()) == "docker.io/library/nginx:latest"


# --- layers -----------------------------------------------------------------------------------


@pytest.mark.privileged
def test_unpack_layer_keeps_metadata(tmp_path: Path) -> None:
    require_root()
    entries = [
        Entry("./", tarfile.DIRTYPE, mode=0o755),
        Entry("usr/", tarfile.DIRTYPE, mode=0o755, mtime=1_500_000_000),
        Entry("usr/bin/", tarfile.DIRTYPE, mode=0o750, uid=7, gid=8),
        Entry("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678),
        Entry("usr/bin/tool-again", tarfile.LNKTYPE, link="usr/bin/tool"),
        Entry("usr/bin/t", tarfile.SYMTYPE, link="tool", mode=0o777),
        Entry("usr/bin/abs", tarfile.SYMTYPE, link="/etc/passwd", mode=0o777),
        Entry("null", tarfile.CHRTYPE, mode=0o666, device=(1, 3)),
        Entry("loop0", tarfile.BLKTYPE, mode=0o660, device=(7, 0)),
        Entry("fifo", tarfile.FIFOTYPE, mode=0o620),
        Entry("attrs", data=b"x", pax={"SCHILY.xattr.user.pyetest": "hello"}),
        Entry("overlay", data=b"y", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
    ]
    plain = tar_bytes(entries)
    for compress in (False, True):
        source = tmp_path / f"layer-{compress}"
        source.write_bytes(gzip.compress(plain) if compress else plain)
        dest = tmp_path / f"out-{compress}"
        result = unpack_layer(source, dest)
        assert result.diff_id == sha256(plain)  # over the uncompressed stream, padding included
        assert result.size == len(b"#!/bin/sh\n") + 2

        tool = os.lstat(dest / "usr/bin/tool")
        assert stat.S_ISREG(tool.st_mode) and stat.S_IMODE(tool.st_mode) == 0o4755
        assert (tool.st_uid, tool.st_gid) == (1234, 5678)
        assert tool.st_nlink == 2 and os.lstat(dest / "usr/bin/tool-again").st_ino == tool.st_ino
        assert tool.st_mtime == 1_600_000_000
        bin_dir = os.lstat(dest / "usr/bin")
        assert stat.S_IMODE(bin_dir.st_mode) == 0o750 and bin_dir.st_uid == 7
        assert os.lstat(dest / "usr").st_mtime == 1_500_000_000  # set after its children
        assert os.readlink(dest / "usr/bin/t") == "tool"
        assert os.readlink(dest / "usr/bin/abs") == "/etc/passwd"  # kept verbatim, not followed
        null = os.lstat(dest / "null")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(os.lstat(dest / "loop0").st_mode)
        assert stat.S_ISFIFO(os.lstat(dest / "fifo").st_mode)
        assert os.getxattr(dest / "attrs", "user.pyetest") == b"hello"
        assert "trusted.overlay.opaque" not in os.listxattr(dest / "overlay")


@pytest.mark.privileged
def test_unpack_layer_resolves_symlinks_inside_the_root(tmp_path: Path) -> None:
    """A symlinked directory in the layer is followed as if the layer were "/", never outside."""
    require_root()
    outside = tmp_path / "outside"
    outside.mkdir()
    source = tmp_path / "layer.tar"
    source.write_bytes(
        tar_bytes(
            [
                Entry("evil", tarfile.SYMTYPE, link=str(outside)),
                Entry("evil/planted", data=b"gotcha"),
                Entry("up", tarfile.SYMTYPE, link="../../../.."),
                Entry("up/planted2", data=b"gotcha"),
                Entry("replaced", tarfile.SYMTYPE, link=str(outside / "victim")),
                Entry("replaced", data=b"the link is replaced, not followed"),
            ]
        )
    )
    dest = tmp_path / "root"
    unpack_layer(source, dest)
    assert list(outside.iterdir()) == []
    assert (dest / str(outside).lstrip("/") / "planted").read_bytes() == b"gotcha"
    assert (dest / "planted2").read_bytes() == b"gotcha"  # ".." stops at the layer root
    assert not (tmp_path / "planted2").exists()
    assert not os.path.islink(dest / "replaced")


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/abs-escape"])
def test_unpack_layer_refuses_escaping_names(tmp_path: Path, name: str) -> None:
    source = tmp_path / "layer.tar"
    source.write_bytes(tar_bytes([Entry("ok", data=b"1"), Entry(name, data=b"2")]))
    (tmp_path / "sub").mkdir()
    with pytest.raises(LayerError, match="escapes the layer root|absolute path"):
        unpack_layer(source, tmp_path / "sub" / "root")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "sub" / "escape").exists()


# --- the busybox image, OCI and docker-archive ------------------------------------------------


def test_busybox_archive_is_reproducible_and_built_by_the_cli(
    built_busybox_archive: Path, tmp_path: Path
) -> None:
    require(shutil.which("busybox") is not None, "busybox-static is not installed")
    out = tmp_path / "again.tar"
    cli = subprocess.run(
        [sys.executable, "-m", "engine.images.build", "busybox", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "SOURCE_DATE_EPOCH": str(imagebuild.DEFAULT_SOURCE_DATE_EPOCH)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert "docker.io/library/busybox:latest" in cli.stdout
    assert out.read_bytes() == built_busybox_archive.read_bytes()
    members = read_tar(out)
    index = json.loads(members["index.json"])
    annotations = index["manifests"][0]["annotations"]
    assert annotations["org.opencontainers.image.ref.name"] == "docker.io/library/busybox:latest"
    for name, data in members.items():
        if name.startswith("blobs/sha256/"):
            assert sha256(data) == "sha256:" + name.rsplit("/", 1)[1]


def check_busybox_image(store: ImageStore, image: Image) -> None:
    assert image.config["config"]["Cmd"] == ["sh"]
    assert image.config["os"] == "linux"
    assert len(image.diff_ids) == 1
    assert image.size > 500_000
    (layer,) = store.layer_dirs(image)
    assert layer == store.root / "layers" / image.diff_ids[0][7:]
    busybox = os.lstat(layer / "bin/busybox")
    assert stat.S_ISREG(busybox.st_mode) and stat.S_IMODE(busybox.st_mode) == 0o755
    assert os.readlink(layer / "bin/sh") == "busybox"
    assert os.readlink(layer / "bin/ls") == "busybox"
    assert "root:x:0:0:" in (layer / "etc/passwd").read_text()
    assert (layer / "etc/group").is_file()
    assert stat.S_IMODE(os.lstat(layer / "tmp").st_mode) == 0o1777
    # The unpacked layer is a working root filesystem.
    ran = subprocess.run(
        ["chroot", str(layer), "/bin/sh", "-c", "echo hello from $(basename $0) in $(pwd)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello from sh in /\n"


@pytest.mark.privileged
def test_load_oci_archive_and_lookups(store: ImageStore, built_busybox_archive: Path) -> None:
    assert store.load(built_busybox_archive) == ["busybox:latest"]
    image = store.get("busybox")
    assert image.repo_tags == ["docker.io/library/busybox:latest"]
    assert image.created == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH's default
    check_busybox_image(store, image)
    hex_id = image.id.removeprefix("sha256:")
    for name in [
        "busybox:latest",
        "docker.io/library/busybox:latest",
        image.id,
        hex_id,
        hex_id[:12],
        "sha256:" + hex_id[:12],
        f"busybox@{image.manifest_digest}",
    ]:
        assert store.get(name).id == image.id, name
    assert [i.id for i in store.list()] == [image.id]
    # The store is an OCI layout of its own, with blobs named by their digest.
    blobs = store.root / "blobs" / "sha256"
    assert sha256((blobs / hex_id).read_bytes()) == image.id
    index = json.loads((store.root / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    assert json.loads((store.root / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    state = json.loads((store.root / "repositories.json").read_text())
    assert state["refs"] == {"docker.io/library/busybox:latest": image.id}
    # Loading again changes nothing.
    assert store.load(built_busybox_archive) == ["busybox:latest"]
    assert len(list((store.root / "layers").iterdir())) == 1


@pytest.mark.privileged
def test_get_unknown_image(store: ImageStore, built_busybox_archive: Path) -> None:
    store.load(built_busybox_archive)
    with pytest.raises(ImageNotFound, match="^No such image: nginx:latest$"):
        store.get("nginx")
    with pytest.raises(ImageNotFound, match="^No such image: localhost:5000/x:1$"):
        store.get("localhost:5000/x:1")
    with pytest.raises(ImageNotFound):
        store.get("0" * 64)
    with pytest.raises(ImageNotFound):
        store.get("0" * 12)
    with pytest.raises(ImageNotFound):
        store.get("Not/A/Valid/Ref")


@pytest.mark.privileged
def test_load_docker_archive(
    store: ImageStore, built_busybox_archive: Path, busybox_layer: bytes, tmp_path: Path
) -> None:
    oci = read_tar(built_busybox_archive)
    index = json.loads(oci["index.json"])
    manifest = json.loads(oci[f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"])
    config = oci[f"blobs/sha256/{manifest['config']['digest'][7:]}"]
    files, symlinks = docker_members(
        [(config, [gzip.decompress(busybox_layer)], ["pyetest/busybox:docker"])]
    )
    archive = write_tar(tmp_path / "docker.tar", files, symlinks)

    assert store.load(archive) == ["pyetest/busybox:docker"]
    image = store.get("pyetest/busybox:docker")
    assert image.id == sha256(config)  # the same config: the same image ID as the OCI copy
    check_busybox_image(store, image)

    assert store.load(built_busybox_archive) == ["busybox:latest"]
    assert store.get("busybox").repo_tags == [
        "docker.io/library/busybox:latest",
        "docker.io/pyetest/busybox:docker",
    ]
    assert len(store.list()) == 1
    assert len(list((store.root / "layers").iterdir())) == 1  # unpacked once, shared


@pytest.mark.privileged
def test_load_from_streams_gzip_and_untagged(
    store: ImageStore, busybox_layer: bytes, tmp_path: Path
) -> None:
    members = oci_members([busybox_layer], ref=None)
    archive = write_tar(tmp_path / "untagged.tar", members)
    compressed = tmp_path / "untagged.tar.gz"
    compressed.write_bytes(gzip.compress(archive.read_bytes()))
    with open(compressed, "rb") as stream:
        loaded = store.load(stream)
    config = next(d for n, d in members.items() if d.startswith(b'{"architecture"'))
    assert loaded == [sha256(config)]  # untagged: its ID
    image = store.get(loaded[0])
    assert image.repo_tags == []
    store.tag(image.id[7:19], "pyetest/tagged")
    assert store.get("pyetest/tagged:latest").id == image.id


@pytest.mark.privileged
def test_load_picks_this_platform_from_an_image_index(
    store: ImageStore, busybox_layer: bytes, tmp_path: Path
) -> None:
    members = oci_members([busybox_layer], ref=None)
    single = json.loads(members["index.json"])["manifests"][0]
    other = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 10}
    image_index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**other, "platform": {"os": "linux", "architecture": "pyetest-arch"}},
                {**single, "platform": {"os": "linux", "architecture": host_architecture()}},
            ],
        }
    ).encode()
    members[f"blobs/sha256/{sha256(image_index)[7:]}"] = image_index
    top = {
        "mediaType": OCI_INDEX,
        "digest": sha256(image_index),
        "size": len(image_index),
        "annotations": {
            "io.containerd.image.name": "docker.io/pyetest/multi:1",
            "org.opencontainers.image.ref.name": "1",
        },
    }
    members["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()
    assert store.load(write_tar(tmp_path / "multi.tar", members)) == ["pyetest/multi:1"]
    assert store.get("pyetest/multi:1").manifest_digest == single["digest"]


# --- tag and remove ---------------------------------------------------------------------------


@pytest.mark.privileged
def test_tag_and_remove(store: ImageStore, built_busybox_archive: Path) -> None:
    store.load(built_busybox_archive)
    image = store.get("busybox")
    store.tag("busybox", "localhost:5000/pyetest/bb:v1")
    assert store.get("localhost:5000/pyetest/bb:v1").id == image.id
    assert store.list()[0].repo_tags == [
        "docker.io/library/busybox:latest",
        "localhost:5000/pyetest/bb:v1",
    ]
    with pytest.raises(ValueError, match="digest"):
        store.tag("busybox", f"x@{DIGEST}")
    with pytest.raises(ValueError, match="invalid reference format"):
        store.tag("busybox", "Bad:Name:x")
    with pytest.raises(ImageNotFound):
        store.tag("nope", "x")

    with pytest.raises(ImageConflict, match="must be forced"):
        store.remove(image.id)
    assert store.remove("localhost:5000/pyetest/bb:v1") == [
        "Untagged: localhost:5000/pyetest/bb:v1"
    ]
    assert store.get("busybox").repo_tags == ["docker.io/library/busybox:latest"]
    assert store.remove(image.id[7:19]) == ["Untagged: busybox:latest", f"Deleted: {image.id}"]
    with pytest.raises(ImageNotFound, match="^No such image: busybox:latest$"):
        store.get("busybox")
    assert_store_empty(store)

    store.load(built_busybox_archive)
    store.tag("busybox", "pyetest/second")
    assert store.remove(image.id, force=True) == [
        "Untagged: busybox:latest",
        "Untagged: pyetest/second:latest",
        f"Deleted: {image.id}",
    ]
    assert_store_empty(store)


# --- whiteouts --------------------------------------------------------------------------------

LOWER = [
    Entry("etc/", tarfile.DIRTYPE, mode=0o755),
    Entry("etc/keep", data=b"kept"),
    Entry("etc/gone", data=b"to be deleted"),
    Entry("opq/", tarfile.DIRTYPE, mode=0o755),
    Entry("opq/old-a", data=b"a"),
    Entry("opq/old-b", data=b"b"),
]
UPPER = [
    Entry("etc/", tarfile.DIRTYPE, mode=0o755),
    Entry("etc/.wh.gone", uid=3, gid=4),
    Entry("opq/", tarfile.DIRTYPE, mode=0o755),
    Entry("opq/.wh..wh..opq"),
    Entry("opq/new", data=b"new"),
]


@pytest.mark.privileged
def test_whiteouts_become_overlay_whiteouts(
    store: ImageStore, busybox_layer: bytes, tmp_path: Path
) -> None:
    lower, upper = tar_bytes(LOWER), gzip.compress(tar_bytes(UPPER))
    # Two images: the 2-layer one shares busybox's layer, to check removal keeps shared layers.
    assert store.load(write_tar(tmp_path / "b.tar", oci_members([busybox_layer], "pyetest/bb")))
    members = oci_members([busybox_layer, lower, upper], "pyetest/whiteouts")
    assert store.load(write_tar(tmp_path / "w.tar", members)) == ["pyetest/whiteouts:latest"]
    image = store.get("pyetest/whiteouts")
    dirs = store.layer_dirs(image)
    assert [d.name for d in dirs] == [d[7:] for d in image.diff_ids]  # lowest first
    base, l1, l2 = dirs

    gone = os.lstat(l2 / "etc/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert (gone.st_uid, gone.st_gid) == (3, 4)
    assert os.getxattr(l2 / "opq", "trusted.overlay.opaque") == b"y"
    assert not (l2 / "etc/.wh.gone").exists() and not (l2 / "opq/.wh..wh..opq").exists()
    assert (l1 / "etc/gone").read_bytes() == b"to be deleted"

    # What overlayfs makes of it, in a private mount namespace so nothing outlives the test.
    require(shutil.which("unshare") is not None, "unshare (util-linux) is missing")
    mnt = tmp_path / "merged"
    mnt.mkdir()
    lowerdir = ":".join(str(d) for d in reversed(dirs))  # overlayfs lists the top layer first
    script = f'mount -t overlay pyetest -o lowerdir={lowerdir} "$1" && ls -A "$1/etc" "$1/opq"'
    listed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    # etc/ merges busybox's files with "keep", minus "gone"; opq/ hides old-a and old-b.
    etc, opq = listed.stdout.split("\n\n")
    assert etc.splitlines() == [f"{mnt}/etc:", "group", "keep", "passwd"]
    assert opq.splitlines() == [f"{mnt}/opq:", "new"]

    assert store.remove("pyetest/whiteouts") == [
        "Untagged: pyetest/whiteouts:latest",
        f"Deleted: {image.id}",
    ]
    assert not l1.exists() and not l2.exists()
    assert base.exists()
    check_busybox_image(store, store.get("pyetest/bb"))


# --- failed loads leave nothing ---------------------------------------------------------------


@pytest.mark.privileged
def test_layer_digest_mismatch_leaves_nothing(
    store: ImageStore, busybox_layer: bytes, tmp_path: Path
) -> None:
    members = oci_members([busybox_layer], "pyetest/corrupt")
    name = f"blobs/sha256/{sha256(busybox_layer)[7:]}"
    tampered = bytearray(members[name])
    tampered[len(tampered) // 2] ^= 0xFF
    members[name] = bytes(tampered)
    with pytest.raises(ImageLoadError, match="digest mismatch"):
        store.load(write_tar(tmp_path / "corrupt.tar", members))
    assert_store_empty(store)


@pytest.mark.privileged
def test_diff_id_mismatch_rolls_back_the_whole_archive(
    store: ImageStore, busybox_layer: bytes, tmp_path: Path
) -> None:
    """The first image's layer is unpacked before the second fails: it must go too."""
    good_layer = gzip.decompress(busybox_layer)
    good_config = image_config([sha256(good_layer)])
    other_layer = tar_bytes(LOWER)
    lying_config = image_config([sha256(b"something else")])
    files, symlinks = docker_members(
        [
            (good_config, [good_layer], ["pyetest/good"]),
            (lying_config, [other_layer], ["pyetest/bad"]),
        ]
    )
    with pytest.raises(ImageLoadError, match="diff_id"):
        store.load(write_tar(tmp_path / "two.tar", files, symlinks))
    assert_store_empty(store)


@pytest.mark.privileged
def test_config_digest_mismatch(store: ImageStore, busybox_layer: bytes, tmp_path: Path) -> None:
    members = oci_members([busybox_layer], "pyetest/x")
    config_name = next(n for n, d in members.items() if d.startswith(b'{"architecture"'))
    members[config_name] = members[config_name].replace(b'"sh"', b'"ls"')
    with pytest.raises(ImageLoadError, match="config .*digest mismatch"):
        store.load(write_tar(tmp_path / "x.tar", members))
    assert_store_empty(store)


@pytest.mark.privileged
def test_path_traversal_in_a_layer(store: ImageStore, tmp_path: Path) -> None:
    evil = tar_bytes([Entry("etc/", tarfile.DIRTYPE), Entry("../../pyetest-escaped", data=b"x")])
    members = oci_members([evil], "pyetest/evil")
    with pytest.raises(ImageLoadError, match="escapes the layer root"):
        store.load(write_tar(tmp_path / "evil.tar", members))
    assert_store_empty(store)
    assert not (store.root / "pyetest-escaped").exists()
    assert not (tmp_path / "pyetest-escaped").exists()


@pytest.mark.privileged
def test_path_traversal_in_the_archive(
    store: ImageStore, busybox_layer: bytes, tmp_path: Path
) -> None:
    members = oci_members([busybox_layer], "pyetest/x")
    members["../pyetest-escaped"] = b"x"
    with pytest.raises(ImageLoadError, match="escapes the archive"):
        store.load(write_tar(tmp_path / "x.tar", members))
    assert_store_empty(store)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"hello": b"x"}, "neither index.json"),
        ({"manifest.json": b"{not json"}, "not valid JSON"),
        ({"manifest.json": b"[]"}, "holds no image"),
    ],
)
@pytest.mark.privileged
def test_not_an_image_archive(
    store: ImageStore, tmp_path: Path, files: dict[str, bytes], message: str
) -> None:
    with pytest.raises(ImageLoadError, match=message):
        store.load(write_tar(tmp_path / "x.tar", files))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ImageLoadError):
        store.load(garbage)
    assert_store_empty(store)


# --- nginx ------------------------------------------------------------------------------------


def test_missing_build_tool_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(imagebuild.ImageBuildError, match="mmdebstrap is not installed"):
        imagebuild.build_nginx_image(tmp_path / "nginx.tar")
    with pytest.raises(imagebuild.ImageBuildError, match="busybox is not installed"):
        imagebuild.build_busybox_image(tmp_path / "bb.tar")
    with pytest.raises(imagebuild.ImageBuildError, match="not a static binary"):
        imagebuild.build_busybox_image(tmp_path / "bb.tar", busybox=Path(sys.executable))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.privileged
def test_build_nginx_image(store: ImageStore, tmp_path: Path) -> None:
    require(shutil.which("mmdebstrap") is not None, "mmdebstrap is not installed")
    out = tmp_path / "nginx-oci.tar"
    imagebuild.build_nginx_image(out)
    assert store.load(out) == ["nginx:latest"]
    image = store.get("nginx")
    assert image.config["config"] == {
        "Cmd": ["nginx", "-g", "daemon off;"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "ExposedPorts": {"80/tcp": {}},
        "StopSignal": "SIGQUIT",
        "WorkingDir": "/",
    }
    assert image.config["rootfs"]["diff_ids"] == image.diff_ids and len(image.diff_ids) == 1
    assert image.config["history"][0]["created_by"].startswith("mmdebstrap")
    (layer,) = store.layer_dirs(image)
    assert (layer / "usr/sbin/nginx").is_file()
    assert os.readlink(layer / "var/log/nginx/access.log") == "/dev/stdout"
    assert os.readlink(layer / "var/log/nginx/error.log") == "/dev/stderr"
    assert os.readlink(layer / "bin") == "usr/bin"  # merged /usr
    assert not (layer / "dev").exists() or not any((layer / "dev").iterdir())
    assert not (layer / "usr/share/man").exists() or not any((layer / "usr/share/man").iterdir())
    version = subprocess.run(
        ["chroot", str(layer), "/usr/sbin/nginx", "-v"], capture_output=True, text=True, timeout=30
    )
    assert version.returncode == 0 and "nginx version: nginx/" in version.stderr
