"""The prctl(2) calls the proxies need, through one cached libc handle.

Resolving libc costs a dlopen and a few objects; the fork server resolves it once, so that a
forked proxy only calls it.

A proxy asks for SIGTERM when its parent dies, as docker-proxy gets from dockerd. A daemon with
live restore wants its proxies to outlive it instead (the next daemon adopts them): it starts
them with ``PYENGINE_PROXY_OUTLIVE_PARENT=1`` in their environment (exec), or the fork server
calls :func:`outlive_parent` in the child (fork); either makes
:func:`set_parent_death_signal` a no-op in that process.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_MEMORY_MERGE = 67  # Linux 6.4
OUTLIVE_PARENT_ENV = "PYENGINE_PROXY_OUTLIVE_PARENT"

# Read once, at import: an exec'd proxy's environment is its own from the start, and a forked
# proxy is told by outlive_parent(); reading os.environ in a forked child would copy ~0.1 MB.
_outlives_parent = os.environ.get(OUTLIVE_PARENT_ENV) == "1"


@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def resolve() -> None:
    """Look libc's prctl up now (the fork server does, before it forks anything)."""
    _prctl()


def set_parent_death_signal(signum: signal.Signals) -> bool:
    """Receive ``signum`` when the parent thread exits (PR_SET_PDEATHSIG); False if unavailable.
    Does nothing (and returns True) in a process that is to outlive its parent."""
    if _outlives_parent:
        return True
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def outlive_parent() -> bool:
    """Keep running when the parent dies: clear any parent-death signal set so far, and make
    later :func:`set_parent_death_signal` calls no-ops. False if prctl is unavailable."""
    global _outlives_parent
    _outlives_parent = True
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0) == 0


def enable_memory_merging() -> bool:
    """Offer all of this process's anonymous memory, and its children's, to kernel samepage
    merging (PR_SET_MEMORY_MERGE, Linux 6.4; inherited across fork). Inert unless the
    administrator runs KSM (/sys/kernel/mm/ksm/run = 1); False where the kernel lacks it."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0
