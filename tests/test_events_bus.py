"""engine.events: the bus behind GET /events (its ordering, history and bounds).

The stream itself is tested through the real daemon with the docker CLI and docker-py."""

from __future__ import annotations

import asyncio

from engine import events


def test_history_then_live_in_order() -> None:
    async def run() -> list[str]:
        bus = events.EventBus()
        bus.emit("container", "create", "a")
        history, sub = bus.subscribe()
        bus.emit("container", "start", "a")
        sub.close()
        seen = [e.action for e in history]
        while (e := await sub.get()) is not None:
            seen.append(e.action)
        return seen

    assert asyncio.run(run()) == ["create", "start"]


def test_history_is_bounded() -> None:
    bus = events.EventBus()
    for i in range(events.HISTORY + 10):
        bus.emit("network", "create", str(i))
    history, _ = bus.subscribe()
    assert len(history) == events.HISTORY
    assert history[0].actor_id == "10"


def test_slow_subscriber_is_cut_off_not_grown() -> None:
    async def run() -> tuple[bool, int]:
        bus = events.EventBus()
        _, sub = bus.subscribe()
        for i in range(events.QUEUE_SIZE + 5):
            bus.emit("image", "tag", str(i))
        got = 0
        while await sub.get() is not None:
            got += 1
        return sub.overflowed, got

    overflowed, got = asyncio.run(run())
    assert overflowed
    assert got < events.QUEUE_SIZE


def test_message_shape() -> None:
    e = events.Event("container", "die", "abc", {"image": "busybox", "exitCode": "3"})
    j = e.to_json()
    assert j["Type"] == "container" and j["Action"] == "die"
    assert j["Actor"] == {"ID": "abc", "Attributes": {"image": "busybox", "exitCode": "3"}}
    assert j["status"] == "die" and j["id"] == "abc" and j["from"] == "busybox"
    assert j["time"] == e.time_nano // 1_000_000_000
