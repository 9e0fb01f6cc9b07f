"""The one exception type netd raises: every message is a single line meant for the user."""

from __future__ import annotations


class NetdError(Exception):
    """A network operation failed; nothing was left half-applied."""
