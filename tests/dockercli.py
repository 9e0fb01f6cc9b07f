"""The real docker CLI (28) driving a test pyengined: what the tests that speak Docker share."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import Daemon, assert_nothing_left, require, start_daemon, stop_daemon

DOCKER = Path("/usr/local/bin/docker")  # the docker CLI 28.2.2


@dataclass
class DockerCli:
    """``docker ARGS`` against ``daemon`` at ``api_version``, with a config dir of its own."""

    daemon: Daemon
    config_dir: Path
    api_version: str = "1.47"
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(
            DOCKER_HOST=self.daemon.host,
            DOCKER_CONFIG=str(self.config_dir),
            DOCKER_API_VERSION=self.api_version,
            **self.extra_env,
        )
        return env

    def __call__(
        self, *args: str, check: bool = False, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(DOCKER), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=self.env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def inspect(self, ref: str) -> dict[str, Any]:
        return json.loads(self("inspect", ref, check=True).stdout)[0]  # type: ignore[no-any-return]

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, check=True).stdout)

    def cleanup(self) -> None:
        """Remove every container of the daemon."""
        for cid in self("ps", "-a", "-q").stdout.split():
            self("rm", "-f", cid)


C = TypeVar("C", bound=DockerCli)


def docker_daemon(
    tmp: Path,
    name: str,
    bip: str,
    archives: Sequence[Path],
    cli_type: type[C],
    *extra: str,
    userland_proxy: bool = True,
) -> Iterator[C]:
    """For a module fixture (``yield from``): a pyengined named ``name`` with ``archives``
    loaded and a docker CLI for it; afterwards its containers removed, the daemon stopped and
    checked clean."""
    require(DOCKER.exists(), f"needs the docker CLI at {DOCKER}")
    daemon = start_daemon(tmp, name, bip, userland_proxy, *extra)
    cli = cli_type(daemon, tmp / "docker-config")
    try:
        for archive in archives:
            cli("load", "-i", str(archive), check=True)
        yield cli
    finally:
        cli.cleanup()
        stop_daemon(cli.daemon)  # a test may have restarted it: the latest one
    assert_nothing_left(cli.daemon)
