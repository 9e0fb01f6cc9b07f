"""``docker cp`` (the archive API) with the real docker CLI and docker-py, both ways, running
and stopped containers, and hostile trees and archives: a container's symlink to ``/``, a tar
with ``../`` members, absolute names, a symlink member followed by a file through it. Nothing
may be read from or written to the host outside the container's root.

One pyengined on bridge ``pyer1`` (10.192.1.0/24), its containers named ``pyer-cp-*``; host
marker files under the test's tmp directory and ``/tmp/pyer-cp-*`` (removed afterwards).
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dockercli import docker_daemon
from tests.test_limits import Docker, wait_exit

NAME, BIP = "pyer1", "10.192.1.1/24"
PREFIX = "pyer-cp-"


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Docker]:
    tmp = tmp_path_factory.mktemp(NAME)
    yield from docker_daemon(tmp, NAME, BIP, [busybox_archive], Docker)


@pytest.fixture
def host_marker() -> Iterator[Path]:
    """A file name in the host's /tmp that no container may reach."""
    path = Path(f"/tmp/{PREFIX}{uuid.uuid4().hex[:12]}")
    yield path
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    path.unlink(missing_ok=True)


def test_cp_file_and_directory_both_ways(docker: Docker, tmp_path: Path) -> None:
    name = PREFIX + "run"
    docker("run", "-d", "--name", name, "busybox", "sleep", "300", check=True)
    try:
        src = tmp_path / "hello.txt"
        src.write_bytes(b"hello from the host\n" * 1000)
        docker("cp", str(src), f"{name}:/tmp/", check=True)
        out = tmp_path / "out"
        out.mkdir()
        docker("cp", f"{name}:/tmp/hello.txt", str(out), check=True)
        assert (out / "hello.txt").read_bytes() == src.read_bytes()

        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "a").write_text("a\n")
        (tree / "b").write_text("b\n")
        (tree / "link").symlink_to("sub/a")
        docker("cp", str(tree), f"{name}:/tmp/", check=True)
        docker("cp", f"{name}:/tmp/tree", str(out / "back"), check=True)
        assert (out / "back" / "sub" / "a").read_text() == "a\n"
        assert (out / "back" / "b").read_text() == "b\n"
        assert os.readlink(out / "back" / "link") == "sub/a"
        # A file of the image, out; a missing one is Docker's 404 message.
        docker("cp", f"{name}:/bin/busybox", str(out / "busybox"), check=True)
        assert (out / "busybox").stat().st_size > 100_000
        missing = docker("cp", f"{name}:/no/such", str(out))
        assert missing.returncode != 0 and "Could not find the file /no/such" in missing.stderr
        to_file = docker("cp", str(tree), f"{name}:/tmp/hello.txt")
        assert to_file.returncode != 0
    finally:
        docker("rm", "-f", name)


def test_cp_into_a_stopped_container_then_start(docker: Docker, tmp_path: Path) -> None:
    name = PREFIX + "stopped"
    docker("create", "--name", name, "busybox", "cat", "/etc/greeting", check=True)
    try:
        src = tmp_path / "greeting"
        src.write_text("hi from cp\n")
        docker("cp", str(src), f"{name}:/etc/greeting", check=True)
        docker("start", name, check=True)
        wait_exit(docker, name)
        assert docker("logs", name, check=True).stdout == "hi from cp\n"
        docker("cp", f"{name}:/etc/greeting", str(tmp_path / "again"), check=True)
        assert (tmp_path / "again").read_text() == "hi from cp\n"
    finally:
        docker("rm", "-f", name)


def test_symlink_to_root_in_the_container_stays_inside(
    docker: Docker, tmp_path: Path, host_marker: Path
) -> None:
    host_marker.write_text("host secret\n")
    name = PREFIX + "escape"
    docker(
        "run", "--name", name, "busybox", "sh", "-c",
        f"ln -s / /escape && ln -s {host_marker} /marker && mkdir -p /tmp && echo inside > /inside",
        check=True,
    )  # fmt: skip
    try:
        # Reads: /escape is the container's root, not the host's.
        result = docker("cp", f"{name}:/escape{host_marker}", str(tmp_path / "stolen"))
        assert result.returncode != 0 and "Could not find the file" in result.stderr
        assert not (tmp_path / "stolen").exists()
        docker("cp", f"{name}:/escape/inside", str(tmp_path / "inside"), check=True)
        assert (tmp_path / "inside").read_text() == "inside\n"
        result = docker("cp", "-L", f"{name}:/marker", str(tmp_path / "stolen2"))
        assert not (tmp_path / "stolen2").exists() or "host secret" not in (
            tmp_path / "stolen2"
        ).read_text(errors="replace")
        # Writes through the link land in the container's /tmp.
        src = tmp_path / host_marker.name
        src.write_text("written by cp\n")
        host_marker.unlink()
        docker("cp", str(src), f"{name}:/escape/tmp/", check=True)
        assert not host_marker.exists(), "cp wrote through the symlink onto the host"
        docker("cp", f"{name}:/tmp/{host_marker.name}", str(tmp_path / "check"), check=True)
        assert (tmp_path / "check").read_text() == "written by cp\n"
    finally:
        docker("rm", "-f", name)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _container_file(container: Any, path: str) -> bytes | None:
    try:
        stream, _ = container.get_archive(path)
    except Exception:
        return None
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.next()
        assert member is not None
        f = tar.extractfile(member)
        return f.read() if f else b""


def test_docker_py_hostile_archives(docker: Docker, host_marker: Path) -> None:
    docker_py = pytest.importorskip("docker")
    client = docker_py.DockerClient(base_url=docker.daemon.host, version="1.47")
    container = client.containers.run("busybox", ["sleep", "300"], name=PREFIX + "py", detach=True)
    try:
        depth = "../" * 12
        evil = host_marker.name
        with pytest.raises(docker_py.errors.APIError) as e:
            container.put_archive("/tmp", _tar([(_file(f"{depth}tmp/{evil}"), b"x")]))
        assert e.value.status_code == 400
        assert not host_marker.exists()

        # An absolute member name is below the destination, as Docker extracts it.
        container.put_archive("/tmp", _tar([(_file(f"/abs-{evil}"), b"abs")]))
        assert _container_file(container, f"/tmp/abs-{evil}") == b"abs"
        assert not Path(f"/tmp/abs-{evil}").exists()

        # A symlink member to / (and to ../..), then a file written through it: inside.
        archive = _tar(
            [
                (_symlink("up", "/"), b""),
                (_symlink("up2", depth), b""),
                (_file(f"up/tmp/{evil}"), b"through the link"),
                (_file(f"up2/tmp/{evil}-2"), b"through the other"),
            ]
        )
        assert container.put_archive("/root", archive)
        assert not host_marker.exists()
        assert not Path(f"/tmp/{evil}-2").exists()
        assert _container_file(container, f"/tmp/{evil}") == b"through the link"
        assert _container_file(container, f"/tmp/{evil}-2") == b"through the other"

        # get_archive and its stat header; a tar's worth of a directory.
        stream, stat = container.get_archive("/etc/passwd")
        assert stat["name"] == "passwd" and stat["size"] > 0
        assert stat["mode"] & 0o777 == 0o644
        data = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert tar.getnames() == ["passwd"]
        stream, stat = container.get_archive("/root")
        assert stat["mode"] & (1 << 31)  # Go's os.ModeDir
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            assert {"root", "root/up", "root/up2"} <= set(tar.getnames())

        # HEAD: the stat alone, base64 JSON, with the link's target.
        api = client.api
        resp = api.head(
            api._url("/containers/{0}/archive", container.id), params={"path": "/root/up"}
        )
        header = json.loads(base64.b64decode(resp.headers["X-Docker-Container-Path-Stat"]))
        assert header["linkTarget"] == "/" and header["mode"] & (1 << 27)

        # Garbage is a 400, an extraction point that is a file too.
        with pytest.raises(docker_py.errors.APIError) as e:
            container.put_archive("/tmp", b"this is not a tar archive" * 40)
        assert e.value.status_code == 400
        # A pax header that claims 10 GB (tarfile would read it whole): refused at once.
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, 10**10
        with pytest.raises(docker_py.errors.APIError) as e:
            container.put_archive("/tmp", pax.tobuf(tarfile.GNU_FORMAT) + b"\0" * 65536)
        assert e.value.status_code == 400
        with pytest.raises(docker_py.errors.APIError) as e:
            container.put_archive("/etc/passwd", _tar([(_file("x"), b"x")]))
        assert e.value.status_code == 400
        with pytest.raises(docker_py.errors.NotFound):
            container.put_archive("/no/such/dir", _tar([(_file("x"), b"x")]))
    finally:
        container.remove(force=True)
        client.close()


def test_pyengine_cp(docker: Docker, tmp_path: Path) -> None:
    d = docker.daemon
    name = PREFIX + "client"
    d.cli("run", "-d", "--name", name, "busybox", "sleep", "300", check=True)
    try:
        src = tmp_path / "file.txt"
        src.write_text("via pyengine\n")
        d.cli("cp", str(src), f"{name}:/tmp/", check=True)
        d.cli("cp", str(src), f"{name}:/tmp/renamed.txt", check=True)
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "x").write_text("x\n")
        d.cli("cp", str(tree), f"{name}:/tmp/", check=True)
        out = tmp_path / "out"
        out.mkdir()
        d.cli("cp", f"{name}:/tmp/file.txt", str(out), check=True)
        d.cli("cp", f"{name}:/tmp/renamed.txt", str(out / "again.txt"), check=True)
        d.cli("cp", f"{name}:/tmp/tree", str(out / "tree2"), check=True)
        assert (out / "file.txt").read_text() == "via pyengine\n"
        assert (out / "again.txt").read_text() == "via pyengine\n"
        assert (out / "tree2" / "sub" / "x").read_text() == "x\n"
        missing = d.cli("cp", f"{name}:/no/such", str(out))
        assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    finally:
        d.cli("rm", "-f", name)
