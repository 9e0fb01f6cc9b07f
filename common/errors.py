"""The error family every component raises for a request it cannot carry out as asked.

The API answers each with Docker's status and the message as one line: NotFound 404,
Conflict 409, Forbidden 403, InvalidParameter 400. Components keep their own names as
subclasses (``ContainerNotFound``, ``netd.errors.Conflict``, ...); a class that is two of
these is answered by the first in that order.
"""

from __future__ import annotations


class NotFound(Exception):
    """No object answers to the name or ID given: 404."""


class Conflict(Exception):
    """The object's state or a name, address or port in use stands in the way: 409."""


class Forbidden(Exception):
    """An operation refused on purpose whatever the state (removing a pre-defined network): 403."""


class InvalidParameter(Exception):
    """A request understood but not accepted as given: 400."""
