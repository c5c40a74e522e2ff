"""The asyncio shell around the iSCSI state machines: listens on the portals, feeds bytes in, writes bytes out.

Each SCSI task runs as its own coroutine, so one slow command or session never holds up the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import cast

from san.iscsi.connection import Connection, Task
from san.iscsi.target import Target
from san.scsi.disk import Reply
from san.scsi.sense import Key, Status, fixed_sense

log = logging.getLogger("san.iscsi")
PING_IDLE = 10.0
PING_TIMEOUT = 15.0
LOGIN_TIMEOUT = 15.0
MAX_TASKS_PER_CONNECTION = 256
HIGH_WATER = 4 << 20


class IscsiProtocol(asyncio.Protocol):
    """One TCP connection: reading pauses while too many tasks run or the peer reads too slowly."""

    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.connection: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.running: set[asyncio.Task[None]] = set()
        self.last_heard = time.monotonic()
        self.ping_sent: float | None = None
        self.paused = False
        self.peer_slow = False
        self.flush_scheduled = False
        self.opened = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        transport.set_write_buffer_limits(high=HIGH_WATER)
        local = transport.get_extra_info("sockname")
        self.connection = Connection(self.server.target, (local[0], local[1]) if local else None)
        self.server.protocols.add(self)

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        assert connection is not None
        self.last_heard = time.monotonic()
        self.ping_sent = None
        try:
            tasks = connection.receive(data)
        except Exception:
            log.exception("dropping a connection after an internal error on its input")
            connection.closing = True
            tasks = []
        view = connection.session.view if connection.session is not None else None
        for task in tasks:
            reply = view.execute_now(task.lun, task.cdb, task.buffer) if view is not None else None
            if reply is None:
                self._start(task)
            else:
                connection.complete(task, reply)
        self.flush()
        if len(self.running) >= MAX_TASKS_PER_CONNECTION and self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def _start(self, task: Task) -> None:
        task.started = True
        job = asyncio.ensure_future(self._run(task))
        self.running.add(job)
        job.add_done_callback(self._finished)

    def _finished(self, job: asyncio.Task[None]) -> None:
        self.running.discard(job)
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        transport = self.transport
        busy = self.peer_slow or len(self.running) >= MAX_TASKS_PER_CONNECTION // 2
        if self.paused and not busy and transport is not None and not transport.is_closing():
            self.paused = False
            transport.resume_reading()

    def pause_writing(self) -> None:
        """The peer reads slower than we answer: stop taking its commands until our send buffer drains."""
        self.peer_slow = True
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer_slow = False
        self._maybe_resume()

    async def _run(self, task: Task) -> None:
        connection = self.connection
        assert connection is not None and connection.session is not None
        try:
            reply = await connection.session.view.execute(task.lun, task.cdb, task.buffer)
        except Exception:
            log.exception("command %s failed inside the target", task.cdb[:1].hex())
            reply = Reply(Status.CHECK_CONDITION, sense=fixed_sense(Key.HARDWARE_ERROR, 0x44, 0x00))
        connection.complete(task, reply)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what the state machine queued; close the socket once it asked to be dropped."""
        self.flush_scheduled = False
        connection, transport = self.connection, self.transport
        if connection is None or transport is None or transport.is_closing():
            return
        if connection.outbox:
            transport.writelines(connection.outbox)
            connection.outbox.clear()
        if connection.closing:
            connection.forget()
            transport.close()

    def check_alive(self, now: float) -> None:
        """Ping an idle full-feature connection; drop it when the ping goes unanswered."""
        connection = self.connection
        if connection is None or self.transport is None:
            return
        if connection.session is None:
            if now - self.opened > LOGIN_TIMEOUT:
                log.warning("dropping a connection that did not log in within %s s", LOGIN_TIMEOUT)
                connection.close()
                self.transport.close()
            return
        if self.ping_sent is not None and now - self.ping_sent > PING_TIMEOUT:
            log.warning("dropping %s: no answer to a NOP-In ping", connection.initiator)
            connection.close()
            self.flush()
        elif self.ping_sent is None and now - self.last_heard > PING_IDLE:
            self.ping_sent = now
            connection.ping()
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.connection.close()
        self.server.protocols.discard(self)


class IscsiServer:
    """Listens on every portal of a target."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.servers: list[asyncio.Server] = []
        self.protocols: set[IscsiProtocol] = set()
        self.watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.target.portals:
            server = await loop.create_server(lambda: IscsiProtocol(self), host or None, port, reuse_address=True)
            self.servers.append(server)
        self.watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for protocol in list(self.protocols):
                protocol.check_alive(now)

    async def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watchdog
        for server in self.servers:
            server.close()
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.close()
        for server in self.servers:
            await server.wait_closed()
