"""common.timefmt: the RFC 3339 spellings of the API and the state files, and their parsing."""

from __future__ import annotations

from datetime import UTC, datetime

from common.timefmt import ZERO_TIME, local_rfc3339, unix_seconds, unix_time, utc_rfc3339

NS = 1_700_000_000_123_456_789


def test_rfc3339_nano_format() -> None:
    assert utc_rfc3339(0) == "1970-01-01T00:00:00.000000000Z"
    assert utc_rfc3339(NS) == "2023-11-14T22:13:20.123456789Z"


def test_fraction_digits_are_truncated() -> None:
    assert utc_rfc3339(NS, digits=6) == "2023-11-14T22:13:20.123456Z"
    assert utc_rfc3339(NS + 999_000_000, digits=0) == "2023-11-14T22:13:21Z"
    assert utc_rfc3339(1_700_000_000_999_999_999, digits=0) == "2023-11-14T22:13:20Z"


def test_now_matches_datetime_spelling() -> None:
    before = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    text = utc_rfc3339(digits=6)
    after = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert before <= text[:19] <= after
    assert len(text) == len("2023-11-14T22:13:20.123456Z") and text.endswith("Z")
    local = datetime.fromisoformat(local_rfc3339())
    assert local.utcoffset() is not None and local.microsecond >= 0


def test_parse() -> None:
    assert unix_seconds(utc_rfc3339(NS)) == 1_700_000_000
    assert unix_time(utc_rfc3339(NS)) == 1_700_000_000 + 0.123456789
    assert unix_seconds("2023-11-14T23:13:20.5+01:00") == 1_700_000_000
    assert unix_seconds(ZERO_TIME) == -62135596800
    for bad in ("", "yesterday", "2023-11-14 22:13:20Z", "2023-11-14T22:13:20"):
        assert unix_seconds(bad) == 0 and unix_time(bad) == 0.0
