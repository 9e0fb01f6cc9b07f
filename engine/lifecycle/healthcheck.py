"""A container's healthcheck (``Config.Healthcheck``) as Docker reads it.

moby api/types/container HealthConfig; daemon/container.go validateHealthCheck (the
messages); daemon/commit.go merge (the container's fields override the image's); daemon/
health.go (the defaults: 30 s interval and timeout, 3 retries, 5 s start interval).
Durations are nanoseconds in the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NS = 1_000_000_000
MINIMUM_NS = 1_000_000  # 1 ms: Docker's MinimumDuration
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_START_INTERVAL = 5.0
DEFAULT_RETRIES = 3
DURATIONS = ("Interval", "Timeout", "StartPeriod", "StartInterval")


def check(raw: Any) -> None:
    """A create's ``Config.Healthcheck`` (types already checked): a ValueError with Docker's
    message when a duration is below 1 ms (0 means the default) or Retries is negative."""
    if not isinstance(raw, dict):
        return
    for key in DURATIONS:
        value = raw.get(key) or 0
        if value != 0 and value < MINIMUM_NS:
            raise ValueError(f"{key} in Healthcheck cannot be less than 1ms")
    if (raw.get("Retries") or 0) < 0:
        raise ValueError("Retries in Healthcheck cannot be negative")
    test = raw.get("Test") or []
    if test and test[0] not in ("NONE", "CMD", "CMD-SHELL"):
        raise ValueError(f"unknown healthcheck type {test[0]!r} (want NONE, CMD or CMD-SHELL)")
    if test and test[0] in ("CMD", "CMD-SHELL") and len(test) < 2:
        raise ValueError(f"healthcheck {test[0]} needs a command")


def merge(container: Any, image: Any) -> dict[str, Any] | None:
    """The container's healthcheck over the image's: an empty Test and zero fields are
    taken from the image (moby daemon/commit.go merge)."""
    if not isinstance(image, dict) or not image:
        return dict(container) if isinstance(container, dict) and container else None
    if not isinstance(container, dict) or not container:
        return dict(image)
    out = dict(container)
    if not out.get("Test"):
        out["Test"] = image.get("Test")
    for key in (*DURATIONS, "Retries"):
        if not out.get(key):
            out[key] = image.get(key) or 0
    return out


@dataclass(frozen=True)
class Healthcheck:
    argv: list[str]
    interval: float
    timeout: float
    retries: int
    start_period: float
    start_interval: float

    @classmethod
    def of(cls, config: dict[str, Any]) -> Healthcheck | None:
        """The probe a container's (merged) config asks for; None: no healthcheck."""
        raw = config.get("Healthcheck")
        if not isinstance(raw, dict):
            return None
        test = [str(t) for t in raw.get("Test") or []]
        if not test or test[0] == "NONE" or len(test) < 2:
            return None
        if test[0] == "CMD-SHELL":
            argv = ["/bin/sh", "-c", " ".join(test[1:])]
        elif test[0] == "CMD":
            argv = test[1:]
        else:
            return None

        def seconds(key: str, default: float) -> float:
            value = raw.get(key) or 0
            return value / NS if isinstance(value, int) and value > 0 else default

        retries = raw.get("Retries") or 0
        return cls(
            argv=argv,
            interval=seconds("Interval", DEFAULT_INTERVAL),
            timeout=seconds("Timeout", DEFAULT_TIMEOUT),
            retries=retries if isinstance(retries, int) and retries > 0 else DEFAULT_RETRIES,
            start_period=seconds("StartPeriod", 0.0),
            start_interval=seconds("StartInterval", DEFAULT_START_INTERVAL),
        )
