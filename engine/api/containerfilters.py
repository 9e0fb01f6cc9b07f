"""``GET /containers/json``'s filters (Docker's keys and values)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from common.ports import PortKey
from engine.api.common import BadParameter
from engine.api.create import port_key
from engine.api.stateview import check_health_filter, state_json
from engine.images.store import ImageNotFound
from engine.lifecycle.containers import Container
from engine.lifecycle.engine import Engine, exposed_ports

CONTAINER_FILTERS = {
    "id",
    "name",
    "status",
    "exited",
    "label",
    "ancestor",
    "network",
    "before",
    "since",
    "publish",
    "expose",
    "volume",
    "health",
}
STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")


def container_filter(
    engine: Engine,
    filters: dict[str, list[str]],
    image_config: Callable[[Container], dict[str, Any]],
) -> Callable[[Container], bool]:
    """The ``filters`` of ``GET /containers/json``, checked (a bad value is a 400): whether a
    container is listed. Values of one key match if any does, except labels, which must all
    match (moby filters.MatchKVList)."""
    check_health_filter(filters.get("health", []))
    for value in filters.get("status", []):
        if value not in STATUSES:
            raise BadParameter(f"invalid filter 'status={value}'")
    exited: list[int] = []
    for value in filters.get("exited", []):
        try:
            exited.append(int(value))
        except ValueError:
            raise BadParameter(f"invalid filter 'exited={value}'") from None
    ancestors: set[str] = set()
    for value in filters.get("ancestor", []):
        try:
            ancestors.add(engine.images.get(value).id)
        except (ImageNotFound, ValueError):
            continue
    before = {engine.containers.get(v).created for v in filters.get("before", [])}
    since = {engine.containers.get(v).created for v in filters.get("since", [])}
    for value in filters.get("name", []):
        try:
            re.compile(value)
        except re.error as e:
            raise BadParameter(f"invalid filter 'name={value}': {e}") from None

    def has_port(c: Container, value: str, published: bool) -> bool:
        key = port_key(value)
        if published:
            return any(PortKey(p.host_port, p.proto) == key for p in c.network.ports)
        return key in exposed_ports(c, image_config(c))

    def label(c: Container, value: str) -> bool:
        key, eq, want = value.partition("=")
        labels = c.config.get("Labels") or {}
        return key in labels and (not eq or labels[key] == want)

    checks: dict[str, Callable[[Container, str], bool]] = {
        "id": lambda c, v: c.id.startswith(v),
        "name": lambda c, v: re.search(v, f"/{c.name}") is not None,
        "status": lambda c, v: state_json(c.state)["Status"] == v,
        "health": lambda c, v: (c.state.health.get("Status") or "none") == v,
        "exited": lambda c, v: c.state.status == "exited" and c.state.exit_code == int(v),
        "label": label,
        "ancestor": lambda c, v: c.image_id in ancestors,
        "network": lambda c, v: any(
            a.name == v or a.network_id.startswith(v) for a in engine.attachments(c)
        ),
        "before": lambda c, v: all(c.created < t for t in before),
        "since": lambda c, v: all(c.created > t for t in since),
        "publish": lambda c, v: has_port(c, v, True),
        "expose": lambda c, v: has_port(c, v, False),
        "volume": lambda c, v: any(v in (m.name, m.source, m.destination) for m in c.mounts),
    }

    def keep(c: Container) -> bool:
        # Labels must all match (moby filters.MatchKVList); other keys match any value.
        return all(
            (all if k == "label" else any)(checks[k](c, v) for v in vs)
            for k, vs in filters.items()
            if vs
        )

    return keep
