"""The exceptions netd raises: every message is a single line meant for the user.

Each is also one of common.errors' family, which tells the API layer its HTTP status
(Docker's: 404 for an unknown network or endpoint, 409 for a name or address in use, 403 for
the pre-defined networks); anything else is a plain ``NetdError``, an InvalidParameter (400).
"""

from __future__ import annotations

from common import errors


class NetdError(errors.InvalidParameter):
    """A network operation failed; nothing was left half-applied."""


class NotFound(NetdError, errors.NotFound):
    """No such network, or the container has no endpoint on it."""


class Conflict(NetdError, errors.Conflict):
    """A name, subnet, address or endpoint is taken, or a network still has endpoints."""


class Forbidden(NetdError, errors.Forbidden):
    """The operation is never allowed on this object (removing the default network)."""
