"""The two prctl(2) calls the proxies need, through one cached libc handle.

Resolving libc costs a dlopen and a few objects; the fork server resolves it once, so that a
forked proxy only calls it.
"""

from __future__ import annotations

import ctypes
import functools
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15
PR_SET_MEMORY_MERGE = 67  # Linux 6.4


@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def resolve() -> None:
    """Look libc's prctl up now (the fork server does, before it forks anything)."""
    _prctl()


def set_parent_death_signal(signum: signal.Signals) -> bool:
    """Receive ``signum`` when the parent thread exits (PR_SET_PDEATHSIG); False if unavailable."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def set_process_name(name: bytes) -> bool:
    """Set the name ps and top show (PR_SET_NAME: at most 15 bytes are kept)."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_NAME, name, 0, 0, 0) == 0


def enable_memory_merging() -> bool:
    """Offer all of this process's anonymous memory, and its children's, to kernel samepage
    merging (PR_SET_MEMORY_MERGE, Linux 6.4; inherited across fork). Inert unless the
    administrator runs KSM (/sys/kernel/mm/ksm/run = 1); False where the kernel lacks it."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0
