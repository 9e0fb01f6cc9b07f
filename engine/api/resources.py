"""``/containers/{id}/update``, ``/stats`` and ``/top``: a container's limits and its use of
them, in Docker's shapes (swagger ContainerUpdate, ContainerStats, ContainerTop)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from common.errors import NotFound
from common.timefmt import ZERO_TIME, utc_rfc3339
from engine.api.bodies import HOST_CONFIG, check, fields
from engine.api.common import BadParameter, NotImplementedByEngine, flag, json_body, json_response
from engine.lifecycle.engine import Engine
from engine.lifecycle.limits import UpdateRequest, check_restart_policy
from engine.runtime import stats
from engine.runtime.resources import HOST_CONFIG_KEYS, ResourceError, Resources
from engine.runtime.resources import check as check_resources
from engine.runtime.top import TopError, parse_ps_args

STATS_INTERVAL = 1.0  # Docker's collector samples once a second
# Resource fields of an update pyengined does not apply: refused (501) when set.
UNSUPPORTED_UPDATE = {
    "BlkioWeight": "--blkio-weight",
    "CpusetMems": "--cpuset-mems",
    "CpuRealtimePeriod": "--cpu-rt-period",
    "CpuRealtimeRuntime": "--cpu-rt-runtime",
    "KernelMemory": "--kernel-memory",
}
UPDATE_BODY = fields(
    {
        **{key: HOST_CONFIG[key] for key in HOST_CONFIG_KEYS},
        **{key: HOST_CONFIG[key] for key in UNSUPPORTED_UPDATE if key in HOST_CONFIG},
        "RestartPolicy": HOST_CONFIG["RestartPolicy"],
    }
)


def parse_update_body(body: dict[str, Any]) -> UpdateRequest:
    check(body, UPDATE_BODY)
    for key, what in UNSUPPORTED_UPDATE.items():
        if body.get(key):
            raise NotImplementedByEngine(f"{what} is not supported by pyengined")
    r = Resources.from_host_config(body)
    try:
        check_resources(r, update=True)
    except ResourceError as e:
        raise BadParameter(str(e)) from None
    # The docker CLI always sends a RestartPolicy; an empty Name leaves the container's as it
    # is (moby container.UpdateContainer).
    policy = body.get("RestartPolicy") or {}
    restart = check_restart_policy(policy) if policy.get("Name") else None
    return UpdateRequest(r, restart)


class ResourcesApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def update(self, request: web.Request) -> web.Response:
        update = parse_update_body(await json_body(request))
        warnings = await self.engine.update(request.match_info["id"], update)
        return json_response({"Warnings": warnings})

    async def top(self, request: web.Request) -> web.Response:
        try:
            args = parse_ps_args(request.query.get("ps_args", ""))
        except TopError as e:
            raise BadParameter(str(e)) from None
        result = await self.engine.top(request.match_info["id"], args)
        return json_response({"Titles": result.titles, "Processes": result.processes})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        ref = request.match_info["id"]
        stream = flag(request, "stream", True)
        one_shot = flag(request, "one-shot")
        if one_shot and stream:
            raise BadParameter("cannot have stream=true and one-shot=true")
        c, sample = await self.engine.stats_sample(ref)
        previous: dict[str, Any] | None = None
        if sample is not None and not stream and not one_shot:
            # Two samples a second apart: precpu_stats makes the CPU % of a single answer.
            previous = self._entry(c.id, c.name, sample, None)
            await asyncio.sleep(STATS_INTERVAL)
            c, sample = await self.engine.stats_sample(ref)
        entry = self._entry(c.id, c.name, sample, previous)
        if not stream:
            return json_response(entry)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            while not self.engine.streams_closing:
                await resp.write(json.dumps(entry).encode() + b"\n")
                await asyncio.sleep(STATS_INTERVAL)
                c, sample = await self.engine.stats_sample(c.id)
                entry = self._entry(c.id, c.name, sample, entry)
        except (ConnectionError, NotFound):
            pass  # the client went away, or the container was removed: the stream ends
        return resp

    @staticmethod
    def _entry(
        container_id: str,
        name: str,
        sample: dict[str, Any] | None,
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        running = sample is not None
        body = sample if sample is not None else stats.empty()
        prev_cpu = (previous or {}).get("cpu_stats") or stats.empty()["cpu_stats"]
        return {
            "name": f"/{name}",
            "id": container_id,
            "read": utc_rfc3339() if running else ZERO_TIME,
            "preread": (previous or {}).get("read") or ZERO_TIME,
            **body,
            "precpu_stats": prev_cpu,
        }

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/containers/{id}/update", self.update),
            ("GET", "/containers/{id}/top", self.top),
            ("GET", "/containers/{id}/stats", self.stats),
        ]
