"""Volumes, bind mounts and tmpfs through the real docker CLI (28, API 1.47) and docker-py.

One pyengined (bridge pyeo0, 10.189.0.0/24) serves the module, with busybox and nginx loaded.
Host paths the tests bind are in the test's own tmp directories; the volumes live under the
daemon's data root and go with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker as docker_py
import pytest

from client.http import Client, DaemonError
from tests.conftest import Daemon, assert_nothing_left, require, start_daemon, stop_daemon
from tests.dockercli import DOCKER
from tests.dockercli import DockerCli as BaseCli
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

API_VERSION = "1.47"
BRIDGE, BIP = "pyeo0", "10.189.0.1/24"
ANONYMOUS = "com.docker.volume.anonymous"


class DockerCli(BaseCli):
    def volumes(self) -> set[str]:
        return set(self("volume", "ls", "-q", check=True).stdout.split())


def _start(tmp: Path) -> Daemon:
    return start_daemon(tmp, BRIDGE, BIP, False)


@pytest.fixture(scope="module")
def docker(
    tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path, busybox_archive: Path
) -> Iterator[DockerCli]:
    require(DOCKER.exists(), f"needs the docker CLI at {DOCKER}")
    tmp = tmp_path_factory.mktemp(BRIDGE)
    cli = DockerCli(_start(tmp), tmp / "docker-config")
    try:
        for archive in (nginx_archive, busybox_archive):
            cli("load", "-i", str(archive), check=True)
        yield cli
    finally:
        for cid in cli("ps", "-a", "-q").stdout.split():
            cli("rm", "-f", cid)
        stop_daemon(cli.daemon)
    assert_nothing_left(cli.daemon)


@pytest.fixture
def names(docker: DockerCli) -> Iterator[Callable[[str], str]]:
    """Container and volume names for one test, removed afterwards."""
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(f"pyetest-vol-{suffix}")
        return used[-1]

    yield name
    for n in used:
        docker("rm", "-f", "-v", n)
    for n in used:
        docker("volume", "rm", "-f", n)


class _Api:
    """(status, JSON body) of one API call, errors included."""

    def __init__(self, host: str) -> None:
        self.client = Client(host)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        path, _, query = path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if p)
        try:
            resp = self.client.request(method, path, query=params or None, body=body)
        except DaemonError as e:
            return e.status, {"message": str(e)}
        raw = resp.read()
        return resp.status, json.loads(raw) if raw.strip() else None


def _api(docker: DockerCli) -> _Api:
    return _Api(docker.daemon.host)


def _error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    return result.stderr.strip()


# ---- the volume calls ---------------------------------------------------------------------------


def test_volume_create_ls_inspect_rm(docker: DockerCli, names: Callable[[str], str]) -> None:
    name = names("plain")
    assert docker("volume", "create", "--label", "pye=1", name, check=True).stdout.strip() == name
    # Idempotent, as Docker: the same name answers with the volume that exists.
    assert docker("volume", "create", name, check=True).stdout.strip() == name
    info = docker.json("volume", "inspect", name)[0]  # type: ignore[index]
    assert info["Name"] == name and info["Driver"] == "local" and info["Scope"] == "local"
    assert info["Labels"] == {"pye": "1"}
    assert info["Mountpoint"] == str(docker.daemon.data_root / "volumes" / name / "_data")
    assert info["CreatedAt"].endswith("Z")
    assert os.stat(info["Mountpoint"]).st_mode & 0o777 == 0o755
    record = docker.daemon.data_root / "volumes" / name / "volume.json"
    assert record.stat().st_mode & 0o777 == 0o600
    assert name in docker.volumes()
    assert docker("volume", "ls", "-q", "--filter", "label=pye=1", check=True).stdout.split() == [
        name
    ]
    assert name not in docker("volume", "ls", "-q", "--filter", "label=pye=2").stdout
    assert name in docker("volume", "ls", "-q", "--filter", "dangling=true").stdout
    assert name in docker("volume", "ls", "-q", "--filter", f"name={name[:-2]}").stdout
    docker("volume", "rm", name, check=True)
    assert name not in docker.volumes()
    assert "no such volume" in _error(docker("volume", "inspect", name))
    assert "no such volume" in _error(docker("volume", "rm", name))
    docker("volume", "rm", "-f", name, check=True)


def test_volume_create_refusals(docker: DockerCli) -> None:
    api = _api(docker)
    for bad in ("../x", "a/b", "x", "-x", "a b"):
        status, body = api.request("POST", "/volumes/create", {"Name": bad})
        assert status == 400, (bad, body)
        assert "invalid characters for a local volume name" in body["message"]
    status, body = api.request(
        "POST", "/volumes/create", {"Name": "pyetest-vol-d", "Driver": "nfs"}
    )
    assert status == 400 and "local only" in body["message"]
    opts = {"Name": "pyetest-vol-o", "DriverOpts": {"type": "ext4", "device": "/dev/null"}}
    status, body = api.request("POST", "/volumes/create", opts)
    assert status == 400 and "not supported" in body["message"]
    opts = {"Name": "pyetest-vol-o", "DriverOpts": {"bogus": "1"}}
    status, body = api.request("POST", "/volumes/create", opts)
    assert status == 400 and "invalid option key" in body["message"]
    assert not any(v.startswith("pyetest-vol-") for v in docker.volumes())


def test_named_volume_is_shared_and_kept(docker: DockerCli, names: Callable[[str], str]) -> None:
    vol = names("data")
    docker(
        "run", "--rm", "-v", f"{vol}:/data", "busybox", "sh", "-c", "echo hi > /data/f", check=True
    )
    assert vol in docker.volumes()  # made by the run, kept after --rm: it is named
    out = docker("run", "--rm", "-v", f"{vol}:/data:ro", "busybox", "cat", "/data/f", check=True)
    assert out.stdout == "hi\n"
    result = docker("run", "--rm", "-v", f"{vol}:/data:ro", "busybox", "touch", "/data/g")
    assert result.returncode != 0 and "Read-only file system" in result.stderr


def test_bind_mounts(docker: DockerCli, names: Callable[[str], str], tmp_path: Path) -> None:
    (tmp_path / "f").write_text("host\n")
    c = names("bind")
    docker(
        "create", "--name", c, "-v", f"{tmp_path}:/mnt:ro", "busybox", "cat", "/mnt/f", check=True
    )
    mounts = docker.json("inspect", "-f", "{{json .Mounts}}", c)
    assert mounts == [
        {
            "Type": "bind",
            "Source": str(tmp_path),
            "Destination": "/mnt",
            "Mode": "ro",
            "RW": False,
            "Propagation": "rprivate",
        }
    ]
    assert docker.json("inspect", "-f", "{{json .HostConfig.Binds}}", c) == [f"{tmp_path}:/mnt:ro"]
    assert docker("start", "-a", c, check=True).stdout == "host\n"
    result = docker("run", "--rm", "-v", f"{tmp_path}:/mnt:ro", "busybox", "touch", "/mnt/g")
    assert result.returncode != 0 and not (tmp_path / "g").exists()
    # -v makes a missing source a directory; --mount refuses it, as Docker.
    docker("run", "--rm", "-v", f"{tmp_path}/new:/mnt", "busybox", "touch", "/mnt/x", check=True)
    assert (tmp_path / "new" / "x").is_file()
    missing = _error(
        docker(
            "run", "--rm", "--mount", f"type=bind,src={tmp_path}/none,dst=/mnt", "busybox", "true"
        )
    )
    assert "bind source path does not exist" in missing
    assert not (tmp_path / "none").exists()
    # A single file bound over a file of the image.
    out = docker("run", "--rm", "-v", f"{tmp_path}/f:/etc/motd", "busybox", "cat", "/etc/motd")
    assert out.stdout == "host\n"


def test_tmpfs(docker: DockerCli) -> None:
    out = docker(
        "run", "--rm", "--mount", "type=tmpfs,dst=/t,tmpfs-size=65536,tmpfs-mode=1770",
        "--tmpfs", "/run:size=64k", "busybox", "sh", "-c",
        "grep -E ' /(t|run) ' /proc/mounts; stat -c %a /t",
        check=True,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    assert any(" /t tmpfs " in line and "size=64k" in line for line in lines), out.stdout
    assert any(" /run tmpfs " in line and "size=64k" in line for line in lines), out.stdout
    assert lines[-1] == "1770", out.stdout
    result = docker("run", "--rm", "--tmpfs", "/run:bogus=1", "busybox", "true")
    assert "invalid tmpfs option" in _error(result)


def test_copy_up_into_new_volume(docker: DockerCli, names: Callable[[str], str]) -> None:
    vol = names("html")
    docker("run", "--rm", "-v", f"{vol}:/usr/share/nginx/html", "nginx", "true", check=True)
    out = docker("run", "--rm", "-v", f"{vol}:/x", "busybox", "cat", "/x/index.html", check=True)
    assert "Welcome to nginx" in out.stdout
    # Symlinks are copied as symlinks, never followed (nginx's logs point at /dev/stdout).
    logs = names("logs")
    docker("run", "--rm", "-v", f"{logs}:/var/log/nginx", "nginx", "true", check=True)
    log = docker.daemon.data_root / "volumes" / logs / "_data" / "access.log"
    assert log.is_symlink() and os.readlink(log) == "/dev/stdout"
    # Not copied again into a volume that has content; not at all with nocopy.
    empty = names("nocopy")
    docker(
        "run", "--rm", "-v", f"{empty}:/usr/share/nginx/html:nocopy", "nginx", "true", check=True
    )
    data = docker.daemon.data_root / "volumes" / empty / "_data"
    assert list(data.iterdir()) == []


def test_anonymous_volumes_go_with_rm_v(docker: DockerCli, names: Callable[[str], str]) -> None:
    c = names("anon")
    docker("create", "--name", c, "-v", "/anon", "busybox", "true", check=True)
    mounts = docker.json("inspect", "-f", "{{json .Mounts}}", c)
    assert len(mounts) == 1 and mounts[0]["Type"] == "volume"  # type: ignore[index]
    vol = mounts[0]["Name"]  # type: ignore[index]
    assert len(vol) == 64 and mounts[0]["Destination"] == "/anon"  # type: ignore[index]
    assert mounts[0]["Source"] == str(docker.daemon.data_root / "volumes" / vol / "_data")  # type: ignore[index]
    assert (mounts[0]["Mode"], mounts[0]["RW"], mounts[0]["Driver"]) == ("", True, "local")  # type: ignore[index]
    assert docker.json("volume", "inspect", vol)[0]["Labels"] == {ANONYMOUS: ""}  # type: ignore[index]
    named = names("kept")
    c2 = names("anon2")
    docker("create", "--name", c2, "-v", f"{named}:/n", "-v", "/a2", "busybox", "true", check=True)
    listed = docker("ps", "-a", "--no-trunc", "-f", f"name={c2}", "--format", "{{.Mounts}}").stdout
    assert named in listed, listed  # GET /containers/json lists the mounts too
    cid2 = docker("inspect", "-f", "{{.Id}}", c2, check=True).stdout.strip()
    assert docker("ps", "-aq", "--no-trunc", "-f", f"volume={named}").stdout.split() == [cid2]
    vol2 = next(
        m["Name"]
        for m in docker.json("inspect", "-f", "{{json .Mounts}}", c2)
        if m["Destination"] == "/a2"
    )  # type: ignore[union-attr, index]
    assert "volume is in use" in _error(docker("volume", "rm", vol))
    docker("rm", "-v", c, c2, check=True)
    left = docker.volumes()
    assert vol not in left and vol2 not in left and named in left
    # docker run --rm takes its anonymous volumes along.
    docker("run", "--rm", "-v", "/gone", "busybox", "true", check=True)
    assert docker.volumes() == left


def test_volumes_from(docker: DockerCli, names: Callable[[str], str]) -> None:
    src, vol = names("from-src"), names("from-vol")
    docker(
        "run",
        "--name",
        src,
        "-v",
        f"{vol}:/data",
        "busybox",
        "sh",
        "-c",
        "echo x > /data/f",
        check=True,
    )
    out = docker("run", "--rm", "--volumes-from", src, "busybox", "cat", "/data/f", check=True)
    assert out.stdout == "x\n"
    result = docker("run", "--rm", "--volumes-from", f"{src}:ro", "busybox", "touch", "/data/g")
    assert result.returncode != 0
    assert "No such container" in _error(
        docker("run", "--rm", "--volumes-from", "pyetest-vol-nope", "busybox", "true")
    )


def test_in_use_is_409_and_prune(docker: DockerCli, names: Callable[[str], str]) -> None:
    api = _api(docker)
    c, vol, free = names("use"), names("used"), names("free")
    docker("create", "--name", c, "-v", f"{vol}:/d", "-v", "/anon", "busybox", "true", check=True)
    status, body = api.request("DELETE", f"/volumes/{vol}")
    assert status == 409 and "volume is in use" in body["message"], body
    cid = docker("inspect", "-f", "{{.Id}}", c, check=True).stdout.strip()
    assert cid in body["message"]
    status, body = api.request("DELETE", f"/volumes/{vol}?force=1")
    assert status == 409
    docker("volume", "create", free, check=True)
    anon = docker("volume", "create", "--label", f"{ANONYMOUS}=", check=True).stdout.strip()
    # From API 1.42 a prune takes only anonymous volumes no container uses.
    pruned = docker("volume", "prune", "-f", check=True).stdout
    assert anon in pruned and free not in pruned and vol not in pruned
    assert free in docker.volumes() and vol in docker.volumes()
    pruned = docker(
        "volume", "prune", "-f", "--all", "--filter", "label!=pye-keep", check=True
    ).stdout
    assert free in pruned and vol not in pruned
    status, body = api.request("POST", "/volumes/prune?filters=" + json.dumps({"all": ["maybe"]}))
    assert status == 400


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("../x:/data", "invalid characters for a local volume name"),
        ("a$b:/data", "invalid characters for a local volume name"),
        ("/tmp:data", "mount path must be absolute"),
        ("/tmp:/", "destination can't be '/'"),
        ("/tmp:/data:bogus", "invalid mode: bogus"),
        ("/data:rw", "invalid volume specification"),
    ],
)
def test_bad_specs_are_400(docker: DockerCli, spec: str, message: str) -> None:
    before = docker.volumes()
    status, body = _api(docker).request(
        "POST", "/containers/create", {"Image": "busybox", "HostConfig": {"Binds": [spec]}}
    )
    assert status == 400 and message in body["message"], body
    assert docker.volumes() == before


def test_duplicate_and_relative_mount_points(docker: DockerCli, tmp_path: Path) -> None:
    api = _api(docker)
    dup = {"Image": "busybox", "HostConfig": {"Binds": [f"{tmp_path}:/d", "v1x:/d"]}}
    status, body = api.request("POST", "/containers/create", dup)
    assert status == 400 and "Duplicate mount point: /d" in body["message"]
    rel = {"Image": "busybox", "HostConfig": {"Mounts": [{"Type": "volume", "Target": "d"}]}}
    status, body = api.request("POST", "/containers/create", rel)
    assert status == 400 and "must be absolute" in body["message"]
    odd = {"Image": "busybox", "HostConfig": {"Mounts": [{"Type": "nfs", "Target": "/d"}]}}
    status, body = api.request("POST", "/containers/create", odd)
    assert status == 400
    assert "v1x" not in docker.volumes()


def test_relative_source_is_a_volume_name(docker: DockerCli, names: Callable[[str], str]) -> None:
    vol = names("relname")
    docker("run", "--rm", "-v", f"{vol}:/d", "busybox", "true", check=True)
    assert vol in docker.volumes()


def _hostile_image(
    docker: DockerCli, busybox_archive: Path, tmp_path: Path, ref: str, volumes: list[str]
) -> str:
    """busybox plus symlinks that point at the rootfs itself and out of it."""
    members = read_tar(busybox_archive)
    index = json.loads(members["index.json"])
    manifest = json.loads(members[f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"])
    base = members[f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}"]
    evil = tar_bytes(
        [
            Entry("toroot", tarfile.SYMTYPE, link="/"),
            Entry("updir", tarfile.SYMTYPE, link="../../.."),
            Entry("deep/", tarfile.DIRTYPE, mode=0o755),
            Entry("deep/out", tarfile.SYMTYPE, link="../../../../../etc"),
        ]
    )
    layers = [base, evil]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["true"], "Env": ["PATH=/bin"], "Volumes": {v: {} for v in volumes}},
        "rootfs": {"type": "layers", "diff_ids": [sha256(uncompressed(x)) for x in layers]},
    }
    members = oci_members(layers, ref, json.dumps(config).encode())
    archive = write_tar(tmp_path / f"{ref.split('/')[-1]}.tar", members)
    docker("load", "-i", str(archive), check=True)
    return ref


def test_symlinked_volume_paths_stay_in_the_rootfs(
    docker: DockerCli, names: Callable[[str], str], busybox_archive: Path, tmp_path: Path
) -> None:
    before = docker.volumes()
    image = _hostile_image(docker, busybox_archive, tmp_path, "pyetest/volroot", ["/toroot"])
    plain = _hostile_image(docker, busybox_archive, tmp_path, "pyetest/volplain", [])
    # An image VOLUME, or a -v, whose path resolves to the rootfs itself: refused, nothing
    # copied, nothing mounted over the root.
    named = names("root")
    for args in ([image], ["-v", "/updir", plain], ["-v", f"{named}:/toroot", plain]):
        result = docker("run", "--rm", *args)
        assert "resolves to the container's root" in _error(result), args
    # /deep/out leads to the rootfs' /etc, never the host's: the copy-up takes busybox's.
    vol = names("etc")
    out = docker("run", "--rm", "-v", f"{vol}:/deep/out", plain, "ls", "/etc", check=True)
    assert out.stdout.split() == ["group", "passwd"]
    data = docker.daemon.data_root / "volumes" / vol / "_data"
    assert sorted(p.name for p in data.iterdir()) == ["group", "passwd"]
    c = names("mkdir")
    docker(
        "run", "--name", c, "-v", "/deep/out/pyevol", plain, "ls", "-d", "/etc/pyevol", check=True
    )
    assert not Path("/etc/pyevol").exists()
    docker("rm", "-v", c, check=True)
    assert docker.volumes() == before | {vol, named}  # --rm took the anonymous ones


def test_volume_data_survives_a_restart(docker: DockerCli, names: Callable[[str], str]) -> None:
    vol = names("keep")
    docker("run", "--rm", "-v", f"{vol}:/d", "busybox", "sh", "-c", "echo kept > /d/f", check=True)
    half = docker.daemon.data_root / "volumes" / "pyetest-vol-half"
    (half / "_data").mkdir(parents=True)  # as a create the daemon did not finish leaves it
    stop_daemon(docker.daemon)
    docker.daemon = _start(docker.daemon.data_root.parent)
    assert vol in docker.volumes() and "pyetest-vol-half" not in docker.volumes()
    assert not half.exists()
    out = docker("run", "--rm", "-v", f"{vol}:/d", "busybox", "cat", "/d/f", check=True)
    assert out.stdout == "kept\n"


def test_docker_py(docker: DockerCli, names: Callable[[str], str]) -> None:
    client = docker_py.DockerClient(base_url=docker.daemon.host, version=API_VERSION)
    vol = names("py")
    try:
        v = client.volumes.create(vol, labels={"pye": "py"})
        assert v.name == vol and client.volumes.get(vol).attrs["Labels"] == {"pye": "py"}
        assert vol in [x.name for x in client.volumes.list(filters={"label": "pye=py"})]
        out = client.containers.run(
            "busybox", ["sh", "-c", "echo py > /v/f; cat /v/f"], remove=True,
            volumes={vol: {"bind": "/v", "mode": "rw"}},
        )  # fmt: skip
        assert out == b"py\n"
        with pytest.raises(docker_py.errors.NotFound):
            client.volumes.get("pyetest-vol-nothere")
        client.volumes.get(vol).remove()
        assert vol not in [x.name for x in client.volumes.list()]
        anon = client.volumes.create(labels={ANONYMOUS: ""})
        assert len(anon.name) == 64
        assert anon.name in client.volumes.prune()["VolumesDeleted"]
    finally:
        client.close()


def test_pyengine_client(docker: DockerCli, names: Callable[[str], str]) -> None:
    d = docker.daemon
    vol, c, src = names("cli"), names("cli-anon"), names("cli-src")
    assert d.cli("volume", "create", "--label", "pye=cli", vol, check=True).stdout.strip() == vol
    assert d.cli("volume", "ls", "-q", "-f", "label=pye=cli", check=True).stdout.split() == [vol]
    assert json.loads(d.cli("volume", "inspect", vol, check=True).stdout)[0]["Name"] == vol
    d.cli("run", "--rm", "-v", f"{vol}:/d", "busybox", "sh", "-c", "echo c > /d/f", check=True)
    out = d.cli(
        "run", "--rm", "--mount", f"type=volume,src={vol},dst=/d,readonly", "--tmpfs",
        "/t:size=64k", "busybox", "sh", "-c", "cat /d/f; grep ' /t ' /proc/mounts; touch /d/g",
    )  # fmt: skip
    assert out.returncode != 0 and out.stdout.startswith("c\ntmpfs /t tmpfs "), out.stdout
    d.cli("create", "--name", src, "-v", f"{vol}:/d", "busybox", "true", check=True)
    out = d.cli("run", "--rm", "--volumes-from", f"{src}:ro", "busybox", "cat", "/d/f")
    assert out.stdout == "c\n"
    d.cli("create", "--name", c, "-v", "/anon", "busybox", "true", check=True)
    anon = json.loads(d.cli("inspect", c, check=True).stdout)[0]["Mounts"][0]["Name"]
    err = d.cli("volume", "rm", vol)
    assert err.returncode == 1 and "volume is in use" in err.stderr
    d.cli("rm", "-v", c, src, check=True)
    assert anon not in d.cli("volume", "ls", "-q").stdout
    bad = d.cli("run", "--rm", "--mount", "type=bind,dst=/x", "busybox", "true")
    assert bad.returncode == 125 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    free = d.cli("volume", "create", "--label", f"{ANONYMOUS}=", check=True).stdout.strip()
    pruned = d.cli("volume", "prune", "-f", check=True).stdout
    assert free in pruned and vol not in pruned
    assert d.cli("volume", "rm", vol, check=True).stdout.strip() == vol


def test_tmpfs_volume_is_mounted_while_used(docker: DockerCli, names: Callable[[str], str]) -> None:
    vol = names("tmpfsvol")
    docker(
        "volume",
        "create",
        "-o",
        "type=tmpfs",
        "-o",
        "device=tmpfs",
        "-o",
        "o=size=1m",
        vol,
        check=True,
    )
    info = docker.json("volume", "inspect", vol)[0]  # type: ignore[index]
    assert info["Options"] == {"type": "tmpfs", "device": "tmpfs", "o": "size=1m"}
    out = docker(
        "run",
        "--rm",
        "-v",
        f"{vol}:/d",
        "busybox",
        "sh",
        "-c",
        "echo t > /d/f; df -k /d",
        check=True,
    )
    assert " 1024 " in out.stdout, out.stdout
    # The tmpfs goes when no container uses it (its content with it), as Docker's local driver.
    assert info["Mountpoint"] not in Path("/proc/mounts").read_text()
    docker("volume", "rm", vol, check=True)


def test_bind_volume_of_the_local_driver(
    docker: DockerCli, names: Callable[[str], str], tmp_path: Path
) -> None:
    vol = names("bindvol")
    opts = ["-o", "type=none", "-o", "o=bind", "-o", f"device={tmp_path}"]
    docker("volume", "create", *opts, vol, check=True)
    docker("run", "--rm", "-v", f"{vol}:/d", "busybox", "sh", "-c", "echo b > /d/f", check=True)
    assert (tmp_path / "f").read_text() == "b\n"
    mountpoint = docker.daemon.data_root / "volumes" / vol / "_data"
    assert str(mountpoint) not in Path("/proc/mounts").read_text()
    docker("volume", "rm", vol, check=True)
    assert (tmp_path / "f").exists()  # removing the volume never deletes the bound directory
    bad = docker(
        "volume", "create", "-o", "type=none", "-o", "o=bind", "-o", "device=rel", names("b2")
    )
    assert "absolute host path" in _error(bad)
