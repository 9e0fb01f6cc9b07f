"""The exceptions netd raises: every message is a single line meant for the user.

The subclasses tell the API layer which HTTP status a failure maps to (Docker's: 404 for an
unknown network or endpoint, 409 for a name or address in use, 403 for the pre-defined
networks); anything else is a plain ``NetdError`` (400 or 500, the caller's choice).
"""

from __future__ import annotations


class NetdError(Exception):
    """A network operation failed; nothing was left half-applied."""


class NotFound(NetdError):
    """No such network, or the container has no endpoint on it."""


class Conflict(NetdError):
    """A name, subnet, address or endpoint is taken, or a network still has endpoints."""


class Forbidden(NetdError):
    """The operation is never allowed on this object (removing the default network)."""
