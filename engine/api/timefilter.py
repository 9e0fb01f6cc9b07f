"""The ``until`` filter of the prune calls: a point in time as Docker's daemon reads it.

Docker (api/types/time GetTimestamp) takes a Go duration (``10m``, ``1h30m``) counted back from
now, a Unix timestamp (``1700000000``, ``1700000000.5``) or an RFC 3339 date or time
(``2024-01-02``, ``2024-01-02T15:04``, ``2024-01-02T15:04:05Z``), local time without a zone.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

from engine.api.common import BadParameter

# Go's time.ParseDuration: a sequence of decimal numbers, each with a unit.
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_GO_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION = re.compile(r"^[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+$")
_UNIX = re.compile(r"^[0-9]{1,12}(?:\.[0-9]{1,9})?$")


def go_duration(text: str) -> float | None:
    """Seconds of a Go duration, or None when ``text`` is not one."""
    if not _GO_DURATION.fullmatch(text):
        return None
    seconds = sum(float(n) * _GO_UNITS[unit] for n, unit in _GO_PART.findall(text))
    return -seconds if text.startswith("-") else seconds


def parse_until(text: str, now: float | None = None) -> float:
    """``text`` as Unix seconds; a 400 naming it when it is neither a duration nor a time."""
    now = time.time() if now is None else now
    duration = go_duration(text)
    if duration is not None:
        return now - duration
    if _UNIX.fullmatch(text):
        return float(text)
    try:
        # fromisoformat reads RFC 3339 with "Z" from Python 3.11; no zone: local time.
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadParameter(f'failed to parse value as time or duration: "{text}"') from None
