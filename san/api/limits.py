"""Limits on what an HTTP client can make the API hold: request body size, time to send a request, connections.

BodyLimit answers 413 past MAX_BODY bytes; GuardedH11Protocol (uvicorn's h11 protocol) drops a connection that has
not sent a whole request within REQUEST_TIMEOUT seconds of opening or of its last answer, and at MAX_CONNECTIONS
makes room for a new one by dropping the oldest that is only waiting for a request, so clients trickling header
bytes can neither hold connections open nor keep the admin out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from san.api.asgi import ASGIApp, Message, Receive, Scope, Send, answer
from san.throttle import Throttle

log = logging.getLogger("san.api")
MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 512
_refusals = Throttle()


class BodyLimit:
    """ASGI middleware: a request body larger than limit bytes is refused (by its Content-Length, or as it streams)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await answer(send, 413, f"request body larger than {self.limit} bytes")
            return
        seen = 0
        answered = False

        async def limited() -> Message:
            nonlocal seen, answered
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                if not answered:
                    answered = True
                    await answer(send, 413, f"request body larger than {self.limit} bytes")
                return {"type": "http.disconnect"}  # the application stops reading, and its answer is dropped
            return message

        async def unless_answered(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, limited, unless_answered)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each whole request and a cap on open connections."""

    request_timeout = REQUEST_TIMEOUT
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: asyncio.TimerHandle | None = None
        self.refused = False
        self.waiting_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections and not self._make_room():
            self.refused = True
            self.transport = transport
            if _refusals.ready("full"):
                log.warning("refusing API connections: %d are open, all busy", len(self.connections))
            transport.abort()
            return
        super().connection_made(transport)
        self._arm()

    def _make_room(self) -> bool:
        """Drop the connection that has waited longest for its request (a slow client's, most likely)."""
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.deadline is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since)
        if _refusals.ready("evict"):
            log.warning(
                "API connections at the limit (%d): dropping the ones that wait longest for a request", len(self.connections)
            )
        oldest._disarm()
        oldest.transport.abort()
        self.connections.discard(oldest)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the whole request is in: the deadline is for the next one

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self.waiting_since = self.loop.time()
        self.deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE) and not self.transport.is_closing():
            self.transport.abort()  # at once: a TLS close would wait for the slow peer
