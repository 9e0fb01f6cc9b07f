"""How a container's restart and health state reads in the API (moby container/state.go)."""

from __future__ import annotations

from typing import Any

from engine.api.common import BadParameter
from engine.lifecycle.containers import ContainerState


def state_json(s: ContainerState) -> dict[str, Any]:
    """``State.Status``, ``Running`` and ``Restarting``: a container waiting to be restarted
    by its policy is ``restarting`` and counts as running, as in Docker."""
    return {
        "Status": "restarting" if s.restarting else s.status,
        "Running": s.running or s.restarting,
        "Restarting": s.restarting,
    }


def health_suffix(health: dict[str, Any]) -> str:
    """What ``docker ps`` shows after "Up ...": `` (healthy)``, `` (health: starting)``."""
    status = health.get("Status") if health else None
    if status == "starting":
        return " (health: starting)"
    if status in ("healthy", "unhealthy"):
        return f" ({status})"
    return ""


HEALTH_FILTER_VALUES = ("starting", "healthy", "unhealthy", "none")


def check_health_filter(values: list[str]) -> None:
    """``docker ps --filter health=...``: Docker's values only (a 400 otherwise)."""
    for value in values:
        if value not in HEALTH_FILTER_VALUES:
            raise BadParameter(f"Unrecognised filter value for health: {value}")
