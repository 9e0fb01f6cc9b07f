"""What the publishing study checks of a dockerd's userland proxies, beyond the common figures.

For both proxy-mode dockerd rows (``dockerd+docker-proxy``, ``dockerd+pyengine-proxy``):

- the proxies' own Pss (docker-proxy processes; or launchers + host server + forked proxies),
  apart from containerd and its shims, which both rows share;
- every port answering a connect() on ::1 too (dockerd 20.10 publishes a wildcard port on
  ``0.0.0.0`` and on ``::``, one proxy each);
- the proxy processes still running after ``rm -f`` (expected 0);
- once per daemon, a UDP echo published through the proxies and asked on 127.0.0.1 and ::1.

For the launcher's row only: its host server killed with SIGKILL while the ports are published,
then every port and the HTTP sample probed again (the proxies outlive the server).
"""

from __future__ import annotations

import time

from bench import dockerproxies
from bench.daemons import BenchDaemon, Publish
from bench.dockerd import DockerDaemon
from bench.httpprobe import count_connecting, probe
from bench.results import Sample
from client.http import DaemonError, DaemonUnreachable

HTTP_TIMEOUT_SECONDS = 10.0


def proxied_dockerd(daemon: BenchDaemon) -> DockerDaemon | None:
    """``daemon`` when it is a dockerd in proxy mode, else None."""
    if isinstance(daemon, DockerDaemon) and daemon.userland_proxy:
        return daemon
    return None


def footprint(daemon: DockerDaemon) -> dict[str, float | None]:
    """The proxies' Pss alone and their count, while the ports are published."""
    found = daemon.proxy_processes()
    return {
        "proxies_pss_mib": dockerproxies.pss_mib(found.all),
        "proxy_processes": float(len(found.all)),
    }


def after_server_kill(
    daemon: DockerDaemon, ports: list[int], sample_ports: list[int]
) -> dict[str, float | None]:
    """SIGKILL the launcher's host server, then every port (connect, both families) and the
    HTTP sample again."""
    runtime_dir = daemon.proxy_runtime_dir
    assert runtime_dir is not None
    killed = dockerproxies.kill_servers(daemon.process.pid, daemon.proxy_binary, runtime_dir)
    return {
        "servers_killed": float(killed),
        "answering_after_server_kill": float(count_connecting("127.0.0.1", ports)),
        "answering6_after_server_kill": float(count_connecting("::1", ports)),
        "http_ok_after_server_kill": float(
            sum(probe("127.0.0.1", p, HTTP_TIMEOUT_SECONDS) == "ok" for p in sample_ports)
        ),
    }


def proxies_left(daemon: DockerDaemon) -> float:
    return float(
        dockerproxies.wait_none_left(
            daemon.process.pid, daemon.proxy_binary, daemon.proxy_runtime_dir
        )
    )


def udp_loopback(daemon: DockerDaemon, port: int, image: str = "nginx") -> Sample:
    """One container with a UDP echo published on ``port`` (every address), one datagram
    asked through 127.0.0.1 and one through ::1; the proxies gone after ``rm -f``."""
    params = {"ports": 1, "mode": daemon.mode, "backend": daemon.backend, "proto": "udp"}
    sample = Sample("publish", "udp-echo", daemon.label, 0, params=params, started=time.time())
    t0 = time.monotonic()
    container_id = ""
    try:
        publish = [Publish(port, dockerproxies.UDP_CONTAINER_PORT, "udp")]
        container_id = daemon.create(image, publish, cmd=dockerproxies.UDP_ECHO_COMMAND)
        daemon.start_published(container_id, 120)
        ok4 = dockerproxies.udp_echo("127.0.0.1", port, b"four")
        ok6 = dockerproxies.udp_echo("::1", port, b"six")
        daemon.remove(container_id)
        container_id = ""
        sample.values = {
            "udp_echo_127": float(ok4),
            "udp_echo_v6": float(ok6),
            "proxies_left": proxies_left(daemon),
        }
    except (DaemonError, DaemonUnreachable, TimeoutError) as exc:
        sample.error = f"{daemon.program}: {exc or 'no answer'}"
    finally:
        if container_id:
            try:
                daemon.remove(container_id)
            except (DaemonError, DaemonUnreachable) as exc:
                sample.error = sample.error or f"rm -f: {exc}"
    sample.wall_s = round(time.monotonic() - t0, 3)
    return sample
