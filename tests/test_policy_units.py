"""The parts of events, restart policies and healthchecks that need no daemon: Docker's event
filters, the policy checks and back-off, the healthcheck merge and checks."""

from __future__ import annotations

import json

import pytest

from engine.api.create import parse_create_body
from engine.api.events import EventFilter
from engine.api.version import ApiVersion
from engine.events import Event
from engine.lifecycle.healthcheck import Healthcheck, check, merge
from engine.lifecycle.restartpolicy import (
    AUTO_REMOVE_CONFLICT,
    MAX_DELAY,
    Backoff,
    RestartPolicy,
    check_host_config,
)
from engine.runtime.probe import go_duration_text

CID = "ab" * 32


def _container(action: str, **attributes: str) -> Event:
    return Event("container", action, CID, {"name": "web", "image": "nginx:1.25", **attributes})


def test_event_filters_as_docker() -> None:
    ev = _container("health_status: healthy", tier="front")
    assert EventFilter({}).includes(ev)
    assert EventFilter({"event": ["health_status"]}).includes(ev)  # moby #25798
    assert not EventFilter({"event": ["health"]}).includes(ev)
    assert not EventFilter({"event": ["start"]}).includes(ev)
    assert EventFilter({"container": ["web"]}).includes(ev)
    assert EventFilter({"container": [CID[:12]]}).includes(ev)
    assert not EventFilter({"container": ["db"]}).includes(ev)
    assert EventFilter({"image": ["nginx"]}).includes(ev)
    assert EventFilter({"image": ["nginx:1.25"]}).includes(ev)
    assert not EventFilter({"image": ["nginx:1.24"]}).includes(ev)
    assert EventFilter({"label": ["tier"]}).includes(ev)
    assert EventFilter({"label": ["tier=front", "name=web"]}).includes(ev)
    assert not EventFilter({"label": ["tier=back"]}).includes(ev)
    assert EventFilter({"type": ["container", "network"]}).includes(ev)
    assert not EventFilter({"type": ["network"]}).includes(ev)
    assert not EventFilter({"network": ["bridge"]}).includes(ev)
    assert EventFilter({"scope": ["local"]}).includes(ev)
    assert not EventFilter({"scope": ["swarm"]}).includes(ev)
    assert not EventFilter({"service": ["x"]}).includes(ev)
    net = Event("network", "connect", "cd" * 32, {"name": "front", "container": CID})
    assert EventFilter({"network": ["front"]}).includes(net)
    assert not EventFilter({"container": ["web"]}).includes(net)


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"Name": "sometimes"}, "unknown policy 'sometimes'"),
        ({"Name": "always", "MaximumRetryCount": 2}, "can only be used with 'on-failure'"),
        ({"Name": "no", "MaximumRetryCount": -1}, "and cannot be negative"),
        ({"Name": "on-failure", "MaximumRetryCount": -1}, "maximum retry count cannot be"),
    ],
)
def test_bad_restart_policies(policy: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RestartPolicy.parse(policy)


def test_restart_decisions_and_backoff() -> None:
    assert RestartPolicy.parse(None) == RestartPolicy("no", 0)
    assert RestartPolicy.parse({"Name": ""}).none
    with pytest.raises(ValueError, match=AUTO_REMOVE_CONFLICT):
        check_host_config({"AutoRemove": True, "RestartPolicy": {"Name": "always"}})
    check_host_config({"AutoRemove": True, "RestartPolicy": {"Name": "no"}})
    on_failure = RestartPolicy("on-failure", 2)
    assert on_failure.should_restart(1, False, 0) and on_failure.should_restart(1, False, 1)
    assert not on_failure.should_restart(1, False, 2)
    assert not on_failure.should_restart(0, False, 0)
    assert RestartPolicy("on-failure", 0).should_restart(1, False, 1000)
    assert RestartPolicy("always").should_restart(0, False, 99)
    assert not RestartPolicy("always").should_restart(0, True, 0)
    assert RestartPolicy("always").on_daemon_start(True, 0)
    assert not RestartPolicy("unless-stopped").on_daemon_start(True, 0)
    assert RestartPolicy("unless-stopped").on_daemon_start(False, 0)
    backoff = Backoff()
    delays = [backoff.next_delay(0.5) for _ in range(12)]
    assert delays[:3] == [0.1, 0.2, 0.4] and delays[-1] == MAX_DELAY
    assert backoff.next_delay(10.0) == 0.1  # a run of 10 s resets it


def test_healthcheck_checks_and_merge() -> None:
    for raw, message in (
        ({"Interval": 999_999}, "Interval in Healthcheck cannot be less than 1ms"),
        ({"StartInterval": 1}, "StartInterval in Healthcheck cannot be less than 1ms"),
        ({"Retries": -1}, "Retries in Healthcheck cannot be negative"),
    ):
        with pytest.raises(ValueError, match=message):
            check(raw)
    check({"Interval": 0, "Timeout": 1_000_000, "Test": ["NONE"]})
    image = {"Test": ["CMD", "true"], "Interval": 5_000_000_000, "Retries": 2}
    assert merge(None, image) == image
    assert merge({"Retries": 7}, image) == {**image, "Retries": 7, "Timeout": 0} | {
        "StartPeriod": 0,
        "StartInterval": 0,
    }
    assert merge({"Test": ["NONE"]}, image)["Test"] == ["NONE"]
    assert merge(None, None) is None
    hc = Healthcheck.of({"Healthcheck": {"Test": ["CMD-SHELL", "exit 0"]}})
    assert hc is not None and hc.argv == ["/bin/sh", "-c", "exit 0"]
    assert (hc.interval, hc.timeout, hc.retries, hc.start_interval) == (30.0, 30.0, 3, 5.0)
    assert Healthcheck.of({"Healthcheck": {"Test": ["NONE"]}}) is None
    assert Healthcheck.of({}) is None
    assert [go_duration_text(s) for s in (0.5, 30, 90)] == ["500ms", "30s", "1m30s"]


def test_start_interval_is_1_44s() -> None:
    body = {"Image": "busybox", "Healthcheck": {"Test": ["CMD", "true"], "StartInterval": 10**7}}
    old = parse_create_body(json.loads(json.dumps(body)), ApiVersion.parse("1.43"))
    assert "StartInterval" not in old.config["Healthcheck"]
    new = parse_create_body(json.loads(json.dumps(body)), ApiVersion.parse("1.44"))
    assert new.config["Healthcheck"]["StartInterval"] == 10**7
