"""The fork server: a warm, single-threaded Python that forks one pyengine-proxy per request.

Starting a proxy by exec costs a fresh interpreter, ~80 ms of imports, and ~15 MB of PSS per
proxy. The fork server imports everything a proxy needs once, freezes those objects out of the
garbage collector's reach (gc.freeze(), so collections in the children do not write to, and
thereby copy, the shared pages), and forks the proxies from itself: a child's memory stays
shared with the server page by page until one of them writes to it.

The server's request loop is C (proxy/_forkloop.c), and so is a forked proxy's wait for its
first traffic: a page stays shared between the server and a proxy until one of them writes to
it, and Python writes to nearly every page it reads (reference counts, bytecode counters, the
allocator's free lists), so either loop in Python would give every idle proxy private copies of
most pages the interpreter touches. A forked proxy puts its fds in place, makes its listener
ready, reports ``0\n`` and waits in poll(2), all in C, and returns into Python (to parse its
arguments and make its event loop) only when the first connection or datagram arrives.

The fork is a plain fork(2), without os.fork()'s before- and after-fork work (taking and
re-creating the import lock and the GIL, clearing other threads' states, running every
os.register_at_fork callback): in a child that work writes to ~150 shared pages. None of it is
needed in a process with one thread that holds no lock but the GIL, which the child resumes
holding; the server never starts a thread.

It talks to the supervisor over a SOCK_SEQPACKET socket (its fd 3), one JSON object per message,
with file descriptors attached as SCM_RIGHTS (unix(7)):

- server -> client, once: ``{"ready": true, "pid": N}`` when the imports are done;
- client -> server: a fixed header (:func:`encode_request`: the request id, flags, the fd
  number each attached fd gets in the proxy) followed by ``{"argv": [...], "outlive_parent":
  false}``, with the fds attached in order;
- server -> client: ``{"id": N, "pid": P}`` with a pidfd of the child attached, or
  ``{"id": N, "error": "..."}``;
- server -> client, whenever a proxy exits: ``{"exited": P, "code": C}`` (as
  os.waitstatus_to_exitcode: negative for a signal).

The server exits when the supervisor closes its end (and gets SIGTERM if the supervisor's thread
dies first, PR_SET_PDEATHSIG); each child gets SIGTERM when the server dies, as docker-proxy does
when dockerd dies, unless its request said ``"outlive_parent": true`` (a daemon with live
restore: the proxy keeps serving while no daemon runs, and the next daemon adopts it).

    python -m proxy.forkserver   # with the control socket as fd 3
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import struct
import sys
from typing import Any, NoReturn

from proxy import _forkloop
from proxy.handshake import LISTEN_FD, SECOND_LISTEN_FD, STATUS_FD, StartupStatus
from proxy.options import ProxyOptions, UsageError, parse_command_line
from proxy.prctl import outlive_parent, set_parent_death_signal

CONTROL_FD = 3
LIFELINE_FD = _forkloop.LIFELINE_FD
HANDED_OVER = -1  # a rested proxy's result: exit 0 and say nothing on the lifeline
MAX_MESSAGE = 64 * 1024
MAX_FDS = _forkloop.MAX_FDS  # fds per message, either way
PROCESS_NAME = b"pyengine-proxy"
REHEARSALS = 3
ASSIGNED_FDS = (STATUS_FD, LISTEN_FD, SECOND_LISTEN_FD)  # the fd numbers a request can give
# struct request_header in proxy/_forkloop.c: magic, id, flags, fd count, fd numbers, padding.
_HEADER = struct.Struct(f"=IIIB{MAX_FDS}s3x")


class ForkServerError(Exception):
    """The fork server could not be started or could not start a proxy."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("fork server message is not a JSON object")
    return message


def encode_request(
    request_id: int,
    argv: list[str],
    fds: list[int],
    *,
    outlive_parent: bool,
    options: ProxyOptions | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A request for a proxy running ``pyengine-proxy argv`` with the attached fds at the
    numbers ``fds`` (3: the status pipe, 4: the listener, 5: a second listener; 6, to a host
    server only: the proxy's lifeline). ``extra``: more fields of the payload."""
    allowed = (*ASSIGNED_FDS, LIFELINE_FD)
    if not set(fds) <= set(allowed) or len(set(fds)) < len(fds):
        raise ValueError(f"fds can only be passed as {allowed}")
    flags = _forkloop.FLAG_OUTLIVE_PARENT if outlive_parent else 0
    if options is None:
        options = _parse_quietly(argv)
    listeners = len(options.listeners()) if options is not None else 0
    if (
        options is not None
        and options.use_listen_fd
        and set(fds) - {LIFELINE_FD} == set(ASSIGNED_FDS[: 1 + listeners])
    ):
        # The C loop can make the listeners ready and wait for traffic; anything else (no
        # listener, or arguments to reject) goes the proxy's ordinary way, which reports it.
        flags |= _forkloop.FLAG_IDLE_HERE
        if options.proto == "udp":
            flags |= _forkloop.FLAG_UDP
        if listeners == 2:
            flags |= _forkloop.FLAG_SECOND_LISTENER
    header = _HEADER.pack(_forkloop.HEADER_MAGIC, request_id, flags, len(fds), bytes(fds))
    return header + encode({**(extra or {}), "argv": argv, "outlive_parent": outlive_parent})


def _parse_quietly(argv: list[str]) -> ProxyOptions | None:
    try:
        return parse_command_line(argv).options
    except UsageError:
        return None


def main() -> None:
    # gc.freeze() documentation: disable the collector early in a parent that will fork, so
    # collections do not leave freed holes in pages the children then fill (and copy).
    gc.disable()
    control = socket.socket(fileno=CONTROL_FD)
    control.set_inheritable(False)
    set_parent_death_signal(signal.SIGTERM)
    # The server runs in a process group of its own, so no terminal's ^C reaches it; with
    # SIGINT at SIG_DFL (not Python's default handler), a proxy that installs its own handler
    # is spared signal.signal()'s enum conversion of the old one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    warm_up()
    socket.send_fds(control, [encode({"ready": True, "pid": os.getpid()})], [])
    control.detach()  # the loop below owns fd 3 now (and in a proxy, fd 3 is its status pipe)
    forked = _forkloop.serve(CONTROL_FD)
    if forked is None:
        sys.exit(0)  # the supervisor has gone
    payload, ready = forked
    run_forked_proxy(payload, ready)


def warm_up() -> None:
    """Import what a proxy imports and run its start-up path, so no child has to."""
    # libuv (>= 1.45) may set up an io_uring per loop for file operations, which a proxy never
    # does; libuv reads this once.
    os.environ.setdefault("UV_USE_IO_URING", "0")
    import proxy.prctl
    from proxy.main import install_log_handler, raise_open_file_limit

    proxy.prctl.resolve()
    if os.environ.get("PYENGINE_PROXY_KSM") == "1":
        proxy.prctl.enable_memory_merging()
    install_log_handler()
    raise_open_file_limit()  # once here, for every proxy
    # Objects created lazily on the way now exist, and the interpreter has specialised the
    # bytecode of that path (PEP 659), in pages the children share.
    for _ in range(REHEARSALS):
        rehearse()
    from proxy.rehearsal import rehearse_traffic

    rehearse_traffic()  # and the path of a proxy's first connections (proxy/rehearsal.py)
    for _ in range(16):
        decode(encode({"argv": ["-proto", "tcp"], "outlive_parent": True}))  # as a child does
    # Everything alive now is shared with the children: keep the collector from touching it.
    gc.collect()
    gc.freeze()


def rehearse() -> None:
    """Start and stop a throwaway proxy of each kind on a loopback port."""
    from proxy.main import run
    from proxy.options import DEFAULT_UDP_IDLE_TIMEOUT

    for proto in ("tcp", "udp"):
        options = ProxyOptions(
            proto, "127.0.0.1", 0, "127.0.0.1", 9, False, DEFAULT_UDP_IDLE_TIMEOUT
        )
        run(options, StartupStatus(None), rehearsal=True)


def run_forked_proxy(payload: bytes, ready: bool, *, lifeline: bool = False) -> NoReturn:
    """In a proxy the C loop forked, once it has traffic (``ready``: its listener is fd 4,
    reported ready, with SIGINT and SIGTERM blocked) or at once (not ``ready``: it starts the
    ordinary way, with its status pipe as fd 3): run it, and exit. ``lifeline``: a host
    server's proxy, whose launcher's connection is fd 6 (proxy/hostserver.py)."""
    code = 1
    try:
        request = decode(payload)
        argv = [str(arg) for arg in request["argv"]]
        if lifeline or request.get("outlive_parent") is True:
            outlive_parent()  # the C loop set no parent-death signal; keep it that way
        if ready:
            code = _serve_ready(argv, request if lifeline else None)
        else:
            code = _run_proxy_main(argv)
    except BaseException as err:  # anything else is a bug; say so, never return to the server
        try:
            os.write(2, f"pyengine-proxy (forked): {err!r}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            if lifeline and code != HANDED_OVER:
                report_exit(code)
        finally:
            os._exit(0 if code == HANDED_OVER else code)


def report_exit(code: int) -> None:
    """Tell the launcher on the lifeline how this proxy ends (it is not our parent)."""
    try:
        os.write(LIFELINE_FD, encode({"exited": code}))
    except OSError:
        pass  # the launcher has gone


def _serve_ready(argv: list[str], request: dict[str, Any] | None = None) -> int:
    """``request``: a host server's proxy's, whose lifeline is fd 6 (it may rest)."""
    from proxy.main import configure_logging, serve_ready_listener
    from proxy.rest import RestPlan

    options = parse_command_line(argv).options
    if options is None:
        return 2  # a launcher's request the launcher should not have sent this way
    configure_logging(options)
    if request is None:
        return serve_ready_listener(options)
    return serve_ready_listener(options, LIFELINE_FD, RestPlan.of(request, argv, options))


def _run_proxy_main(argv: list[str]) -> int:
    sys.argv = [PROCESS_NAME.decode(), *argv]
    from proxy.main import main as proxy_main

    try:
        proxy_main(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 1
    return 0


if __name__ == "__main__":
    main()
