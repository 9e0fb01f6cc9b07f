"""pyengined: the daemon. Parses Docker's flags, composes the components, serves the API."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click
import uvloop
from aiohttp import web

from engine import datadir
from engine.api.app import make_app
from engine.events import EventBus
from engine.images.store import ImageStore
from engine.lifecycle.engine import Engine, EngineConfig
from engine.rlimits import raise_nofile_limit
from engine.runtime.runc import Runtime
from netd import DNS_PORT, ContainerDns, EmbeddedDns, NetdConfig, NetdError, NetworkController
from netd import STATE_DIR as NETD_STATE_DIR
from proxy.supervisor import ProxySupervisor

DEFAULT_HOST = "unix:///run/pyengine.sock"
PROXIES_DIR = "proxies"  # the running proxies, for the next daemon (proxy/supervisor.py)
log = logging.getLogger("pyengined")


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise click.BadParameter(f"invalid boolean value {value!r} (want true or false)")


def unix_socket_path(host: str) -> str:
    if host.startswith("unix://"):
        return host[len("unix://") :]
    if host.startswith("/"):
        return host
    raise click.BadParameter(f"only unix:// hosts are supported, got {host!r}")


def check_host_gateway_ips(values: tuple[str, ...]) -> list[str]:
    """``--host-gateway-ip``: addresses, at most one of each family (as Docker 25+)."""
    chosen: dict[int, str] = {}
    for value in values:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not an IP address", param_hint="--host-gateway-ip"
            ) from None
        if address.version in chosen:
            raise click.BadParameter(
                f"only one IPv{address.version} address may be given",
                param_hint="--host-gateway-ip",
            )
        chosen[address.version] = str(address)
    return [chosen[v] for v in sorted(chosen)]


def default_host_gateway(network: NetworkController) -> list[str]:
    """Docker's default host gateway: the default bridge's own addresses."""
    default = network.default_network
    return [ip for ip in (default.gateway, default.gateway6) if ip]


async def serve(
    sock_path: str, engine: Engine, network: NetworkController, pidfile: Path | None
) -> None:
    started = time.monotonic()
    # Live restore in proxy mode: the proxies a previous daemon left running kept serving;
    # their listening sockets become netd's reservations of those ports (never re-bound, so
    # never closed) and recover() adopts the proxies. Otherwise they are stopped first.
    held = await engine.proxies.take_over(
        keep=engine.cfg.live_restore and engine.cfg.userland_proxy
    )
    # Sandboxes of containers the engine no longer knows go now; recover() then releases the
    # endpoints of known containers that are not running.
    known = [c.id for c in engine.containers.all()]
    await asyncio.to_thread(network.setup, containers=known, held_sockets=held)
    await engine.recover()
    await engine.restore_names()
    log.info("state recovered in %.3f s", time.monotonic() - started)
    app = make_app(engine)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    Path(sock_path).parent.mkdir(parents=True, exist_ok=True)
    site = web.UnixSite(runner, sock_path)
    await site.start()
    os.chmod(sock_path, 0o660)
    if pidfile:
        pidfile.write_text(f"{os.getpid()}\n")
    log.info("API listening on %s", sock_path)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Python-level handlers rather than loop.add_signal_handler: pyroute2 forks helper children
    # for namespace work and stops them with SIGTERM; a forked child shares the loop's signal
    # wakeup socket (signal.set_wakeup_fd), so a loop-level handler would read the child's
    # SIGTERM as the daemon's own. Here the pid check makes a child's handler a no-op.
    daemon_pid = os.getpid()

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() == daemon_pid:
            log.info("received %s", signal.Signals(signum).name)
            loop.call_soon_threadsafe(stopping.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    await stopping.wait()
    log.info("shutting down")
    await runner.cleanup()
    if await engine.shutdown():
        # Live restore: the running containers keep their bridge, veths and firewall rules
        # (published ports keep answering in DNAT mode); the next daemon adopts them.
        log.info("live restore: keeping the network up for the running containers")
    else:
        await asyncio.to_thread(network.teardown)
    await engine.close_dns()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    if pidfile:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


def return_path(text: str) -> tuple[int, int, int]:
    """``MARK:TABLE:PRIORITY`` (each decimal or 0x-hex): NetdConfig's transparent_* fields."""
    try:
        mark, table, priority = (int(part, 0) for part in text.split(":"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not MARK:TABLE:PRIORITY", param_hint="--userland-proxy-return-path"
        ) from None
    return mark, table, priority


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-H",
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    help="Daemon socket to listen on (unix://PATH).",
)
@click.option(
    "--data-root",
    default="/var/lib/pyengine",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Root of persisted state.",
)
@click.option(
    "--userland-proxy",
    default="true",
    show_default=True,
    help="true: one pyengine-proxy per published port; false: kernel DNAT only.",
)
@click.option(
    "--userland-proxy-mode",
    type=click.Choice(["gateway", "transparent"]),
    default="gateway",
    show_default=True,
    help="How the proxy connects to a container: from the bridge gateway (Docker's way), or "
    "transparently, from the client's own address (docs/proxy.md). Label "
    "pyengine.proxy-mode[.<port>/<proto>] chooses per container or port.",
)
@click.option(
    "--userland-proxy-return-path",
    default="0x1d190000:25919:25919",
    show_default=True,
    help="Transparent mode's return path: MARK:TABLE:PRIORITY, the firewall mark bits, the "
    "routing table and the ip rule priority pyengined owns (netd/returnpath.py).",
)
@click.option(
    "--userland-proxy-path",
    default=None,
    help="Proxy binary (default: this Python's pyengine-proxy).",
)
@click.option(
    "--firewall-backend",
    type=click.Choice(["nftables", "iptables"]),
    default="nftables",
    show_default=True,
)
@click.option(
    "-b", "--bridge", default="pyengine0", show_default=True, help="Name of the default bridge."
)
@click.option(
    "--bip",
    default="10.47.0.1/16",
    show_default=True,
    help="Address and prefix of the default bridge.",
)
@click.option(
    "--firewall-table",
    default="pyengine",
    show_default=True,
    help="Name of the nftables table (or prefix of the iptables chains) pyengine owns.",
)
@click.option(
    "--live-restore",
    default="true",
    show_default=True,
    help="true: containers keep running while the daemon is down (it adopts them again when "
    "it starts); false: stop them all when the daemon stops.",
)
@click.option(
    "--dns",
    "dns_servers",
    multiple=True,
    help="DNS server (IPv4 or IPv6 address) containers use instead of the host's resolvers: "
    "the upstream of the embedded DNS server on user-defined networks, and the nameserver of "
    "containers on the default bridge. Repeat for several.",
)
@click.option(
    "--host-gateway-ip",
    "host_gateway_ips",
    multiple=True,
    help="The address --add-host NAME:host-gateway names (one IPv4 and/or one IPv6; default: "
    "the default bridge's gateway address).",
)
@click.option(
    "--ip-forward",
    default="true",
    show_default=True,
    help="true: turn net.ipv4.ip_forward on (containers reach other networks); false: leave it.",
)
@click.option(
    "--ip-forward-no-drop",
    is_flag=True,
    help="When pyengined turns ip_forward on, do not drop the forwarded traffic that is not "
    "its own (Docker 28's option of the same name).",
)
@click.option(
    "--ipv6",
    is_flag=True,
    help="Give the default bridge an IPv6 subnet (--fixed-cidr-v6): containers on it get an "
    "IPv6 address, an IPv6 default route and NAT66 (Docker's option of the same name).",
)
@click.option(
    "--fixed-cidr-v6",
    default="",
    help="The default bridge's IPv6 subnet with --ipv6, e.g. fd00:1::/64; its first address is "
    "the gateway.",
)
@click.option("-p", "--pidfile", default=None, type=click.Path(path_type=Path))
@click.option("--runc", "runc_path", default="runc", show_default=True)
@click.option("-D", "--debug", is_flag=True, help="Debug logging.")
def main(
    host: str,
    data_root: Path,
    userland_proxy: str,
    userland_proxy_mode: str,
    userland_proxy_return_path: str,
    userland_proxy_path: str | None,
    firewall_backend: str,
    bridge: str,
    bip: str,
    firewall_table: str,
    live_restore: str,
    dns_servers: tuple[str, ...],
    host_gateway_ips: tuple[str, ...],
    ip_forward: str,
    ip_forward_no_drop: bool,
    ipv6: bool,
    fixed_cidr_v6: str,
    pidfile: Path | None,
    runc_path: str,
    debug: bool,
) -> None:
    """pyengined: the pyengine daemon (Docker Engine API on a unix socket)."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if os.geteuid() != 0:
        raise click.ClickException("pyengined must run as root")
    raise_nofile_limit()
    use_proxy = _bool(userland_proxy)
    keep_running = _bool(live_restore)
    for server in dns_servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise click.BadParameter(
                f"{server!r} is not an IP address", param_hint="--dns"
            ) from None
    host_gateway = check_host_gateway_ips(host_gateway_ips)
    sock_path = unix_socket_path(host)
    lock_fd = datadir.claim(data_root)  # held (not inherited: O_CLOEXEC) while we run
    datadir.make_private(
        data_root, ("image", "runc", NETD_STATE_DIR, PROXIES_DIR), create=("image", "runc")
    )
    mark, table, priority = return_path(userland_proxy_return_path)
    try:
        network = NetworkController(
            NetdConfig(
                data_root=data_root,
                bridge=bridge,
                bridge_cidr=bip,
                table=firewall_table,
                userland_proxy=use_proxy,
                firewall_backend=firewall_backend,
                ip_forward=_bool(ip_forward),
                ip_forward_no_drop=ip_forward_no_drop,
                ipv6=ipv6,
                fixed_cidr_v6=fixed_cidr_v6,
                transparent_mark=mark,
                transparent_table=table,
                transparent_priority=priority,
            )
        )
    except (NetdError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    proxy_argv = (
        [userland_proxy_path] if userland_proxy_path else [sys.executable, "-m", "proxy.main"]
    )
    engine = Engine(
        EngineConfig(
            data_root=data_root,
            userland_proxy=use_proxy,
            userland_proxy_mode=userland_proxy_mode,
            runc=runc_path,
            live_restore=keep_running,
        ),
        images=ImageStore(data_root / "image"),
        network=network,
        proxies=ProxySupervisor(
            proxy_argv,
            state_path=data_root / PROXIES_DIR,
            outlive_daemon=use_proxy and keep_running,
        ),
        runtime=Runtime(data_root / "runc", runc=runc_path),
        dns=ContainerDns(
            EmbeddedDns(
                [(s, DNS_PORT) for s in dns_servers] if dns_servers else None,
                is_internal=network.is_internal,
            ),
            network.default_network.id,
            dns_servers,
            host_gateway=host_gateway or default_host_gateway(network),
        ),
        events=EventBus(),
    )
    try:
        uvloop.run(serve(sock_path, engine, network, pidfile))
    except NetdError as e:  # e.g. the bridge cannot be set up: one line, not a traceback
        raise click.ClickException(str(e)) from e
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    main()
