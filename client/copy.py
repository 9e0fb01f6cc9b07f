"""``pyengine cp``: files between this machine and a container, through the archive API, with
the docker CLI's naming rules (cli/command/container/cp.go): into an existing directory the
source keeps its name; onto a path that does not exist, it takes that name.

A tar from the daemon is extracted with tarfile's ``tar`` filter: no member lands outside the
destination, whatever its name or the links before it."""

from __future__ import annotations

import base64
import json
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
from typing import Any

import click

from client.command import daemon_client, daemon_errors, fail
from client.http import Client, DaemonError

_GO_DIR = 1 << 31


def _split(arg: str) -> tuple[str | None, str]:
    """``CONTAINER:PATH`` → (container, path); a local path (also ``./a:b``) → (None, path)."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None, arg
    container, _, path = arg.partition(":")
    return container, path


def _stat(client: Client, container: str, path: str) -> dict[str, Any] | None:
    try:
        resp = client.request("HEAD", f"/containers/{container}/archive", query={"path": path})
    except DaemonError as e:
        if e.status == 404 and "No such container" not in str(e):
            return None  # a HEAD's answer has no body: the path does not exist
        raise
    resp.read()
    header = resp.headers.get("X-Docker-Container-Path-Stat") or ""
    return json.loads(base64.b64decode(header)) if header else {}


def copy_from(client: Client, container: str, src: str, dst: str) -> None:
    resp = client.request(
        "GET", f"/containers/{container}/archive", query={"path": src}, timeout=None
    )
    if dst == "-":
        shutil.copyfileobj(resp, sys.stdout.buffer)
        return
    into_dir = os.path.isdir(dst)
    parent = dst if into_dir else os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        fail(f"destination directory {parent!r} does not exist")
    tmp = tempfile.mkdtemp(prefix=".pyengine-cp-", dir=parent)
    try:
        with tarfile.open(fileobj=resp, mode="r|") as tar:
            tar.extractall(tmp, filter="tar")
        entries = os.listdir(tmp)
        if len(entries) != 1:
            fail("unexpected archive from the daemon")
        top = os.path.join(tmp, entries[0])
        target = os.path.join(dst, entries[0]) if into_dir else dst
        if os.path.isdir(target) and not os.path.islink(target) and os.path.isdir(top):
            shutil.copytree(top, target, symlinks=True, dirs_exist_ok=True)
        else:
            if os.path.lexists(target) and not os.path.isdir(target):
                os.unlink(target)
            os.rename(top, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_to(client: Client, src: str, container: str, dst: str) -> None:
    if not os.path.lexists(src):
        fail(f"lstat {src}: no such file or directory")
    src_is_dir = os.path.isdir(src) and not os.path.islink(src)
    info = _stat(client, container, dst)
    if info is not None and info.get("mode", 0) & _GO_DIR:
        target_dir, name = dst, os.path.basename(os.path.normpath(src))
    elif info is not None and src_is_dir:
        fail("cannot copy a directory to a file")
    else:
        if dst.endswith("/") and info is None and not src_is_dir:
            fail(f"Error response from daemon: Could not find the file {dst} in {container}")
        target_dir = posixpath.dirname(dst.rstrip("/")) or "/"
        name = posixpath.basename(dst.rstrip("/"))
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.add(src, arcname=name)
        spool.seek(0)
        client.request(
            "PUT",
            f"/containers/{container}/archive",
            query={"path": target_dir, "noOverwriteDirNonDir": "true"},
            stream=spool,
            timeout=None,
        ).read()


@click.command()
@click.argument("src")
@click.argument("dst")
@click.pass_context
@daemon_errors()
def cp(ctx: click.Context, src: str, dst: str) -> None:
    """Copy files between a container and this machine (CONTAINER:PATH on one side)."""
    src_container, src_path = _split(src)
    dst_container, dst_path = _split(dst)
    if (src_container is None) == (dst_container is None):
        fail("must specify exactly one container path (CONTAINER:PATH) and one local path")
    client = daemon_client(ctx)
    if src_container is not None:
        copy_from(client, src_container, src_path, dst_path)
    else:
        assert dst_container is not None
        copy_to(client, src_path, dst_container, dst_path)


COMMANDS = (cp,)
