"""The engine's resource parts: a container's limits at start, ``update``, ``stats`` and
``top`` (moby daemon/update.go, daemon/stats*.go, daemon/top_unix.go)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import Any

from common.errors import Conflict, InvalidParameter
from engine.lifecycle.base import EngineBase, NotRunning
from engine.lifecycle.containers import Container
from engine.runtime import resources, stats, top
from engine.runtime.cgroups import ContainerCgroup
from engine.runtime.resources import ResourceError, Resources
from engine.runtime.runc import RuncError

RESTART_POLICIES = ("", "no", "always", "unless-stopped", "on-failure")


def limits_of(c: Container) -> dict[str, Any]:
    """The spec's ``linux.resources`` entries for the limits recorded with ``c``."""
    return resources.linux_resources(Resources.from_host_config(c.host_config))


@dataclass
class UpdateRequest:
    """``POST /containers/{id}/update``, parsed: the resource fields it sets and its
    RestartPolicy (None: unchanged)."""

    resources: Resources
    restart_policy: dict[str, Any] | None = None


def check_restart_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """Docker's rules (moby runconfig validateRestartPolicy)."""
    name = policy.get("Name") or ""
    retries = policy.get("MaximumRetryCount") or 0
    if name not in RESTART_POLICIES:
        raise InvalidParameter(f"invalid restart policy: unknown policy '{name}'")
    if retries < 0:
        raise InvalidParameter("invalid restart policy: maximum retry count can't be negative")
    if retries and name != "on-failure":
        raise InvalidParameter(
            "invalid restart policy: maximum retry count can only be used with 'on-failure'"
        )
    return {"Name": name, "MaximumRetryCount": retries}


class Limits(EngineBase):
    async def update(self, ref: str, request: UpdateRequest) -> list[str]:
        """Apply new limits to the cgroup of a running container (``runc update``) and keep
        them, with the restart policy, for its next start. Nothing is recorded when runc
        refuses them."""
        async with self._locked(ref) as c:
            if c.state.status == "removing":
                raise Conflict(f"Cannot update container {c.id}: container is marked for removal")
            if request.restart_policy is not None and c.host_config.get("AutoRemove"):
                if request.restart_policy["Name"] not in ("", "no"):
                    raise InvalidParameter(
                        "Restart policy cannot be updated because AutoRemove is enabled for "
                        "the container"
                    )
            current = Resources.from_host_config(c.host_config)
            try:
                merged = resources.merge_update(current, request.resources)
            except ResourceError as e:
                raise InvalidParameter(f"Cannot update container {c.id}: {e}") from None
            if c.state.running and request.resources.given():
                spec = resources.linux_resources(merged)
                path = self.containers.dir(c) / "update.json"
                await asyncio.to_thread(_write_private, path, json.dumps(spec))
                try:
                    await self.runtime.update(c.id, path)
                except RuncError as e:
                    raise InvalidParameter(f"Cannot update container {c.id}: {e}") from None
                finally:
                    path.unlink(missing_ok=True)
            c.host_config.update(merged.host_config())
            if request.restart_policy is not None:
                c.host_config["RestartPolicy"] = request.restart_policy
            self.containers.save(c)
            self.events.emit("container", "update", c.id, {"image": c.image, "name": c.name})
        return []

    @property
    def streams_closing(self) -> bool:
        """The API server is stopping: a stats stream ends now."""
        return self._closing

    def _cgroup(self, c: Container) -> ContainerCgroup:
        return ContainerCgroup.of(c.id)

    async def stats_sample(self, ref: str) -> tuple[Container, dict[str, Any] | None]:
        """The container and one sample of its use; None when it is not running."""
        c = self.containers.get(ref)
        if not c.state.running:
            return c, None
        sample = await asyncio.to_thread(stats.sample, self._cgroup(c), c.state.pid)
        return c, sample

    async def top(self, ref: str, ps_args: list[str]) -> top.TopResult:
        c = self.containers.get(ref)
        if not c.state.running:
            raise NotRunning(f"container {c.id} is not running")
        cg = self._cgroup(c)
        pids = await asyncio.to_thread(cg.pids)
        try:
            return await asyncio.to_thread(top.top, ps_args, pids)
        except (top.TopError, OSError) as e:
            raise InvalidParameter(str(e)) from None


def _write_private(path: Any, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
