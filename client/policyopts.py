"""``run``/``create`` options for what the daemon does with a running container on its own:
``--restart`` and the healthcheck flags (the docker CLI's spelling and messages)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from client.command import fail

KEYS = (
    "restart",
    "health_cmd",
    "health_interval",
    "health_timeout",
    "health_retries",
    "health_start_period",
    "no_healthcheck",
)
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9}
_UNITS["h"] = 3600 * 10**9
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")


def duration_ns(text: str, flag: str) -> int:
    """A Go duration (``1s``, ``500ms``, ``1m30s``) in nanoseconds; exit 125 otherwise."""
    parts = _PART.findall(text)
    if text == "0":
        return 0
    if not parts or "".join(n + u for n, u in parts) != text:
        fail(f'invalid argument "{text}" for "{flag}" flag: time: invalid duration "{text}"', 125)
    return int(sum(float(n) * _UNITS[u] for n, u in parts))


def restart_policy(text: str) -> dict[str, Any]:
    """``no``, ``always``, ``unless-stopped``, ``on-failure[:N]`` (the daemon checks the
    name and the count)."""
    name, sep, count = text.partition(":")
    if not sep:
        return {"Name": name, "MaximumRetryCount": 0}
    if not count.lstrip("-").isdigit():
        fail("pyengine: maximum retry count must be an integer", 125)
    return {"Name": name, "MaximumRetryCount": int(count)}


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--restart",
                default=None,
                help="Restart policy: no, always, unless-stopped, on-failure[:max-retries].",
            ),
            click.option("--health-cmd", default=None, help="Command to run to check health."),
            click.option("--health-interval", default=None, help="Time between checks (1s)."),
            click.option("--health-timeout", default=None, help="Maximum time of one check."),
            click.option(
                "--health-retries", type=int, default=None, help="Failures to be unhealthy."
            ),
            click.option(
                "--health-start-period",
                default=None,
                help="Time before failures count while it starts.",
            ),
            click.option("--no-healthcheck", is_flag=True, help="Disable any HEALTHCHECK."),
        ]
    ):
        fn = option(fn)
    return fn


def pop_policy_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take this module's options out of a command's keyword arguments."""
    return {key: options.pop(key, None) for key in KEYS}


def apply_policy_options(config: dict[str, Any], opts: dict[str, Any]) -> None:
    """Put the restart policy and the healthcheck into a create body."""
    host_config = config.setdefault("HostConfig", {})
    if opts.get("restart"):
        if host_config.get("AutoRemove") or opts.get("auto_remove"):
            fail("pyengine: conflicting options: cannot specify both --restart and --rm", 125)
        host_config["RestartPolicy"] = restart_policy(opts["restart"])
    health: dict[str, Any] = {}
    if opts.get("health_cmd"):
        health["Test"] = ["CMD-SHELL", opts["health_cmd"]]
    for key, flag, field in (
        ("health_interval", "--health-interval", "Interval"),
        ("health_timeout", "--health-timeout", "Timeout"),
        ("health_start_period", "--health-start-period", "StartPeriod"),
    ):
        if opts.get(key):
            health[field] = duration_ns(opts[key], flag)
    if opts.get("health_retries") is not None:
        health["Retries"] = opts["health_retries"]
    if opts.get("no_healthcheck"):
        if health:
            fail("pyengine: --no-healthcheck conflicts with --health-* options", 125)
        health = {"Test": ["NONE"]}
    if health:
        config["Healthcheck"] = health
