"""``pyengine events``: the daemon's events, as ``docker events`` prints them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import click

from client.command import daemon_client, daemon_errors, fail
from client.http import Client

_FIELD = re.compile(r"\{\{\s*(json\s+)?\.([A-Za-z0-9_.]*)\s*\}\}")


def stream_events(
    client: Client, since: str | None, until: str | None, filters: dict[str, list[str]]
) -> Iterator[dict[str, Any]]:
    query: dict[str, Any] = {"since": since, "until": until}
    if filters:
        query["filters"] = json.dumps(filters)
    resp = client.request("GET", "/events", query=query, timeout=None)
    for line in resp:
        if line.strip():
            yield json.loads(line)


def default_line(event: dict[str, Any]) -> str:
    """``2024-01-02T03:04:05.123456789Z container start <id> (image=busybox, name=x)``."""
    nanos = int(event.get("timeNano") or int(event.get("time") or 0) * 10**9)
    seconds, fraction = divmod(nanos, 10**9)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    text = f"{stamp}.{fraction:09d}Z {event.get('Type')} {event.get('Action')} {actor.get('ID')}"
    if attributes:
        text += " (" + ", ".join(f"{k}={v}" for k, v in sorted(attributes.items())) + ")"
    return text


def formatted(template: str, event: dict[str, Any]) -> str:
    """A Go template's ``{{.Field.Sub}}`` and ``{{json .X}}`` parts (all this client knows)."""

    def value(match: re.Match[str]) -> str:
        node: Any = event
        for part in filter(None, match.group(2).split(".")):
            node = node.get(part) if isinstance(node, dict) else None
        if match.group(1):
            return json.dumps(node, separators=(",", ":"))
        return "" if node is None else str(node)

    return _FIELD.sub(value, template)


def parse_filter(specs: tuple[str, ...]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            fail(f"pyengine: bad format of filter (expected name=value): {spec}", 125)
        filters.setdefault(key, []).append(value)
    return filters


@click.command()
@click.option("--since", default=None, help="Show events since (timestamp or duration).")
@click.option("--until", default=None, help="Stream events until (timestamp or duration).")
@click.option("-f", "--filter", "filters", multiple=True, help="KEY=VALUE (type, event, ...).")
@click.option("--format", "template", default=None, help="A template such as '{{json .}}'.")
@click.pass_context
@daemon_errors()
def events(
    ctx: click.Context,
    since: str | None,
    until: str | None,
    filters: tuple[str, ...],
    template: str | None,
) -> None:
    """Show the daemon's events as they happen (^C ends it)."""
    client = daemon_client(ctx)
    wanted = parse_filter(filters)
    try:
        for event in stream_events(client, since, until, wanted):
            if template is None:
                line = default_line(event)
            elif template.strip() == "json":
                line = json.dumps(event, separators=(",", ":"))
            else:
                line = formatted(template, event)
            click.echo(line)
    except KeyboardInterrupt:
        return


COMMANDS = (events,)
