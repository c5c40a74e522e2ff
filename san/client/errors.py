"""The API's refusals as typed exceptions: each carries the server's one-line message and the HTTP status, so a
caller can tell a missing object (NotFound) from a conflict or a full pool without parsing text."""

from __future__ import annotations


class ApiError(Exception):
    """The API refused a request, or could not be reached (status 0); str() is the line to show."""

    status = 0

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    """400: the request is malformed or a value is invalid."""

    status = 400


class Unauthorized(ApiError):
    """401: no token, or not the server's."""

    status = 401


class NotFound(ApiError):
    """404: no such pool, vdisk, host or zone."""

    status = 404


class Conflict(ApiError):
    """409: the change conflicts with what exists (a name taken, a vdisk still zoned, a pool still used)."""

    status = 409


class TooLarge(ApiError):
    """413: the request body is too large."""

    status = 413


class NoSpace(ApiError):
    """507: the pool, or the storage under it, has no room."""

    status = 507


class Unavailable(ApiError):
    """503: the service cannot do it now (a pool offline, the store failing)."""

    status = 503


BY_STATUS: dict[int, type[ApiError]] = {cls.status: cls for cls in (BadRequest, Unauthorized, NotFound, Conflict, TooLarge,
                                                                     NoSpace, Unavailable)}  # fmt: skip


def error_for(status: int, message: str) -> ApiError:
    """The exception for an HTTP error status (ApiError itself for one without a class of its own)."""
    return BY_STATUS.get(status, ApiError)(message, status)
