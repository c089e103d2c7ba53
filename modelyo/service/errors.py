"""The refusals a Modelyo service raises: an HTTP status and an API error code with each.

Services raise these from plain Python (no HTTP in sight); `modelyo.service.http` turns them
into ``{"error": CODE, "detail": MESSAGE}`` answers with the status. Messages say what is wrong
and what to do.
"""

from __future__ import annotations

from modelyo.errors import ModelyoError


class ServiceError(ModelyoError):
    """A refusal with its HTTP status and the API's error code."""

    status = 500
    code = "internal"


class BadRequest(ServiceError):
    status, code = 400, "bad-request"


class Unauthenticated(ServiceError):
    status, code = 401, "unauthenticated"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not-found"


class Conflict(ServiceError):
    """409: the thing exists already, or is in the wrong state for the call."""

    status, code = 409, "conflict"


class AlreadyOwned(Conflict):
    """409: ownership was granted before; it is granted once."""

    code = "already-owned"


class TooLarge(ServiceError):
    status, code = 413, "too-large"


class Refused(ServiceError):
    status, code = 422, "refused"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


_BY_STATUS: dict[int, type[ServiceError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthenticated, Forbidden, NotFound, Conflict, TooLarge, Refused)
} | {503: Unavailable}


def error_for_status(status: int, message: str) -> ServiceError:
    """The refusal class of `status` (a plain `ServiceError` for other statuses)."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message)
    error = ServiceError(message)
    error.status = status if 400 <= status <= 599 else 500
    return error
