"""common.errors: every component's errors belong to one family, which the API maps to
Docker's status codes in one place."""

from __future__ import annotations

import pytest

from common import errors
from engine.api import common as api_common
from engine.api.app import _STATUS
from engine.images.store import ImageConflict, ImageLoadError, ImageNotFound
from engine.lifecycle.containers import ContainerConflict, ContainerNotFound
from engine.lifecycle.engine import InvalidParameter, NotRunning
from engine.runtime.runc import ContainerStartError
from netd import errors as netd_errors
from netd.firewall import FirewallError


def _status(exc: BaseException) -> int:
    for kinds, status in _STATUS:
        if isinstance(exc, kinds):
            return status
    return 500


@pytest.mark.parametrize(
    ("exc", "family", "status"),
    [
        (ContainerNotFound("x"), errors.NotFound, 404),
        (ImageNotFound("x"), errors.NotFound, 404),
        (api_common.NotFound("x"), errors.NotFound, 404),
        (netd_errors.NotFound("x"), errors.NotFound, 404),
        (ContainerConflict("x"), errors.Conflict, 409),
        (NotRunning("x"), errors.Conflict, 409),
        (ImageConflict("x"), errors.Conflict, 409),
        (netd_errors.Conflict("x"), errors.Conflict, 409),
        (api_common.Forbidden("x"), errors.Forbidden, 403),
        (netd_errors.Forbidden("x"), errors.Forbidden, 403),
        (InvalidParameter("x"), errors.InvalidParameter, 400),
        (api_common.BadParameter("x"), errors.InvalidParameter, 400),
        (ImageLoadError("x"), errors.InvalidParameter, 400),
        (ContainerStartError("x"), errors.InvalidParameter, 400),
        (netd_errors.NetdError("x"), errors.InvalidParameter, 400),
        (FirewallError("x"), errors.InvalidParameter, 400),
    ],
)
def test_family_and_status(exc: Exception, family: type[Exception], status: int) -> None:
    assert isinstance(exc, family)
    assert _status(exc) == status


def test_other_statuses() -> None:
    assert _status(api_common.NotImplementedByEngine("x")) == 501
    assert _status(ValueError("x")) == 400
    assert _status(RuntimeError("x")) == 500
