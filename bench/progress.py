"""The terminal progress display: one line per finished step, with a count and a time estimate."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class Progress:
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    total: int = 0
    done: int = 0
    _started: float = field(default_factory=time.monotonic)

    def plan(self, steps: int) -> None:
        self.total += steps

    def note(self, text: str) -> None:
        """A line that is not a counted step (set-up, clean-up)."""
        print(f"[{_clock(time.monotonic() - self._started)}] {text}", file=self.stream, flush=True)

    def step(self, label: str, outcome: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self._started
        left = ""
        if 0 < self.done < self.total:
            left = f" ~{_clock(elapsed / self.done * (self.total - self.done))} left"
        width = len(str(self.total))
        print(
            f"[{self.done:>{width}}/{self.total} {_clock(elapsed)}{left}] {label}: {outcome}",
            file=self.stream,
            flush=True,
        )
