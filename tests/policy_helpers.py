"""What the events, restart and health tests share: a pyengined of their own (names pyek*,
subnets in 10.191.0.0/16) driven by the docker CLI 28 at API 1.47, and bounded waits."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, assert_nothing_left, require, start_daemon, stop_daemon

DOCKER = Path("/usr/local/bin/docker")  # the docker CLI 28.2.2
API_VERSION = "1.47"


@dataclass
class Docker:
    daemon: Daemon
    config_dir: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(
            DOCKER_HOST=self.daemon.host,
            DOCKER_CONFIG=str(self.config_dir),
            DOCKER_API_VERSION=API_VERSION,
        )
        return env

    def __call__(
        self, *args: str, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(DOCKER), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=self.env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def inspect(self, ref: str) -> dict[str, Any]:
        return json.loads(self("inspect", ref, check=True).stdout)[0]

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

    def cleanup(self) -> None:
        for cid in self("ps", "-a", "-q").stdout.split():
            self("rm", "-f", cid)


def docker_daemon(
    tmp: Path, name: str, bip: str, archives: list[Path], *extra: str
) -> Iterator[Docker]:
    """A started pyengined with ``archives`` loaded; stopped and checked clean afterwards."""
    require(DOCKER.exists(), f"needs the docker CLI at {DOCKER}")
    daemon = start_daemon(tmp, name, bip, True, *extra)
    docker = Docker(daemon, tmp / "docker-config")
    try:
        for archive in archives:
            docker("load", "-i", str(archive), check=True)
        yield docker
    finally:
        docker.cleanup()
        stop_daemon(docker.daemon)
    assert_nothing_left(docker.daemon)


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
