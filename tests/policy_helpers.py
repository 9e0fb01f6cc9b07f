"""What the events, restart and health tests share: a pyengined of their own (names pyek*,
subnets in 10.191.0.0/16) driven by the docker CLI 28 at API 1.47, and bounded waits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests import dockercli
from tests.dockercli import DockerCli

API_VERSION = "1.47"


class Docker(DockerCli):
    """The docker CLI at API 1.47, with the events reader the policy tests use."""

    def events(self, since: float, until: float, *args: str) -> list[dict[str, Any]]:
        out = self(
            "events",
            "--since",
            f"{since:.3f}",
            "--until",
            f"{until:.3f}",
            "--format",
            "{{json .}}",
            *args,
            timeout=30,
            check=True,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def docker_daemon(
    tmp: Path, name: str, bip: str, archives: list[Path], *extra: str
) -> Iterator[Docker]:
    """A started pyengined with ``archives`` loaded; stopped and checked clean afterwards."""
    yield from dockercli.docker_daemon(tmp, name, bip, archives, Docker, *extra)


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1
) -> Any:
    """``check()``'s first true value within ``timeout`` seconds; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
