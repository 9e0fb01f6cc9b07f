"""``GET /events``: the daemon's events, replayed from the bus's history and then live.

Docker's semantics (moby api/server/router/system getEvents, daemon/events/filter.go):
``since`` and ``until`` are Unix seconds (with a fraction), RFC 3339 times or Go durations
counted back from now; history is replayed only when one of them is set; the stream ends at
``until`` (at once when it has passed). Filters: ``type``, ``scope`` and ``event`` match
exactly (``event=health_status`` matches every health status, as moby #25798);
``container``, ``network`` and ``volume`` match the actor's id or name by prefix; ``image``
matches the image (with or without its tag); ``label`` matches ``key`` or ``key=value``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.api.common import BadParameter, parse_filters
from engine.api.timefilter import parse_until
from engine.events import Event, EventBus, Subscription
from engine.lifecycle.engine import Engine

# moby daemon/events/filter.go acceptedEventFilterTags (swarm's included: they match nothing).
EVENT_FILTERS = {
    "container",
    "image",
    "label",
    "type",
    "event",
    "volume",
    "network",
    "daemon",
    "plugin",
    "scope",
    "node",
    "service",
    "secret",
    "config",
}
# Docker matches these event filters by prefix: their actions carry a suffix.
_FUZZY_EVENTS = {"health_status", "exec_create", "exec_start"}
_SWARM_ONLY = ("plugin", "node", "service", "secret", "config")


def _strip_tag(ref: str) -> str:
    name, _, _ = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


@dataclass
class EventFilter:
    filters: dict[str, list[str]] = field(default_factory=dict)

    def _exact(self, key: str, value: str) -> bool:
        values = self.filters.get(key)
        return not values or value in values

    def _fuzzy(self, key: str, value: str) -> bool:
        values = self.filters.get(key)
        return not values or any(value.startswith(v) for v in values)

    def _named(self, key: str, event: Event) -> bool:
        if not self.filters.get(key):
            return True
        if event.type != key:
            return False
        name = event.attributes.get("name", "")
        return self._fuzzy(key, event.actor_id) or (bool(name) and self._fuzzy(key, name))

    def _event(self, event: Event) -> bool:
        values = self.filters.get("event")
        if not values:
            return True
        if _FUZZY_EVENTS & set(values):
            return any(event.action.startswith(v) for v in values)
        return event.action in values

    def _image(self, event: Event) -> bool:
        if not self.filters.get("image"):
            return True
        name = event.attributes.get("name" if event.type == "image" else "image", "")
        candidates = {event.actor_id, name, _strip_tag(event.actor_id), _strip_tag(name)}
        return any(c and self._exact("image", c) for c in candidates)

    def _labels(self, event: Event) -> bool:
        for want in self.filters.get("label", []):
            key, eq, value = want.partition("=")
            have = event.attributes.get(key)
            if have is None or (eq and have != value):
                return False
        return True

    def includes(self, event: Event) -> bool:
        if any(self.filters.get(key) for key in _SWARM_ONLY):
            return False
        return (
            self._event(event)
            and self._exact("type", event.type)
            and self._exact("scope", event.scope)
            and self._named("container", event)
            and self._named("network", event)
            and self._named("volume", event)
            and self._image(event)
            and self._labels(event)
            and self._daemon(event)
        )

    def _daemon(self, event: Event) -> bool:
        if not self.filters.get("daemon"):
            return True
        return event.type == "daemon" and self._named_value("daemon", event)

    def _named_value(self, key: str, event: Event) -> bool:
        name = event.attributes.get("name", "")
        return self._exact(key, event.actor_id) or self._exact(key, name)


def _time(request: web.Request, key: str, now: float) -> float | None:
    text = request.query.get(key, "")
    return parse_until(text, now) if text else None


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


class EventsApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def bus(self) -> EventBus:
        return self.engine.events

    async def events(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        since = _time(request, "since", now)
        until = _time(request, "until", now)
        if since is not None and until is not None and since > until:
            raise BadParameter(
                f"`since` time ({request.query['since']}) cannot be after `until` time "
                f"({request.query['until']})"
            )
        wanted = EventFilter(parse_filters(request, EVENT_FILTERS))
        history, sub = self.bus.subscribe()
        with sub:
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            try:
                await self._replay(resp, history, wanted, since, until)
                if until is not None and until <= time.time():
                    await resp.write_eof()
                    return resp
                await self._follow(request, resp, sub, wanted, until)
            except ConnectionError:  # the client went away: nothing to answer
                pass
        return resp

    async def _replay(
        self,
        resp: web.StreamResponse,
        history: list[Event],
        wanted: EventFilter,
        since: float | None,
        until: float | None,
    ) -> None:
        """The kept events between ``since`` and ``until``; none when neither is given."""
        if since is None and until is None:
            return
        since_ns = _ns(since) if since is not None else 0
        until_ns = _ns(until) if until is not None else None
        for event in history:
            if event.time_nano < since_ns:
                continue
            if until_ns is not None and event.time_nano > until_ns:
                break
            if wanted.includes(event):
                await self._send(resp, event)

    async def _follow(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        sub: Subscription,
        wanted: EventFilter,
        until: float | None,
    ) -> None:
        transport = request.transport
        while transport is not None and not transport.is_closing():
            timeout = None if until is None else until - time.time()
            if timeout is not None and timeout <= 0:
                break
            try:
                # Wake up now and then to notice a client that went away.
                event = await asyncio.wait_for(sub.get(), min(timeout or 1.0, 1.0))
            except TimeoutError:
                continue
            if event is None:
                break
            if until is not None and event.time_nano > _ns(until):
                break
            if wanted.includes(event):
                await self._send(resp, event)
        if transport is not None and not transport.is_closing():
            await resp.write_eof()

    @staticmethod
    async def _send(resp: web.StreamResponse, event: Event) -> None:
        await resp.write(json.dumps(event.to_json()).encode() + b"\n")

    def routes(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/events", self.events)]
