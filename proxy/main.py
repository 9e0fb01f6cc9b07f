"""pyengine-proxy: forwards one published host port to a container, like docker-proxy.

pyengine-proxy -proto tcp|udp -host-ip IP -host-port N -container-ip IP -container-port N
               [-use-listen-fd] [-udp-idle-timeout SECONDS]
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import signal
import socket
import sys
from importlib import metadata

import uvloop

from proxy.handshake import StartupStatus
from proxy.listener import ListenerError, open_listener
from proxy.options import USAGE, ProxyOptions, UsageError, parse_command_line
from proxy.tcp import TcpProxy
from proxy.udp import UdpProxy

log = logging.getLogger("proxy")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str] | None = None) -> None:
    # First thing: fd 3 must be looked at before anything else can open an fd that lands on it.
    status = StartupStatus.from_inherited_fd()
    try:
        command = parse_command_line(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"pyengine-proxy: {err}\n{USAGE}", file=sys.stderr)
        status.report_failure(str(err))
        sys.exit(2)
    if command.show_help:
        print(USAGE)
        sys.exit(0)
    if command.show_version:
        print(f"pyengine-proxy version {_version()}")
        sys.exit(0)
    assert command.options is not None
    options = command.options
    _configure_logging(options)
    if status.has_parent:
        _exit_with_parent()
    _raise_open_file_limit()
    try:
        listener = open_listener(options)
    except ListenerError as err:
        log.error("%s", err)
        status.report_failure(str(err))
        sys.exit(1)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        exit_code = runner.run(_serve(options, listener, status))
    sys.exit(exit_code)


async def _serve(options: ProxyOptions, listener: socket.socket, status: StartupStatus) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)
    proxy: TcpProxy | UdpProxy
    if options.proto == "tcp":
        proxy = TcpProxy(loop, listener, options.container_ip, options.container_port)
    else:
        proxy = UdpProxy(
            loop,
            listener,
            options.container_ip,
            options.container_port,
            idle_timeout=options.udp_idle_timeout,
        )
    try:
        proxy.start()
    except OSError as err:
        listener.close()
        message = f"cannot start proxying: {err.strerror or err}"
        log.error("%s", message)
        status.report_failure(message)
        return 1
    status.report_ready()
    log.debug("ready")
    await stop_requested.wait()
    proxy.close()
    return 0


def _configure_logging(options: ProxyOptions) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"pyengine-proxy {options.describe()}: %(levelname)s %(message)s",
    )


def _exit_with_parent() -> None:
    """Get SIGTERM when the parent goes away, as docker-proxy gets from its daemon
    (prctl(2) PR_SET_PDEATHSIG: sent when the thread that spawned us exits)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


def _raise_open_file_limit() -> None:
    # Every TCP connection costs six fds (two sockets, two pipes); use all the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass


def _version() -> str:
    try:
        return metadata.version("pyengine")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
