"""Restart policies (``HostConfig.RestartPolicy``) as Docker reads them, and its back-off.

moby daemon/container.go validateRestartPolicy (the messages), restartmanager (the decision
and the delay: 100 ms doubling to one minute, back to 100 ms after a run of 10 s or more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NAMES = ("no", "always", "unless-stopped", "on-failure")
FIRST_DELAY = 0.1
MAX_DELAY = 60.0
RESET_AFTER = 10.0  # seconds of running that reset the back-off
AUTO_REMOVE_CONFLICT = "can't create 'AutoRemove' container with restart policy"


@dataclass(frozen=True)
class RestartPolicy:
    name: str = "no"
    maximum_retry_count: int = 0

    @classmethod
    def parse(cls, raw: Any) -> RestartPolicy:
        """``HostConfig.RestartPolicy`` (types already checked); a ValueError with Docker's
        message when it is not a valid policy."""
        raw = raw if isinstance(raw, dict) else {}
        name = raw.get("Name") or "no"
        count = raw.get("MaximumRetryCount") or 0
        if not isinstance(name, str) or not isinstance(count, int):
            raise ValueError("invalid restart policy")
        if name in ("no", "always", "unless-stopped"):
            if count != 0:
                message = (
                    "invalid restart policy: maximum retry count can only be used with 'on-failure'"
                )
                if count < 0:
                    message += " and cannot be negative"
                raise ValueError(message)
        elif name == "on-failure":
            if count < 0:
                raise ValueError("invalid restart policy: maximum retry count cannot be negative")
        else:
            raise ValueError(
                f"invalid restart policy: unknown policy '{name}'; use one of 'no', 'always', "
                "'on-failure', or 'unless-stopped'"
            )
        return cls(name, count)

    @classmethod
    def of(cls, host_config: dict[str, Any]) -> RestartPolicy:
        """The policy a record holds; one that no longer parses counts as ``no``."""
        try:
            return cls.parse(host_config.get("RestartPolicy"))
        except ValueError:
            return cls()

    @property
    def none(self) -> bool:
        return self.name == "no"

    def should_restart(self, exit_code: int, manually_stopped: bool, restarts: int) -> bool:
        """After a run that ended: ``restarts`` counts the restarts since the last start by a
        client (restartmanager.ShouldRestart)."""
        if manually_stopped:
            return False
        if self.name in ("always", "unless-stopped"):
            return True
        if self.name == "on-failure":
            limit = self.maximum_retry_count
            return exit_code != 0 and (limit == 0 or restarts < limit)
        return False

    def on_daemon_start(self, manually_stopped: bool, exit_code: int) -> bool:
        """Whether a container that is not running is started when the daemon starts:
        ``always`` ones even after a stop by a client (Docker's difference between
        ``always`` and ``unless-stopped``); ``on-failure`` ones that failed by themselves."""
        if self.name == "always":
            return True
        if manually_stopped:
            return False
        return self.name == "unless-stopped" or (self.name == "on-failure" and exit_code != 0)


def check_host_config(host_config: dict[str, Any]) -> None:
    """A create's (or update's) policy: a ValueError with Docker's message when invalid."""
    policy = RestartPolicy.parse(host_config.get("RestartPolicy"))
    if host_config.get("AutoRemove") and not policy.none:
        raise ValueError(AUTO_REMOVE_CONFLICT)


@dataclass
class Backoff:
    """One container's restart manager: the restarts since a client last started it and
    the delay before the next."""

    restarts: int = 0
    delay: float = 0.0

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= RESET_AFTER:
            self.delay = 0.0
        self.delay = FIRST_DELAY if self.delay == 0 else min(self.delay * 2, MAX_DELAY)
        return self.delay
