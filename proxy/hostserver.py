"""The host server: one warm fork server shared by every launched proxy on the host.

dockerd starts a userland proxy per published port and family by exec, and waits on that
process. Where it is pointed at the launcher (``pyengine-docker-proxy``, proxy/launcher.c), the
process it starts is a small C program that hands its fds to this server and waits; the server
forks the proxy from its warm interpreter, as pyengined's own fork server does
(proxy/forkserver.py documents why the loop is C and why the fork is plain), so an idle proxy
costs the launcher's few pages and its own ~50 kB instead of a whole Python.

The server belongs to no daemon: the first launcher that finds none starts it (setsid, double
fork) and every launcher on the host under the same uid and the same interpreter shares it. It
listens on a SOCK_SEQPACKET unix socket, mode 0600 in a 0700 directory, and serves only
connections from its own uid (SO_PEERCRED). Each connection carries one request, in the
fork server's format; the reply is ``{"id": N, "pid": P}`` with the proxy's pidfd attached, and
the connection then becomes the proxy's fd 6, its *lifeline*: the proxy stops when the launcher
goes away (end of file), and writes ``{"exited": C}`` on it as it exits, which the launcher
takes as its own exit code. Proxies outlive the server: killing it loses no listener, and the
next launcher starts another. It exits by itself once none of its proxies runs and nothing has
been asked of it for ``--idle-exit`` seconds (default $PYENGINE_PROXY_SERVER_IDLE_EXIT, else 600;
0: never).

    python -m proxy.hostserver --socket PATH [--ready-fd N] [--idle-exit SECONDS]

``--ready-fd``: the write end of a pipe, given ``0\\n`` once the server listens or ``1\\n<why>``.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import stat
import sys

from proxy import _forkloop
from proxy.forkserver import run_forked_proxy, warm_up

DEFAULT_IDLE_EXIT_SECONDS = 600
IDLE_EXIT_ENV = "PYENGINE_PROXY_SERVER_IDLE_EXIT"  # the default of --idle-exit, if set
BACKLOG = 512
USAGE = "usage: python -m proxy.hostserver --socket PATH [--ready-fd N] [--idle-exit SECONDS]"


class HostServerError(Exception):
    """The server cannot listen; the message says why in one line."""


def parse(argv: list[str]) -> tuple[str, int | None, int]:
    path: str | None = None
    ready_fd: int | None = None
    words = iter(argv)
    try:
        idle = int(os.environ.get(IDLE_EXIT_ENV, DEFAULT_IDLE_EXIT_SECONDS))
        for word in words:
            if word == "--socket":
                path = next(words)
            elif word == "--ready-fd":
                ready_fd = int(next(words))
            elif word == "--idle-exit":
                idle = int(next(words))
            else:
                raise ValueError(word)
    except (StopIteration, ValueError):
        path = None
    if not path or not os.path.isabs(path):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    return path, ready_fd, idle


def listen(path: str) -> socket.socket:
    """A SOCK_SEQPACKET socket listening at ``path`` (mode 0600), whose directory must be
    this uid's alone."""
    directory = os.path.dirname(path)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise HostServerError(f"{directory} must be a directory of uid {os.getuid()}, mode 0700")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        old = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(BACKLOG)
    except OSError as err:
        listener.close()
        raise HostServerError(f"cannot listen on {path}: {err.strerror or err}") from None
    return listener


def _tell(ready_fd: int | None, text: bytes) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, text)
    except OSError:
        pass
    finally:
        os.close(ready_fd)


def main(argv: list[str] | None = None) -> None:
    path, ready_fd, idle = parse(sys.argv[1:] if argv is None else argv)
    gc.disable()  # see proxy/forkserver.py main()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.chdir("/")
    warm_up()
    try:
        listener = listen(path)
    except (HostServerError, OSError) as err:
        _tell(ready_fd, b"1\n" + str(err).encode())
        sys.exit(1)
    identity = os.stat(path)
    _tell(ready_fd, b"0\n")
    # From here on the proxies' stderr, like docker-proxy's under dockerd, goes nowhere: the
    # log kept only the start-up (a failure there is what it is for).
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    forked = _forkloop.serve_host(listener.fileno(), idle)
    if forked is None:
        _unlink_if_ours(path, identity)
        sys.exit(0)
    payload, ready = forked
    run_forked_proxy(payload, ready, lifeline=True)


def _unlink_if_ours(path: str, identity: os.stat_result) -> None:
    """Remove the socket on the way out, unless a newer server has bound the path since."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
            os.unlink(path)
    except OSError:
        pass


if __name__ == "__main__":
    main()
