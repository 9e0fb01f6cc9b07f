"""Times as the Docker API and its files spell them: RFC 3339, written in UTC with a "Z".

Each writer keeps its own precision: 9 fraction digits for the json-file log and exit times
(Docker's ``time.RFC3339Nano`` with trailing zeros kept), 6 for creation times, none for
image configs and benchmark records.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

# Go's zero time.Time, which Docker prints for a time that was never set.
ZERO_TIME = "0001-01-01T00:00:00Z"

_RFC3339_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


def utc_rfc3339(ns: int | None = None, *, digits: int = 9) -> str:
    """Now (or ``ns`` nanoseconds after the epoch) in UTC with ``digits`` (0 to 9) fraction
    digits, truncated, never rounded: '2026-11-28T03:24:19.885608112Z'."""
    if ns is None:
        ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if digits:
        text += "." + f"{fraction:09d}"[:digits]
    return text + "Z"


def local_rfc3339() -> str:
    """Now in local time with microseconds and a numeric offset, as Docker's SystemTime."""
    return datetime.now().astimezone().isoformat(timespec="microseconds")


def _parse(text: str) -> tuple[int, str] | None:
    """Whole Unix seconds and the fraction digits ("" when none) of an RFC 3339 time in UTC
    ("Z") or with a numeric offset; None when ``text`` is not one."""
    match = _RFC3339_RE.fullmatch(text.strip())
    if match is None:
        return None
    offset = "+00:00" if match[3] == "Z" else match[3]
    return int(datetime.fromisoformat(match[1] + offset).timestamp()), match[2] or ""


def unix_seconds(text: str) -> int:
    """RFC 3339 (any number of fraction digits) → whole Unix seconds; 0 when unparsable."""
    parsed = _parse(text)
    return 0 if parsed is None else parsed[0]


def unix_time(text: str) -> float:
    """RFC 3339 → Unix seconds with the fraction; 0.0 when unparsable."""
    parsed = _parse(text)
    if parsed is None:
        return 0.0
    return parsed[0] + float(f"0.{parsed[1] or 0}")
