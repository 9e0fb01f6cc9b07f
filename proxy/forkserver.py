"""The fork server: a warm, single-threaded Python that forks one pyengine-proxy per request.

Starting a proxy by exec costs a fresh interpreter, ~80 ms of imports, and ~15 MB of PSS per
proxy. The fork server imports everything a proxy needs once, freezes those objects out of the
garbage collector's reach (gc.freeze(), so collections in the children do not write to, and
thereby copy, the shared pages), and forks the proxies from itself: a child's memory stays
shared with the server page by page until one of them writes to it.

To answer a request quickly, the server keeps one *spare* child forked in advance: it has
already paid for the fork and its set-up, and waits for its assignment (the proxy's arguments
and fds) on a socket of its own. A request hands the spare its assignment, answers with the
spare's pid, and only then forks the next spare. Forks skip CPython's after-fork hooks
(proxy/rawfork.py), and a proxy makes no event loop until its first traffic (proxy/idle.py):
every page a child writes to is a page it no longer shares.

It talks to the supervisor over a SOCK_SEQPACKET socket (its fd 3), one JSON object per message,
with file descriptors attached as SCM_RIGHTS (unix(7)):

- server -> client, once: ``{"ready": true, "pid": N}`` when the imports are done;
- client -> server: ``{"id": N, "argv": [...], "fds": [3, 4], "outlive_parent": false}`` with
  those fds attached, in order;
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

import fcntl
import gc
import json
import os
import select
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from proxy.prctl import outlive_parent, set_parent_death_signal, set_process_name
from proxy.rawfork import fork_without_hooks

CONTROL_FD = 3
MAX_MESSAGE = 64 * 1024
MAX_FDS = 8
PROCESS_NAME = b"pyengine-proxy"
SPARE_NAME = b"pyengine-spare"  # what ps calls a spare until it becomes a proxy
REHEARSALS = 3
# The fds a proxy receives at fixed numbers (handshake.STATUS_FD and LISTEN_FD): a spare keeps
# them occupied until its assignment, so that no fd it opens before lands on them.
_ASSIGNED_FDS = (3, 4)


class ForkServerError(Exception):
    """The fork server could not be started or could not start a proxy."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("fork server message is not a JSON object")
    return message


def main() -> None:
    # gc.freeze() documentation: disable the collector early in a parent that will fork, so
    # collections do not leave freed holes in pages the children then fill (and copy).
    gc.disable()
    control = socket.socket(fileno=CONTROL_FD)
    control.set_inheritable(False)
    set_parent_death_signal(signal.SIGTERM)
    # The server runs in a process group of its own, so no terminal's ^C reaches it; with
    # SIGINT at SIG_DFL (not Python's default handler), a proxy that installs its own handler
    # is spared signal.signal()'s failing enum conversion of the old one, and its copies.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _warm_up()
    server = ForkServer(control)
    sys.exit(server.serve())


def _warm_up() -> None:
    """Import what a proxy imports and run its start-up path, so no child has to."""
    # libuv (>= 1.45) may set up an io_uring per loop for file operations, which a proxy never
    # does; libuv reads this once.
    os.environ.setdefault("UV_USE_IO_URING", "0")
    import proxy.prctl
    import proxy.rawfork
    from proxy.main import install_log_handler

    proxy.prctl.resolve()
    proxy.rawfork.resolve()
    if os.environ.get("PYENGINE_PROXY_KSM") == "1":
        proxy.prctl.enable_memory_merging()
    install_log_handler()
    # Objects created lazily on the way now exist, and the interpreter has specialised the
    # bytecode of that path (PEP 659), in pages the children share.
    for _ in range(REHEARSALS):
        rehearse()
    # Everything alive now is shared with the children: keep the collector from touching it.
    gc.collect()
    gc.freeze()


def rehearse() -> None:
    """Start and stop a throwaway proxy of each kind on a loopback port."""
    from proxy.handshake import StartupStatus
    from proxy.main import run
    from proxy.options import DEFAULT_UDP_IDLE_TIMEOUT, ProxyOptions

    for proto in ("tcp", "udp"):
        options = ProxyOptions(
            proto, "127.0.0.1", 0, "127.0.0.1", 9, False, DEFAULT_UDP_IDLE_TIMEOUT
        )
        run(options, StartupStatus(None), rehearsal=True)


@dataclass
class _Spare:
    """A child forked in advance, waiting on ``channel`` for the proxy it is to become."""

    pid: int
    pidfd: int
    channel: socket.socket


class ForkServer:
    def __init__(self, control: socket.socket) -> None:
        self._control = control
        self._proxies: set[int] = set()
        self._spare: _Spare | None = None
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> int:
        signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        # A Python-level handler is needed for the wakeup fd to be written; the work happens in
        # the loop below.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._send({"ready": True, "pid": os.getpid()})
        self._prepare_next_spare()
        poller = select.poll()
        poller.register(self._control.fileno(), select.POLLIN)
        poller.register(self._wakeup_read, select.POLLIN)
        try:
            while True:
                for fd, _ in poller.poll():
                    if fd == self._wakeup_read:
                        self._drain_wakeups()
                        self._reap_children()
                    elif not self._handle_request():
                        return 0
        finally:
            self._discard_spare()

    def _handle_request(self) -> bool:
        """Serve one request; False when the supervisor has gone."""
        try:
            data, fds, _, _ = socket.recv_fds(self._control, MAX_MESSAGE, MAX_FDS)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not data:
            _close_all(fds)
            return False
        request_id: object = None
        try:
            request = decode(data)
            request_id = request.get("id")
            spare = self._assign(request, fds)
        except (ValueError, KeyError, TypeError, OSError) as err:
            self._send({"id": request_id, "error": str(err) or type(err).__name__})
            return True
        finally:
            _close_all(fds)  # the proxy has its own copies now; the next spare must not inherit
        self._proxies.add(spare.pid)
        try:
            self._send({"id": request_id, "pid": spare.pid}, [spare.pidfd])
        finally:
            os.close(spare.pidfd)
        self._prepare_next_spare()
        return True

    def _assign(self, request: dict[str, Any], fds: list[int]) -> _Spare:
        """Hand the spare the proxy's arguments and fds; it is that proxy from now on."""
        argv = [str(arg) for arg in request["argv"]]
        targets = [int(n) for n in request["fds"]]
        if len(targets) != len(fds):
            raise ValueError(f"{len(targets)} fd numbers for {len(fds)} fds")
        if not set(targets) <= set(_ASSIGNED_FDS):
            raise ValueError(f"fds can only be passed as {_ASSIGNED_FDS}")
        assignment = {
            "argv": argv,
            "fds": targets,
            "outlive_parent": request.get("outlive_parent") is True,
        }
        spare = self._take_spare()
        try:
            socket.send_fds(spare.channel, [encode(assignment)], fds)
        except OSError as err:
            os.close(spare.pidfd)
            raise OSError(err.errno, f"the spare did not take its assignment: {err}") from None
        finally:
            spare.channel.close()
        return spare

    def _prepare_next_spare(self) -> None:
        """Fork the next spare now, while the supervisor waits for the last one's handshake;
        if that fails, the next request forks its proxy itself (and reports any error)."""
        try:
            self._fork_spare()
        except OSError:
            pass

    def _take_spare(self) -> _Spare:
        if self._spare is None:
            self._fork_spare()
        assert self._spare is not None
        spare, self._spare = self._spare, None
        return spare

    def _fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            theirs = _above_assigned_fds(theirs)  # the spare puts placeholders at 3 and 4
            pid = fork_without_hooks()  # this process has one thread and holds no lock
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            self._forget_in_child(ours)
            _wait_for_assignment(theirs)
        theirs.close()
        # Opened before this loop can reap the child, so the pidfd refers to it and no other.
        self._spare = _Spare(pid=pid, pidfd=os.pidfd_open(pid), channel=ours)

    def _discard_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is None:
            return
        spare.channel.close()  # the spare sees EOF and exits
        os.close(spare.pidfd)

    def _forget_in_child(self, spare_channel: socket.socket) -> None:
        """Drop the server's own fds in a new child; detach() first, so that no socket object
        (still referenced by the frames below) can ever close a reused fd number later."""
        signal.set_wakeup_fd(-1)
        # The SIGCHLD handler stays: a proxy has no children, and signal.signal() would cost
        # ~0.2 MB of copied pages here (it converts the old handler to an enum, and fails).
        os.close(self._control.detach())
        os.close(spare_channel.detach())
        os.close(self._wakeup_read)
        os.close(self._wakeup_write)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wakeup_read, 512):
                pass
        except BlockingIOError:
            pass

    def _reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._spare is not None and pid == self._spare.pid:
                self._discard_spare()  # died before it was needed; the loop forks another
            elif pid in self._proxies:
                self._proxies.discard(pid)
                self._send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            socket.send_fds(self._control, [encode(message)], fds or [])
        except OSError:
            pass  # the supervisor is gone; the next receive sees EOF


def _wait_for_assignment(channel: socket.socket) -> NoReturn:
    """In a spare child: get ready to be a proxy, wait for which one, become it."""
    code = 1
    try:
        # The collector stays off until the proxy leaves its idle phase (proxy/main.py run()).
        os.setpgid(0, 0)  # a process group of its own, like a posix_spawn(setpgroup=0) proxy
        set_parent_death_signal(signal.SIGTERM)
        set_process_name(SPARE_NAME)
        channel_fd = channel.fileno()
        for low, high in ((3, channel_fd), (channel_fd + 1, _max_fd())):
            if low < high:
                os.closerange(low, high)
        # Hold fds 3 and 4 so that no fd the proxy opens before its assignment lands on them.
        placeholder = os.open(os.devnull, os.O_RDONLY)
        for fd in _ASSIGNED_FDS:
            if fd != placeholder:
                os.dup2(placeholder, fd, inheritable=False)
        if placeholder not in _ASSIGNED_FDS:
            os.close(placeholder)
        data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, MAX_FDS)
        channel.close()
        if not data:
            os._exit(0)  # the server went away without needing this spare
        assignment = decode(data)
        code = _become_proxy(
            assignment["argv"],
            dict(zip(assignment["fds"], fds, strict=True)),
            outlives_server=assignment.get("outlive_parent") is True,
        )
    except BaseException as err:  # anything else is a bug; say so, never return to the server
        try:
            os.write(2, f"pyengine-proxy (forked): {err!r}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _become_proxy(
    argv: list[str],
    fds: dict[int, int],
    *,
    outlives_server: bool,
) -> int:
    """Put the received fds at their numbers and run the proxy; return its exit code.
    ``outlives_server``: drop the spare's parent-death signal, and ignore the proxy's own
    request for one."""
    if outlives_server:
        outlive_parent()
    for target, source in fds.items():
        os.dup2(source, target)
        os.close(source)
    for fd in _ASSIGNED_FDS:
        if fd not in fds:
            os.close(fd)  # still the placeholder: the proxy must not mistake it for a real fd
    set_process_name(PROCESS_NAME)
    sys.argv = [PROCESS_NAME.decode(), *argv]
    from proxy.main import main as proxy_main

    try:
        proxy_main(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 1
    return 0


def _above_assigned_fds(sock: socket.socket) -> socket.socket:
    if sock.fileno() > max(_ASSIGNED_FDS):
        return sock
    moved = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, max(_ASSIGNED_FDS) + 1)
    sock.close()
    return socket.socket(fileno=moved)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 1 << 20


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


if __name__ == "__main__":
    main()
