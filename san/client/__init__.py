"""The typed client of san's management API: SanClient's methods take and return the models (Pool, VDisk, Host,
Zone, Status) and raise ApiError subclasses carrying the server's message. The CLI, san-shell and the tests use it."""

from __future__ import annotations

from san.client.api import SanClient
from san.client.errors import ApiError, BadRequest, Conflict, NoSpace, NotFound, TooLarge, Unauthorized, Unavailable
from san.client.models import Container, Gateway, Host, Model, Pool, Session, Status, VDisk, Zone
from san.client.transport import DEFAULT_API, Transport

__all__ = [
    "DEFAULT_API",
    "ApiError",
    "BadRequest",
    "Conflict",
    "Container",
    "Gateway",
    "Host",
    "Model",
    "NoSpace",
    "NotFound",
    "Pool",
    "SanClient",
    "Session",
    "Status",
    "TooLarge",
    "Transport",
    "Unauthorized",
    "Unavailable",
    "VDisk",
    "Zone",
]
