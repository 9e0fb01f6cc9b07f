"""Undo everything the run created — on a normal end, on an error, on ^C, SIGTERM or SIGHUP.

Each resource registers its own undo right after it exists; they run last-in first-out. SIGTERM
and SIGHUP are turned into an exception so the same unwinding happens as for ^C; while the undo
steps run, further ^C (and SIGTERM/SIGHUP) are ignored, so an impatient second ^C cannot leave
things behind.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any


class Interrupted(BaseException):
    """The run was asked to stop by a signal (derives from BaseException like KeyboardInterrupt,
    so ``except Exception`` blocks in the measurement code do not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Cleanup:
    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._saved: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        self.failures: list[str] = []

    def push(self, what: str, undo: Callable[[], None]) -> None:
        """Register ``undo`` (described by ``what``) to run at the end, before earlier ones."""
        self._steps.append((what, undo))

    def run_all(self) -> list[str]:
        """Run every undo step, newest first; returns one line per step that failed."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *_HANDLED)}
        try:
            while self._steps:
                what, undo = self._steps.pop()
                try:
                    undo()
                except Exception as exc:
                    line = f"cleanup: {what}: {exc}"
                    self.failures.append(line)
                    self._log(line)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.failures

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    def __enter__(self) -> Cleanup:
        for signum in _HANDLED:
            self._saved[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.run_all()
        finally:
            for signum, handler in self._saved.items():
                signal.signal(signum, handler)
