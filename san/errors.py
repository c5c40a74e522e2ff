"""Errors a request can end in, each with the HTTP status the API answers and one clear line of text.

The controller raises them; the API turns them into 4xx answers; the CLI prints the line and exits 1."""

from __future__ import annotations


class SanError(Exception):
    """A request that cannot be carried out; nothing was changed."""

    status = 400


class InvalidRequest(SanError):
    status = 400


class NotFound(SanError):
    status = 404


class Conflict(SanError):
    status = 409


class NoSpace(SanError):
    status = 507


class AgentFailure(SanError):
    """An agent could not carry out a command (for example, no memory for a map table)."""

    status = 503


class StoreFailure(SanError):
    """The persistent tables could not be written; the change did not happen."""

    status = 503
