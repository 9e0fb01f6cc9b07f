"""The engine's side of ``docker cp``: a descriptor of the container's root filesystem, running
or not (a stopped container's overlay is mounted for the copy, under the container's lock, and
unmounted after it).

The root is the overlay as the host sees it: the files the runtime binds over it in the
container's mount namespace (/etc/hosts, /etc/resolv.conf, /etc/hostname) and whatever is
mounted inside the container are not part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from engine import inroot
from engine.lifecycle.base import EngineBase
from engine.lifecycle.containers import Container, ContainerConflict
from engine.runtime import rootfs


class Archive(EngineBase):
    def _rootfs_dir(self, c: Container) -> Path:
        return self.containers.dir(c) / "bundle" / "rootfs"

    @contextlib.asynccontextmanager
    async def container_root(self, ref: str) -> AsyncIterator[tuple[Container, int]]:
        """The container and an ``O_DIRECTORY`` descriptor of its root filesystem."""
        lock_held = False
        c = self.containers.get(ref)
        lock = self._locks.setdefault(c.id, asyncio.Lock())
        await lock.acquire()
        lock_held = True
        mounted_here = False
        root_fd = -1
        try:
            c = self.containers.get(c.id)
            if c.state.status == "removing":
                raise ContainerConflict(f"container {c.id[:12]} is marked for removal")
            target = self.containers.dir(c) / "bundle" / "rootfs"
            if c.state.running and await asyncio.to_thread(rootfs.is_mounted, target):
                root_fd = os.open(target, inroot.DIR_FLAGS)
                # The descriptor keeps the mount alive should the container stop: its
                # lifecycle need not wait for the copy.
                lock.release()
                lock_held = False
            else:
                await asyncio.to_thread(self._mount_stopped, c)
                mounted_here = True
                root_fd = os.open(target, inroot.DIR_FLAGS)
            yield c, root_fd
        finally:
            if root_fd >= 0:
                os.close(root_fd)
            if mounted_here:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(rootfs.unmount, self._rootfs_dir(c))
            if lock_held:
                lock.release()

    def _mount_stopped(self, c: Container) -> None:
        cdir = self.containers.dir(c)
        image = self.images.get(c.image_id)
        layers = self.images.layer_dirs(image)
        for sub in ("upper", "work"):
            (cdir / "overlay" / sub).mkdir(parents=True, exist_ok=True)
        target = cdir / "bundle" / "rootfs"
        target.mkdir(parents=True, exist_ok=True)
        if not rootfs.is_mounted(target):
            rootfs.mount_overlay(
                layers, cdir / "overlay" / "upper", cdir / "overlay" / "work", target
            )
