"""The engine's volumes: the store's calls with Docker's rules around them (in use, events),
and a container's mounts: planned at create, made and given to runc at start, let go when it
ends, its anonymous volumes removed with it when asked (``rm -v``)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import InvalidParameter
from engine.lifecycle.base import EngineBase
from engine.lifecycle.containers import Container, ContainerNotFound
from engine.volumes.copyup import copy_up, prepare_destination
from engine.volumes.mounts import BIND, TMPFS, VOLUME, MountPoint, depth, rootfs_propagation
from engine.volumes.parse import MountRequest, MountRequests
from engine.volumes.store import ANONYMOUS_LABEL, Volume, VolumeInUse, VolumeNotFound, VolumeStore

log = logging.getLogger("pyengined.volumes")


class VolumeOps(EngineBase):
    _volume_store: VolumeStore | None = None
    # Volumes a create being planned uses (name → creates): in use before its record exists.
    _planned: collections.Counter[str] | None = None

    @property
    def volume_store(self) -> VolumeStore:
        if self._volume_store is None:
            self._volume_store = VolumeStore(self.cfg.data_root / "volumes")
        return self._volume_store

    # ---- volumes ---------------------------------------------------------------------------

    def volume_users(self, name: str) -> list[str]:
        """The ids of the containers (any state) that have volume ``name`` mounted; a create
        still planning its mounts counts as one (its id is not known yet)."""
        planning = ["<a container being created>"] if self._planned and self._planned[name] else []
        return planning + [
            c.id
            for c in self.containers.all()
            if any(m.type == VOLUME and m.name == name for m in c.mounts)
        ]

    def _emit(self, action: str, name: str, **attributes: str) -> None:
        self.events.emit("volume", action, name, {"driver": "local", **attributes})

    async def create_volume(
        self,
        name: str | None,
        driver: str = "local",
        labels: dict[str, str] | None = None,
        options: dict[str, str] | None = None,
    ) -> Volume:
        store = self.volume_store
        volume, made = await asyncio.to_thread(store.create, name, labels, options, driver)
        if made:
            self._emit("create", volume.name)
        return volume

    async def remove_volume(self, name: str, force: bool = False) -> None:
        """Docker's ``volume rm``: ``force`` ignores a missing volume, never one in use."""
        try:
            volume = self.volume_store.get(name)
        except VolumeNotFound:
            if force:
                return
            raise
        users = self.volume_users(name)
        if users:
            raise VolumeInUse(name, users)
        await asyncio.to_thread(self.volume_store.remove, volume)
        self._emit("destroy", name)

    async def prune_volumes(self, keep: Callable[[Volume], bool]) -> tuple[list[str], int]:
        """Remove the unused volumes ``keep`` does not keep: (names, bytes reclaimed)."""
        removed, reclaimed = [], 0
        for volume in self.volume_store.all():
            if keep(volume) or self.volume_users(volume.name):
                continue
            size = await asyncio.to_thread(self.volume_store.size, volume)
            try:
                await self.remove_volume(volume.name)
            except (VolumeInUse, VolumeNotFound, OSError) as e:
                log.warning("prune: volume %s: %s", volume.name, e)
                continue
            removed.append(volume.name)
            reclaimed += size
        return removed, reclaimed

    # ---- a container's mounts ----------------------------------------------------------------

    async def _plan_mounts(
        self, requests: MountRequests | None, image_volumes: list[str]
    ) -> list[MountPoint]:
        """The mount points of a new container: volumes-from first, the create's binds,
        mounts and tmpfs over them by destination, then an anonymous volume for each image
        or Config volume nothing else is mounted on (moby registerMountPoints). Volumes and
        -v bind sources that are missing are made; on an error, the volumes made are removed."""
        requests = requests or MountRequests()
        points: dict[str, MountPoint] = {}
        for vf in requests.volumes_from:
            try:
                source = self.containers.get(vf.container)
            except ContainerNotFound as e:
                raise InvalidParameter(str(e)) from None
            for m in source.mounts:
                if m.type == TMPFS:
                    continue
                copy = MountPoint(**{**m.__dict__, "anonymous": False})
                if vf.mode:
                    copy.rw, copy.mode = vf.mode == "rw", vf.mode
                points[m.destination] = copy
        made: list[Volume] = []
        if self._planned is None:
            self._planned = collections.Counter()
        planned = self._planned
        named = [r.source for r in requests.mounts if r.type == VOLUME and r.source]
        planned.update(named)

        async def add(request: MountRequest) -> None:
            point = points[request.target] = await self._mount_point(request, made)
            if point.anonymous:  # made just now (no await since): held before a prune sees it
                planned[point.name] += 1
                named.append(point.name)

        try:
            for request in requests.mounts:
                await add(request)
            for target in [*image_volumes, *requests.volumes]:
                if target not in points:
                    await add(MountRequest(VOLUME, target))
        except BaseException:
            for volume in made:
                await asyncio.to_thread(self.volume_store.remove, volume)
            raise
        finally:
            planned.subtract(named)
            for name in named:
                if planned[name] <= 0:
                    planned.pop(name, None)
        for volume in made:
            self._emit("create", volume.name)
        return sorted(points.values(), key=lambda m: depth(m.destination))

    async def _mount_point(self, r: MountRequest, made: list[Volume]) -> MountPoint:
        if r.type == TMPFS:
            return MountPoint(TMPFS, r.target, rw=not r.read_only, tmpfs_options=r.tmpfs_options)
        if r.type == BIND:
            await asyncio.to_thread(_bind_source, r)
            return MountPoint(
                BIND, r.target, source=r.source, mode=r.mode, rw=not r.read_only,
                propagation=r.propagation,
            )  # fmt: skip
        labels = {**r.labels, **({} if r.source else {ANONYMOUS_LABEL: ""})}
        volume, new = await asyncio.to_thread(
            self.volume_store.create, r.source or None, labels, None
        )
        if new:
            made.append(volume)
        return MountPoint(
            VOLUME, r.target, name=volume.name, driver="local", mode=r.mode, rw=not r.read_only,
            nocopy=r.nocopy, anonymous=not r.source,
        )  # fmt: skip

    def mounts_json(self, c: Container) -> list[dict[str, Any]]:
        out = []
        for m in c.mounts:
            path = str(self.volume_store.root / m.name / "_data") if m.type == VOLUME else ""
            out.append(m.to_api(path))
        return out

    async def _mount_volumes(self, c: Container, rootfs_dir: Path, spec: dict[str, Any]) -> None:
        """Make each mount point in the rootfs, copy the image's content into new empty
        volumes, and put the mounts into ``spec`` (over the default ones they cover)."""
        if not c.mounts:
            return
        oci = await asyncio.to_thread(self._prepare_mounts, c, rootfs_dir)
        targets = {m["destination"] for m in oci} | {m.destination for m in c.mounts}
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in targets] + oci
        propagation = rootfs_propagation(c.mounts)
        if propagation:
            spec["linux"]["rootfsPropagation"] = propagation
        for m in c.mounts:
            if m.type == VOLUME:
                self._emit(
                    "mount", m.name, container=c.id, destination=m.destination,
                    propagation=m.propagation, **{"read/write": str(m.rw).lower()},
                )  # fmt: skip

    def _prepare_mounts(self, c: Container, rootfs_dir: Path) -> list[dict[str, Any]]:
        store = self.volume_store
        oci = []
        for m in c.mounts:
            host = m.source
            if m.type == VOLUME:
                volume = store.get(m.name)
                host = str(store.mount(volume))
            elif m.type == BIND and not os.path.exists(host):
                raise InvalidParameter(
                    f'invalid mount config for type "bind": bind source path does not exist: {host}'
                )
            if m.type == TMPFS:
                # runc makes the mount point (securejoin, in the rootfs) and keeps the mode of
                # one that exists over the tmpfs' own: leave it to runc, as Docker does.
                oci.append(m.oci(m.destination, ""))
                continue
            is_dir = m.type != BIND or os.path.isdir(host)
            destination = prepare_destination(rootfs_dir, m.destination, is_dir)
            if m.type == VOLUME and not m.nocopy and store.is_empty(volume):
                try:
                    copy_up(rootfs_dir, destination, Path(host))
                except OSError as e:  # the image's files: a clear error, never a 500
                    raise InvalidParameter(
                        f"copying {m.destination} into volume {m.name}: {e.strerror or e}"
                    ) from e
            oci.append(m.oci(destination, host))
        return oci

    async def _unmount_volumes(self, c: Container) -> None:
        running = [x for x in self.containers.all() if x.state.running and x.id != c.id]
        for m in c.mounts:
            if m.type != VOLUME:
                continue
            self._emit("unmount", m.name, container=c.id)
            in_use = any(any(o.name == m.name for o in x.mounts) for x in running)
            try:
                volume = self.volume_store.get(m.name)
            except VolumeNotFound:
                continue
            if volume.options and not in_use:
                try:
                    await asyncio.to_thread(self.volume_store.unmount, volume)
                except OSError as e:
                    log.warning("volume %s: %s", m.name, e)

    async def _remove_anonymous_volumes(self, mounts: list[MountPoint]) -> None:
        """``rm -v``: a container's anonymous volumes no other container uses."""
        for m in mounts:
            if m.type == VOLUME and m.anonymous and not self.volume_users(m.name):
                try:
                    await self.remove_volume(m.name, force=True)
                except (VolumeInUse, OSError) as e:
                    log.warning("volume %s: %s", m.name, e)


def _bind_source(r: MountRequest) -> None:
    """A bind's host path must exist; Docker makes a missing ``-v`` one a directory."""
    if os.path.lexists(r.source):
        return
    if not r.create_source:
        raise InvalidParameter(
            f'invalid mount config for type "bind": bind source path does not exist: {r.source}'
        )
    try:
        os.makedirs(r.source, 0o755, exist_ok=True)
    except OSError as e:
        raise InvalidParameter(f"error while creating mount source path '{r.source}': {e}") from e
