"""What every command shares: the daemon client it runs against, and the docker CLI's way of
failing (one line on stderr, then an exit code)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn

import click

from client.http import Client, DaemonError, DaemonUnreachable


def daemon_client(ctx: click.Context) -> Client:
    return ctx.find_root().obj


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def daemon_errors(exit_code: int = 1) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One line on stderr and a non-zero exit for every daemon error, as the docker CLI does."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except DaemonError as e:
                fail(f"Error response from daemon: {e}", exit_code)
            except DaemonUnreachable as e:
                fail(str(e), exit_code)

        return wrapper

    return decorate
