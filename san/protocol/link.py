"""One connection between the controller and a gateway, used both ways: send() a request and await its answer;
requests from the peer go to a handler, whose answer goes back.

Every send has a timeout; requests from the peer run concurrently, at most max_inflight at once (a peer that sends
more is cut off: it cannot make us queue without bound). A malformed frame closes this connection, with one log line."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from san.protocol.codec import Envelope, FrameDecoder, ProtocolError, frame
from san.protocol.messages import Action, Message, Reason, Response

log = logging.getLogger("san.link")
READ_SIZE = 1 << 16
MAX_INFLIGHT = 1024
MAX_UNSENT = 16 << 20
MAX_LATE = 4096

Handler = Callable[[Message], Awaitable[Message]]


class LinkClosed(Exception):
    """The connection ended before the answer came (or the request timed out)."""


class Link:
    """A request/answer multiplexer over one stream (TLS in production, any stream in tests)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        peer: str,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.peer = peer
        self.max_inflight = max_inflight
        self.numbers = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Message]] = {}
        self.late: OrderedDict[int, None] = OrderedDict()  # requests that timed out: their answers may still come
        self.serving: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.why = ""

    async def run(self) -> None:
        """Read frames until the peer goes away, a frame is malformed, or close(); then fail every waiting send."""
        decoder = FrameDecoder()
        try:
            while not self.closed.is_set():
                data = await self.reader.read(READ_SIZE)
                if not data:
                    self._close("the peer closed the connection")
                    break
                for envelope in decoder.feed(data):
                    self._received(envelope)
        except ProtocolError as exc:
            log.error("closing the link to %s: %s", self.peer, exc)
            self._close(f"protocol error: {exc}")
        except (ConnectionError, OSError) as exc:
            self._close(f"connection lost: {exc}")
        finally:
            self._close(self.why or "closed")
            for task in list(self.serving):
                task.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def _received(self, envelope: Envelope) -> None:
        if envelope.answer:
            future = self.waiting.pop(envelope.number, None)
            if future is None:
                if envelope.number in self.late:
                    del self.late[envelope.number]  # its sender gave up waiting (and may have asked again)
                    return
                raise ProtocolError(f"an answer to request {envelope.number}, which was never sent")
            if not future.done():
                future.set_result(envelope.message)
            return
        if len(self.serving) >= self.max_inflight:
            raise ProtocolError(f"more than {self.max_inflight} requests at once")
        task = asyncio.ensure_future(self._serve(envelope))
        self.serving.add(task)
        task.add_done_callback(self.serving.discard)

    async def _serve(self, envelope: Envelope) -> None:
        try:
            answer = await self.handler(envelope.message)
        except Exception as exc:
            log.exception("answering %s from %s failed", type(envelope.message).__name__, self.peer)
            answer = Response(Action.FAIL, reason=Reason.IO_ERROR, message=f"the peer failed: {exc}")
        self._write(Envelope(True, envelope.number, answer))

    async def send(self, message: Message, timeout: float) -> Message:
        """Send a request; its answer. LinkClosed if the connection ends first or no answer comes within timeout."""
        if self.closed.is_set():
            raise LinkClosed(self.why)
        number = next(self.numbers)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.waiting[number] = future
        try:
            self._write(Envelope(False, number, message))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.late[number] = None
            if len(self.late) > MAX_LATE:
                self.late.popitem(last=False)
            raise LinkClosed(f"no answer to {type(message).__name__} within {timeout:g} s") from None
        finally:
            self.waiting.pop(number, None)

    def _write(self, envelope: Envelope) -> None:
        if self.closed.is_set():
            return
        try:
            self.writer.write(frame(envelope))
            if self.writer.transport.get_write_buffer_size() > MAX_UNSENT:
                self._close(f"the peer does not read (over {MAX_UNSENT >> 20} MiB unsent)")
                self.writer.transport.abort()
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._close(f"connection lost: {exc}")
        except ProtocolError as exc:
            log.error("cannot send to %s: %s", self.peer, exc)
            self.close(str(exc))

    def close(self, why: str = "closed here") -> None:
        self._close(why)
        self.writer.close()

    def _close(self, why: str) -> None:
        if not self.closed.is_set():
            self.why = why
            self.closed.set()
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(LinkClosed(why))
