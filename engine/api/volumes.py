"""``/volumes``: Docker's volume calls over the engine's local volume store.

Shapes as moby's ``api/types/volume``: a volume is ``{CreatedAt, Driver, Labels, Mountpoint,
Name, Options, Scope}``; the list is ``{"Volumes": [...], "Warnings": []}``; a prune answers
``{"VolumesDeleted": [...], "SpaceReclaimed": n}`` and, from API 1.42, removes only anonymous
volumes unless the ``all`` filter is true (moby api/server/router/volume).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

from aiohttp import web

from engine.api.bodies import check, fields, map_of, str_map, string
from engine.api.common import BadParameter, flag, json_body, json_response, parse_filters
from engine.api.version import V1_42, api_version
from engine.lifecycle.engine import Engine
from engine.volumes.store import Volume

VOLUME_CREATE = fields(
    {
        "Name": string,
        "Driver": string,
        "DriverOpts": str_map,
        "Labels": str_map,
        "ClusterVolumeSpec": map_of(lambda v, w: None),
    }
)
LIST_FILTERS = {"name", "label", "label!", "dangling", "driver"}
PRUNE_FILTERS = {"label", "label!", "all"}
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _label_matches(labels: dict[str, str], wanted: str) -> bool:
    key, eq, value = wanted.partition("=")
    return key in labels and (not eq or labels[key] == value)


def _bool_filter(key: str, values: list[str]) -> bool | None:
    """The one boolean a filter such as ``dangling`` or ``all`` holds (the last given)."""
    result = None
    for value in values:
        if value.lower() not in (*_TRUE, *_FALSE):
            raise BadParameter(f"invalid filter '{key}={value}'")
        result = value.lower() in _TRUE
    return result


def _labels_match(v: Volume, filters: dict[str, list[str]]) -> bool:
    if not all(_label_matches(v.labels, w) for w in filters.get("label", [])):
        return False
    return not any(_label_matches(v.labels, w) for w in filters.get("label!", []))


class VolumesApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def volume_json(self, v: Volume) -> dict[str, Any]:
        return {
            "CreatedAt": v.created_at,
            "Driver": v.driver,
            "Labels": dict(v.labels) or None,
            "Mountpoint": str(self.engine.volume_store.mountpoint(v)),
            "Name": v.name,
            "Options": dict(v.options) or None,
            "Scope": "local",
        }

    async def list(self, request: web.Request) -> web.Response:
        filters = parse_filters(request, LIST_FILTERS)
        dangling = _bool_filter("dangling", filters.get("dangling", []))

        def listed(v: Volume) -> bool:
            if not _labels_match(v, filters):
                return False
            if not all(n in v.name for n in filters.get("name", [])):
                return False
            if not all(d in v.driver for d in filters.get("driver", [])):
                return False
            return dangling is None or dangling == (not self.engine.volume_users(v.name))

        volumes = [self.volume_json(v) for v in self.engine.volume_store.all() if listed(v)]
        return json_response({"Volumes": volumes, "Warnings": []})

    async def create(self, request: web.Request) -> web.Response:
        body = check(await json_body(request), VOLUME_CREATE)
        if body.get("ClusterVolumeSpec"):
            raise BadParameter("cluster volumes are not supported (no swarm)")
        volume = await self.engine.create_volume(
            body.get("Name") or None,
            body.get("Driver") or "local",
            body.get("Labels") or {},
            body.get("DriverOpts") or {},
        )
        return json_response(self.volume_json(volume), status=201)

    async def inspect(self, request: web.Request) -> web.Response:
        volume = self.engine.volume_store.get(request.match_info["name"])
        return json_response(self.volume_json(volume))

    async def remove(self, request: web.Request) -> web.Response:
        await self.engine.remove_volume(request.match_info["name"], force=flag(request, "force"))
        return web.Response(status=204)

    async def prune(self, request: web.Request) -> web.Response:
        filters = parse_filters(request, PRUNE_FILTERS)
        prune_all = _bool_filter("all", filters.get("all", []))
        if api_version(request).below(V1_42):
            prune_all = True  # before 1.42 a prune took named volumes too

        def keep(v: Volume) -> bool:
            if not _labels_match(v, filters):
                return True
            return not prune_all and not v.anonymous

        names, reclaimed = await self.engine.prune_volumes(keep)
        return json_response({"VolumesDeleted": names, "SpaceReclaimed": reclaimed})

    def routes(self) -> builtins.list[tuple[str, str, Callable[..., Any]]]:
        return [
            ("GET", "/volumes", self.list),
            ("POST", "/volumes/create", self.create),
            ("POST", "/volumes/prune", self.prune),
            ("GET", "/volumes/{name}", self.inspect),
            ("DELETE", "/volumes/{name}", self.remove),
        ]
