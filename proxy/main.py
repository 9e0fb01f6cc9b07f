"""pyengine-proxy: forwards one published host port to a container, like docker-proxy.

pyengine-proxy -proto tcp|udp -host-ip IP -host-port N -container-ip IP -container-port N
               [-use-listen-fd] [-udp-idle-timeout SECONDS] [-proxy-protocol v1|v2]
"""

from __future__ import annotations

import asyncio
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
from proxy.prctl import set_parent_death_signal
from proxy.tcp import TcpProxy
from proxy.udp import UdpProxy

log = logging.getLogger("proxy")


def main(argv: list[str] | None = None, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """The command. ``loop``: an event loop made in advance (see :func:`run`)."""
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
    _configure_logging(command.options)
    sys.exit(run(command.options, status, loop=loop))


def run(
    options: ProxyOptions,
    status: StartupStatus,
    *,
    rehearsal: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
) -> int:
    """Proxy until SIGINT or SIGTERM and return the exit code. A rehearsal stops as soon as it
    is ready and leaves no signal handler behind: the fork server runs one to warm up. ``loop``:
    an event loop made in advance (a fork server's spare child makes one before it is needed)."""
    # A bare loop rather than asyncio.Runner: nothing here needs the Runner's context or task
    # clean-up, and every object not created is a page a forked proxy does not copy.
    loop = loop if loop is not None else uvloop.new_event_loop()
    try:
        if status.has_parent:
            _exit_with_parent()
        _raise_open_file_limit()
        try:
            listener = open_listener(options)
        except ListenerError as err:
            log.error("%s", err)
            status.report_failure(str(err))
            return 1
        return loop.run_until_complete(_serve(options, listener, status, rehearsal))
    finally:
        loop.close()


async def _serve(
    options: ProxyOptions, listener: socket.socket, status: StartupStatus, rehearsal: bool
) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    if rehearsal:
        stop_requested.set()
    else:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop_requested.set)
    proxy: TcpProxy | UdpProxy
    if options.proto == "tcp":
        proxy = TcpProxy(
            loop,
            listener,
            options.container_ip,
            options.container_port,
            proxy_protocol=options.proxy_protocol,
        )
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


class ProxyLogFormatter(logging.Formatter):
    """``pyengine-proxy tcp 0.0.0.0:8080 -> 172.17.0.2:80: LEVEL message``. The prefix is set
    once the options are known; a forked proxy only sets it on the formatter the fork server
    installed, instead of building a logging set-up of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = "pyengine-proxy"

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.prefix}: {record.levelname} {record.getMessage()}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def install_log_handler() -> ProxyLogFormatter:
    """Log INFO and above to stderr through a ProxyLogFormatter (once per process)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler.formatter, ProxyLogFormatter):
            return handler.formatter
    handler = logging.StreamHandler(sys.stderr)
    formatter = ProxyLogFormatter()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return formatter


def _configure_logging(options: ProxyOptions) -> None:
    install_log_handler().prefix = f"pyengine-proxy {options.describe()}"


def _exit_with_parent() -> None:
    """Get SIGTERM when the parent goes away, as docker-proxy gets from its daemon
    (prctl(2) PR_SET_PDEATHSIG: sent when the thread that spawned us exits)."""
    if not set_parent_death_signal(signal.SIGTERM):
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
