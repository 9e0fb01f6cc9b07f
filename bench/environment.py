"""Builds what the run measures, registering the undo of each piece as soon as it exists.

external client netns ──veth── engine host (this machine)
                                 ├─ pyengined --userland-proxy=false  (bridge …d)
                                 │    nginx, iperf3 published on 0.0.0.0
                                 ├─ pyengined --userland-proxy=true   (bridge …p)
                                 │    nginx, iperf3 published on 127.0.0.1 (pyengine-proxy)
                                 ├─ docker-proxy ×3 ─┐  started by hand against the
                                 └─ socat ×3 ────────┘  …p daemon's containers
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procfs
from bench.anchors import HandStartedProxy, start_docker_proxy, start_socat
from bench.cleanup import Cleanup
from bench.config import VARIANTS, BenchConfig
from bench.daemons import BenchDaemon, Publish, RunningContainer, start_daemon
from bench.dockerd import DockerDaemon, start_dockerd
from bench.dockerd import leftovers as dockerd_leftovers
from bench.httpprobe import wait_for_200
from bench.images import IPERF3_PORT, build_iperf3_image
from bench.loadgen import WRK_REPORT_SCRIPT, Target
from bench.ports import PortPool
from bench.progress import Progress
from bench.tools import IMAGE_BUILD_TOOLS, TOOLS, find_tools, require_matplotlib
from bench.topology import (
    BRIDGE_CANDIDATES,
    EXTERNAL_CANDIDATES,
    ExternalClient,
    RunNames,
    choose_subnets,
    create_external_client,
    delete_external_client,
    leftovers,
)
from engine.images.build import build_nginx_image

HTTP_PORT = 80
SMALL_BODY_BYTES = 128
LARGE_BODY_BYTES = 1 << 20
SMALL_PATH = "/small.txt"
LARGE_PATH = "/1m.bin"
READY_TIMEOUT_SECONDS = 30
# nginx from the offline image, with the two bodies written at start and the access log off
# (the image logs to stdout, and at tens of thousands of requests a second the container's log
# pipeline would be measured along with the network).
NGINX_COMMAND = [
    "sh",
    "-c",
    f"head -c {LARGE_BODY_BYTES} /dev/zero > /var/www/html{LARGE_PATH}"
    f" && head -c {SMALL_BODY_BYTES} /dev/zero | tr '\\0' x > /var/www/html{SMALL_PATH}"
    " && sed -i 's|access_log [^;]*;|access_log off;|' /etc/nginx/nginx.conf"
    " && exec nginx -g 'daemon off;'",
]


@dataclass
class Servers:
    """The nginx and iperf3 containers of one daemon and the host ports they are published on."""

    daemon: BenchDaemon
    http: RunningContainer
    iperf: RunningContainer
    http_port: int
    iperf_port: int


@dataclass
class Variant:
    name: str
    path: str
    http: Target
    iperf: Target  # TCP and UDP use the same port number
    proxy_pids: list[int] = field(default_factory=list)  # whose CPU is "proxy CPU"
    # role -> pid of each proxy process (for memory): "http", "iperf-tcp", "iperf-udp"
    proxy_roles: dict[str, int] = field(default_factory=dict)


@dataclass
class Environment:
    cfg: BenchConfig
    names: RunNames
    tools: dict[str, str]
    workdir: Path
    ports: PortPool
    wrk_script: Path
    ext: ExternalClient
    daemons: dict[str, BenchDaemon]  # "proxy", "dnat" (nftables): the data-path daemons
    servers: dict[str, Servers]
    hand_proxies: dict[str, list[HandStartedProxy]]
    variants: list[Variant]
    nginx_archive: Path
    extra_daemons: list[BenchDaemon] = field(default_factory=list)
    redo_left: int = 0  # disturbed samples that may still be measured again
    bridge_subnets: list[str] = field(default_factory=list)

    def all_daemons(self) -> list[BenchDaemon]:
        return [*self.daemons.values(), *self.extra_daemons]

    def our_root_pids(self) -> list[int]:
        """Long-running processes of the run (their trees hold every proxy)."""
        pids = [d.process.pid for d in self.all_daemons()]
        pids += [p.pid for group in self.hand_proxies.values() for p in group]
        return pids

    def container_ids(self) -> list[str]:
        ids = []
        for s in self.servers.values():
            ids += [s.http.id, s.iperf.id]
        return ids


def leftovers_after(env: Environment) -> list[str]:
    """What is still there after the clean-up (expected: nothing)."""
    found = leftovers(env.names)
    for group in env.hand_proxies.values():
        for p in group:
            if procfs.live_group_members(p.pid):
                found.append(f"processes of {p.kind} (process group {p.pid})")
    for daemon in env.all_daemons():
        if daemon.process.poll() is None:
            found.append(f"{daemon.program} {daemon.name} (pid {daemon.process.pid})")
        if isinstance(daemon, DockerDaemon):
            found += dockerd_leftovers(daemon.name, daemon.subnet)
    if env.workdir.exists():
        found.append(f"directory {env.workdir}")
    return found


def describe(env: Environment) -> dict[str, object]:
    """Where the run put things, for results.json (and for tests that check the clean-up)."""
    return {
        "workdir": str(env.workdir),
        "external_netns": env.ext.netns,
        "external_host_ip": env.ext.host_ip,
        "daemons": [
            {"name": d.name, "mode": d.mode, "backend": d.backend, "bip": d.bip}
            for d in env.all_daemons()
        ],
        "hand_started": [
            {"kind": p.kind, "proto": p.proto, "host_port": p.host_port, "pid": p.pid}
            for group in env.hand_proxies.values()
            for p in group
        ],
    }


def _image_archives(cfg: BenchConfig, install: bool, progress: Progress) -> tuple[Path, Path]:
    nginx = cfg.image_cache / "nginx-oci.tar"
    iperf3 = cfg.image_cache / "iperf3-oci.tar"
    if not nginx.exists() or not iperf3.exists():
        find_tools(IMAGE_BUILD_TOOLS, install)
    if not nginx.exists():
        progress.note(f"building the nginx image offline -> {nginx} (about 30 s)")
        build_nginx_image(nginx)
    if not iperf3.exists():
        progress.note(f"building the iperf3 image offline -> {iperf3} (about 30 s)")
        build_iperf3_image(iperf3)
    return nginx, iperf3


def _raise_open_file_limit() -> None:
    # The daemons inherit it: 10,000 published ports are 10,000 reserving sockets.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _remove_workdir(workdir: Path) -> None:
    with open("/proc/mounts") as f:
        if any(line.split()[1].startswith(str(workdir) + "/") for line in f):
            raise RuntimeError(f"{workdir} still has mounts; left in place")
    shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(servers: Servers) -> None:
    if not wait_for_200(servers.http.ip, HTTP_PORT, READY_TIMEOUT_SECONDS, SMALL_PATH):
        raise RuntimeError(
            f"nginx in {servers.http.id[:12]} did not answer within {READY_TIMEOUT_SECONDS} s"
        )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not procfs.is_listening("tcp", "0.0.0.0", IPERF3_PORT, in_netns_of=servers.iperf.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"iperf3 in {servers.iperf.id[:12]} is not listening")
        time.sleep(0.05)


def start_servers(
    daemon: BenchDaemon, ports: PortPool, host_ip: str, labels: dict[str, str] | None = None
) -> Servers:
    http_port, iperf_port = ports.one(), ports.one()
    http = daemon.run(
        "nginx", [Publish(http_port, HTTP_PORT, "tcp", host_ip)], NGINX_COMMAND, labels
    )
    iperf = daemon.run(
        "iperf3",
        [
            Publish(iperf_port, IPERF3_PORT, "tcp", host_ip),
            Publish(iperf_port, IPERF3_PORT, "udp", host_ip),
        ],
        labels=labels,
    )
    servers = Servers(daemon, http, iperf, http_port, iperf_port)
    _wait_ready(servers)
    return servers


def _hand_started(
    kind: str, env_tools: dict[str, str], target: Servers, ports: PortPool, logdir: Path
) -> list[HandStartedProxy]:
    start = start_docker_proxy if kind == "docker-proxy" else start_socat
    binary = env_tools[kind]
    http_port, iperf_port = ports.one(), ports.one()
    started: list[HandStartedProxy] = []
    try:
        for proto, port, ip, backend_port, role in (
            ("tcp", http_port, target.http.ip, HTTP_PORT, "http"),
            ("tcp", iperf_port, target.iperf.ip, IPERF3_PORT, "iperf-tcp"),
            ("udp", iperf_port, target.iperf.ip, IPERF3_PORT, "iperf-udp"),
        ):
            log = logdir / f"{kind}-{role}.log"
            started.append(start(binary, proto, "127.0.0.1", port, ip, backend_port, log))
    except BaseException:
        for p in started:
            p.stop()
        raise
    return started


def build_variants(
    cfg: BenchConfig,
    ext: ExternalClient,
    servers: dict[str, Servers],
    hand: dict[str, list[HandStartedProxy]],
) -> list[Variant]:
    proxied, dnat = servers["proxy"], servers["dnat"]
    lo = "127.0.0.1"
    built: dict[str, Variant] = {
        "direct": Variant(
            "direct",
            VARIANTS["direct"],
            Target(None, proxied.http.ip, HTTP_PORT),
            Target(None, proxied.iperf.ip, IPERF3_PORT),
        ),
        "dnat-ext": Variant(
            "dnat-ext",
            VARIANTS["dnat-ext"],
            Target(ext.netns, ext.host_ip, dnat.http_port),
            Target(ext.netns, ext.host_ip, dnat.iperf_port),
        ),
        "dnat-lo": Variant(
            "dnat-lo",
            VARIANTS["dnat-lo"],
            Target(None, lo, dnat.http_port),
            Target(None, lo, dnat.iperf_port),
        ),
    }
    daemon = proxied.daemon
    roles = {
        "http": daemon.proxy_pid("tcp", proxied.http_port),
        "iperf-tcp": daemon.proxy_pid("tcp", proxied.iperf_port),
        "iperf-udp": daemon.proxy_pid("udp", proxied.iperf_port),
    }
    built["pyengine-proxy"] = Variant(
        "pyengine-proxy",
        VARIANTS["pyengine-proxy"],
        Target(None, lo, proxied.http_port),
        Target(None, lo, proxied.iperf_port),
        list(roles.values()),
        roles,
    )
    transparent = servers.get("transparent")
    if transparent is not None:  # the same daemon, its proxies connecting from the client
        on = ext.host_ip
        roles = {
            "http": daemon.proxy_pid("tcp", transparent.http_port, on),
            "iperf-tcp": daemon.proxy_pid("tcp", transparent.iperf_port, on),
            "iperf-udp": daemon.proxy_pid("udp", transparent.iperf_port, on),
        }
        built["pyengine-proxy-transparent"] = Variant(
            "pyengine-proxy-transparent",
            VARIANTS["pyengine-proxy-transparent"],
            Target(ext.netns, on, transparent.http_port),
            Target(ext.netns, on, transparent.iperf_port),
            list(roles.values()),
            roles,
        )
    for kind, group in hand.items():
        by_role = dict(zip(("http", "iperf-tcp", "iperf-udp"), group, strict=True))
        built[kind] = Variant(
            kind,
            VARIANTS[kind],
            Target(None, lo, by_role["http"].host_port),
            Target(None, lo, by_role["iperf-tcp"].host_port),
            [p.pid for p in group],
            {role: p.pid for role, p in by_role.items()},
        )
    return [built[name] for name in cfg.variants]


def build_environment(cfg: BenchConfig, cleanup: Cleanup, progress: Progress) -> Environment:
    tools = find_tools(TOOLS, cfg.install_missing)
    require_matplotlib()
    nginx_archive, iperf3_archive = _image_archives(cfg, cfg.install_missing, progress)
    _raise_open_file_limit()
    names = RunNames.fresh()
    workdir = Path(tempfile.mkdtemp(prefix=f"pyebench-{names.run_id}-"))
    cleanup.push(f"remove {workdir}", lambda: _remove_workdir(workdir))
    progress.note(f"run {names.run_id}: work directory {workdir}")

    ports = PortPool()
    wrk_script = workdir / "report.lua"
    wrk_script.write_text(WRK_REPORT_SCRIPT)

    *bridges, ext_subnet = [
        *choose_subnets(2, BRIDGE_CANDIDATES),
        *choose_subnets(1, EXTERNAL_CANDIDATES),
    ]
    ext = create_external_client(names, ext_subnet)
    cleanup.push(f"delete {ext.netns}", lambda: delete_external_client(ext))
    progress.note(f"external client {ext.netns} ({ext.client_ip}) -> host {ext.host_ip}")

    daemons: dict[str, BenchDaemon] = {}
    for mode, subnet in zip(("proxy", "dnat"), bridges, strict=True):
        bip = f"{next(subnet.hosts())}/{subnet.prefixlen}"
        daemon = start_daemon(
            workdir / mode, names.daemon(mode[0]), bip, mode == "proxy", "nftables"
        )
        cleanup.push(f"stop pyengined {daemon.name}", daemon.stop)
        daemons[mode] = daemon
        progress.note(f"pyengined {daemon.name} --userland-proxy={mode == 'proxy'} on {bip}")
        daemon.load(nginx_archive)
        daemon.load(iperf3_archive)

    servers = {
        "proxy": start_servers(daemons["proxy"], ports, "127.0.0.1"),
        "dnat": start_servers(daemons["dnat"], ports, ""),
    }
    if "pyengine-proxy-transparent" in cfg.variants:
        labels = {"pyengine.proxy-mode": "transparent"}
        servers["transparent"] = start_servers(daemons["proxy"], ports, ext.host_ip, labels)
    progress.note("nginx and iperf3 containers answer in both daemons")

    hand: dict[str, list[HandStartedProxy]] = {}
    for kind in ("docker-proxy", "socat"):
        group = _hand_started(kind, tools, servers["proxy"], ports, workdir)
        hand[kind] = group
        for p in group:
            cleanup.push(f"stop {kind} {p.proto}/{p.host_port}", p.stop)
    progress.note("docker-proxy and socat listen on 127.0.0.1")

    return Environment(
        cfg=cfg,
        names=names,
        tools=tools,
        workdir=workdir,
        ports=ports,
        wrk_script=wrk_script,
        ext=ext,
        daemons=daemons,
        servers=servers,
        hand_proxies=hand,
        variants=build_variants(cfg, ext, servers, hand),
        nginx_archive=nginx_archive,
        bridge_subnets=[str(b) for b in bridges],
    )


def start_study_daemon(
    env: Environment, cleanup: Cleanup, userland_proxy: bool, backend: str
) -> BenchDaemon:
    """Another pyengined for the publishing study (a backend the data path does not use)."""
    role = f"{'p' if userland_proxy else 'd'}{backend[0]}"
    subnet = choose_subnets(1, BRIDGE_CANDIDATES)[0]  # running bridges' routes are excluded
    env.bridge_subnets.append(str(subnet))
    bip = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    daemon = start_daemon(env.workdir / role, env.names.daemon(role), bip, userland_proxy, backend)
    cleanup.push(f"stop pyengined {daemon.name}", daemon.stop)
    env.extra_daemons.append(daemon)
    daemon.load(env.nginx_archive)
    return daemon


def start_study_dockerd(
    env: Environment, cleanup: Cleanup, userland_proxy: bool, proxy_path: Path | None = None
) -> DockerDaemon:
    """Debian's dockerd for the publishing study, on a bridge of its own, with the nginx
    image loaded (raises bench.dockerd.DockerdUnavailable when it cannot run here);
    ``proxy_path``: its --userland-proxy-path (pyengine's launcher)."""
    role = "l" if proxy_path is not None else "p" if userland_proxy else "d"
    subnet = choose_subnets(1, BRIDGE_CANDIDATES)[0]
    env.bridge_subnets.append(str(subnet))
    daemon = start_dockerd(
        env.workdir / f"dockerd-{role}",
        env.names.docker_bridge(role),
        subnet,
        userland_proxy,
        proxy_path,
    )
    cleanup.push(f"stop dockerd {daemon.name}", daemon.stop)
    env.extra_daemons.append(daemon)
    daemon.load(env.nginx_archive)
    return daemon
