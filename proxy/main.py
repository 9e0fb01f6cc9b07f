"""pyengine-proxy: forwards one published host port to a container, like docker-proxy.

pyengine-proxy -proto tcp|udp -host-ip IP -host-port N -container-ip IP -container-port N
               [-use-listen-fd] [-udp-idle-timeout SECONDS] [-proxy-protocol v1|v2]
               [-transparent [-transparent-skip CIDR,...]]
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
import sys

import uvloop

from proxy.forkserver import HANDED_OVER
from proxy.handshake import LISTEN_FDS, StartupStatus
from proxy.idle import STOP_SIGNALS, IdleWait
from proxy.listener import ListenerError, address_family, open_listeners
from proxy.options import USAGE, ProxyOptions, UsageError, parse_command_line
from proxy.prctl import set_parent_death_signal
from proxy.rest import Rest, RestPlan
from proxy.tcp import TcpProxy
from proxy.transparent import TransparentSource, parse_skip
from proxy.udp import UdpProxy, prepare_listener

log = logging.getLogger("proxy")


def main(argv: list[str] | None = None) -> None:
    """The command."""
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
    configure_logging(command.options)
    sys.exit(run(command.options, status))


def run(options: ProxyOptions, status: StartupStatus, *, rehearsal: bool = False) -> int:
    """Proxy until SIGINT or SIGTERM and return the exit code. The proxy reports ready once
    it listens, and makes its event loop only when the first traffic arrives (proxy/idle.py).
    A rehearsal goes through every step at once and stops, leaving no signal handler behind:
    the fork server runs it to warm up."""
    if status.has_parent:
        _exit_with_parent()
    raise_open_file_limit()
    try:
        listeners = open_listeners(options)
    except ListenerError as err:
        log.error("%s", err)
        status.report_failure(str(err))
        return 1
    if options.proto == "udp":
        try:
            for listener in listeners:
                prepare_listener(listener)
        except OSError as err:
            _close_all(listeners)
            message = f"cannot start proxying: {err.strerror or err}"
            log.error("%s", message)
            status.report_failure(message)
            return 1
    idle = None if rehearsal else IdleWait()
    try:
        status.report_ready()
        log.debug("ready")
        if idle is not None and not idle.until_traffic(listeners):
            _close_all(listeners)
            return 0
    finally:
        if idle is not None:
            idle.close()
    if not rehearsal:
        # A forked proxy runs with the collector off until here (nothing it made so far is
        # cyclic); connections are (a connection and its relays refer to each other).
        gc.enable()
    # A bare loop rather than asyncio.Runner: nothing here needs the Runner's context or task
    # clean-up, and every object not created is a page a forked proxy does not copy.
    loop = uvloop.new_event_loop()
    try:
        stopping = idle is None or idle.stop_requested
        return loop.run_until_complete(
            _serve(options, listeners, rehearsal=idle is None, stopping=stopping)
        )
    finally:
        loop.close()


def serve_ready_listener(
    options: ProxyOptions, lifeline: int | None = None, rest: RestPlan | None = None
) -> int:
    """Proxy on fd 4 (and fd 5), listeners already made ready and reported, one of them
    readable (a proxy that the fork server's C loop forked and that has seen its first
    traffic); SIGINT and SIGTERM are blocked until the event loop handles them. ``lifeline``:
    a socket whose end of file (the launcher has gone) stops the proxy; ``rest``: when and how
    it goes back to sleep (proxy/rest.py). Returns the exit code, or HANDED_OVER."""
    raise_open_file_limit()
    listeners = [socket.socket(fileno=fd) for fd in LISTEN_FDS[: len(options.listeners())]]
    for listener in listeners:
        listener.setblocking(False)
    gc.enable()  # see run()
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(
            _serve(
                options,
                listeners,
                rehearsal=False,
                stopping=False,
                unblock_signals=True,
                lifeline=lifeline,
                rest=rest,
            )
        )
    finally:
        loop.close()


def _close_all(listeners: list[socket.socket]) -> None:
    for listener in listeners:
        listener.close()


async def _serve(
    options: ProxyOptions,
    listeners: list[socket.socket],
    *,
    rehearsal: bool,
    stopping: bool,
    unblock_signals: bool = False,
    lifeline: int | None = None,
    rest: RestPlan | None = None,
) -> int:
    """Proxy until stopped. ``rehearsal``: start and stop at once; ``stopping``: a stop signal
    came already; ``unblock_signals``: SIGINT and SIGTERM are blocked, unblock them once the
    loop handles them (one that is pending is then delivered); ``lifeline``: stop when this
    fd turns readable (its peer closed it)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    if lifeline is not None:
        loop.add_reader(lifeline, _stop_once, loop, lifeline, stop_requested)
    if not rehearsal:
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop_requested.set)
        if unblock_signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if rehearsal or stopping:
        stop_requested.set()
    proxies: list[TcpProxy | UdpProxy] = []
    for listener, (_, container_ip) in zip(listeners, options.listeners(), strict=True):
        if options.proto == "tcp":
            proxies.append(
                TcpProxy(
                    loop,
                    listener,
                    container_ip,
                    options.container_port,
                    proxy_protocol=options.proxy_protocol,
                    transparent=_transparent(options, container_ip),
                )
            )
        else:
            proxies.append(
                UdpProxy(
                    loop,
                    listener,
                    container_ip,
                    options.container_port,
                    idle_timeout=options.udp_idle_timeout,
                    transparent=_transparent(options, container_ip),
                )
            )
    started: list[TcpProxy | UdpProxy] = []
    try:
        for proxy in proxies:
            proxy.start()
            started.append(proxy)
    except OSError as err:
        for proxy in started:
            proxy.close()
        _close_all(listeners)
        log.error("cannot start proxying: %s", err.strerror or err)
        return 1
    resting = Rest(loop, proxies, rest, stop_requested) if rest is not None else None
    await stop_requested.wait()
    if resting is not None and resting.close():
        return HANDED_OVER  # the listeners serve on in the new proxy; nothing to close
    for proxy in proxies:
        proxy.close()
    return 0


def _stop_once(loop: asyncio.AbstractEventLoop, fd: int, stop: asyncio.Event) -> None:
    loop.remove_reader(fd)
    stop.set()


def _transparent(options: ProxyOptions, container_ip: str) -> TransparentSource | None:
    if not options.transparent:
        return None
    return TransparentSource(address_family(container_ip), parse_skip(options.transparent_skip))


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


def configure_logging(options: ProxyOptions) -> None:
    install_log_handler().prefix = f"pyengine-proxy {options.describe()}"


def _exit_with_parent() -> None:
    """Get SIGTERM when the parent goes away, as docker-proxy gets from its daemon
    (prctl(2) PR_SET_PDEATHSIG: sent when the thread that spawned us exits)."""
    if not set_parent_death_signal(signal.SIGTERM):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


def raise_open_file_limit() -> None:
    # Every TCP connection costs six fds (two sockets, two pipes); use all the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass


def _version() -> str:
    from importlib import metadata  # only here: it imports email, zipfile, csv ... (~2 MB)

    try:
        return metadata.version("pyengine")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
