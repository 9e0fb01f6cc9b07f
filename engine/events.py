"""The daemon's event bus: what ``GET /events`` streams (``docker events``).

Every component that changes something a client may watch (containers, networks, images,
volumes) emits one :class:`Event` here. The bus keeps the last ``HISTORY`` events, as moby's
``daemon/events`` does (its ``eventsLimit``), so ``since`` can replay them, and hands each
live event to every subscriber through a bounded queue: a subscriber that does not read is
cut off (its stream ends) rather than letting its queue grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

HISTORY = 1024
QUEUE_SIZE = 1024
TYPES = ("container", "network", "image", "volume", "daemon")


@dataclass(frozen=True)
class Event:
    type: str  # one of TYPES
    action: str  # "start", "die", "health_status: healthy", ...
    actor_id: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    time_nano: int = field(default_factory=time.time_ns)
    scope: str = "local"

    def to_json(self) -> dict[str, object]:
        """The message shape of API ≥ 1.22, with the older top-level fields Docker still
        sends for containers and images (``status``, ``id``, ``from``)."""
        out: dict[str, object] = {}
        if self.type in ("container", "image"):
            out["status"] = self.action
            out["id"] = self.actor_id
            if "image" in self.attributes and self.type == "container":
                out["from"] = self.attributes["image"]
        out.update(
            {
                "Type": self.type,
                "Action": self.action,
                "Actor": {"ID": self.actor_id, "Attributes": dict(self.attributes)},
                "scope": self.scope,
                "time": self.time_nano // 1_000_000_000,
                "timeNano": self.time_nano,
            }
        )
        return out


class Subscription:
    """One reader of the bus: ``await get()`` returns the next event, or ``None`` once the
    subscription is closed (by the reader, by the bus when the reader fell too far behind,
    or when the daemon shuts down)."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.closed = False
        self.overflowed = False

    def _offer(self, event: Event) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Make room for the end marker: a reader blocked in get() must wake up.
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()

    async def get(self) -> Event | None:
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    def close(self) -> None:
        self._bus._subscribers.discard(self)
        self._end()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._history: collections.deque[Event] = collections.deque(maxlen=HISTORY)
        self._subscribers: set[Subscription] = set()

    def emit(
        self,
        type: str,
        action: str,
        actor_id: str,
        attributes: Mapping[str, str] | None = None,
    ) -> Event:
        event = Event(type, action, actor_id, dict(attributes or {}))
        self._history.append(event)
        for sub in list(self._subscribers):
            sub._offer(event)
            if sub.closed:
                self._subscribers.discard(sub)
        return event

    def subscribe(self) -> tuple[list[Event], Subscription]:
        """The events kept so far and a subscription to every later one, taken together (the
        loop is single-threaded: no event can fall between the two)."""
        sub = Subscription(self)
        self._subscribers.add(sub)
        return list(self._history), sub

    def close(self) -> None:
        """The daemon shuts down: every open stream ends."""
        for sub in list(self._subscribers):
            sub.close()
