"""The asyncio shell around the iSCSI state machines: listens on the portals, feeds bytes in, writes bytes out.

Each SCSI task runs as its own coroutine, so one slow command or session never holds up the others. Connections
are limited in total and per source address; running out of descriptors pauses accepting and is logged."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import cast

from san.iscsi.connection import Connection, Task
from san.iscsi.target import Target
from san.model import shown
from san.scsi.disk import Reply
from san.scsi.sense import Key, Status, fixed_sense
from san.throttle import Throttle

log = logging.getLogger("san.iscsi")
PING_IDLE = 10.0
PING_TIMEOUT = 15.0
LOGIN_TIMEOUT = 15.0
DISCOVERY_LIFETIME = 60.0  # SendTargets takes a moment; an unauthenticated session is not kept for long
MAX_TASKS_PER_CONNECTION = 256
HIGH_WATER = 4 << 20
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 1.0
STARVED_QUIET = 5.0
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class Limits:
    """How many iSCSI connections san keeps open at once: in all, and from one source address."""

    total: int = 1024
    per_address: int = 64


class IscsiProtocol(asyncio.Protocol):
    """One TCP connection: reading pauses while too many tasks run or the peer reads too slowly."""

    def __init__(self, server: IscsiServer, peer: str) -> None:
        self.server = server
        self.peer = peer
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
        self.connection = Connection(self.server.target, (local[0], local[1]) if local else None, self.peer)
        peername = transport.get_extra_info("peername")
        if peername:
            self.connection.peer_port = peername[1]
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
        answering = not connection.closing  # a command that will not be answered is not counted either
        for task in tasks:
            arrived = task.arrived if answering and not task.aborted else 0
            reply = view.execute_now(task.lun, task.cdb, task.buffer, arrived) if view is not None else None
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
        if connection.session is not None and connection.session.discovery and now - self.opened > DISCOVERY_LIFETIME:
            log.info("dropping a discovery session from %s after %s s", self.peer, DISCOVERY_LIFETIME)
            connection.close()
            self.transport.close()
            return
        if connection.session is None:
            if now - self.opened > LOGIN_TIMEOUT:
                log.warning("dropping a connection that did not log in within %s s", LOGIN_TIMEOUT)
                connection.close()
                self.transport.close()
            return
        if self.ping_sent is not None and now - self.ping_sent > PING_TIMEOUT:
            log.warning("dropping %s at %s: no answer to a NOP-In ping", shown(connection.initiator), self.peer)
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
        self.server.release(self.peer)


class IscsiServer:
    """Listens on every portal of a target, accepting connections itself so that it can refuse those beyond the
    limits before they cost anything but the accept."""

    def __init__(self, target: Target, limits: Limits | None = None) -> None:
        self.target = target
        self.limits = limits or Limits()
        self.listeners: list[socket.socket] = []
        self.protocols: set[IscsiProtocol] = set()
        self.open: Counter[str] = Counter()
        self.watchdog: asyncio.Task[None] | None = None
        self.refusals = Throttle()
        self.starving = False
        self.starved_at = 0.0
        self.connecting: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.target.portals:
            for family, kind, proto, _, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                listener = socket.socket(family, kind, proto)
                try:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    listener.bind(address)
                    listener.listen(1024)
                    listener.setblocking(False)
                except OSError:
                    listener.close()
                    self._close_listeners()
                    raise
                self.listeners.append(listener)
                loop.add_reader(listener.fileno(), self._accept, listener)
        self.watchdog = asyncio.ensure_future(self._watch())

    def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self._starved(listener, exc)
                else:
                    log.warning("accepting an iSCSI connection failed: %s", exc)
                return
            peer = str(address[0])
            if sum(self.open.values()) >= self.limits.total or self.open[peer] >= self.limits.per_address:
                conn.close()
                if self.refusals.ready(peer):
                    total = sum(self.open.values())
                    log.warning(
                        "refusing iSCSI connections from %s: %d open from it (limit %d), %d in all (limit %d)",
                        peer, self.open[peer], self.limits.per_address, total, self.limits.total,
                    )  # fmt: skip
                continue
            self.open[peer] += 1
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(self._connect(loop, conn, peer))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, peer: str) -> None:
        try:
            await loop.connect_accepted_socket(lambda: IscsiProtocol(self, peer), conn)
        except OSError as exc:
            conn.close()
            self.release(peer)
            log.warning("could not set up an iSCSI connection from %s: %s", peer, exc)

    def _starved(self, listener: socket.socket, exc: OSError) -> None:
        """Out of descriptors: say so once an episode (it ends after STARVED_QUIET s without), stop accepting for a
        moment (the kernel keeps the backlog)."""
        loop = asyncio.get_running_loop()
        self.starved_at = time.monotonic()
        if not self.starving:
            self.starving = True
            log.error("cannot accept iSCSI connections: %s (%d open); pausing accepts", exc.strerror, sum(self.open.values()))
        loop.remove_reader(listener.fileno())
        loop.call_later(ACCEPT_PAUSE, self._resume, listener)

    def _resume(self, listener: socket.socket) -> None:
        if listener in self.listeners:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def release(self, peer: str) -> None:
        if self.open.get(peer, 0) > 1:
            self.open[peer] -= 1
        else:
            self.open.pop(peer, None)

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.remove_reader(listener.fileno())
            listener.close()
        self.listeners.clear()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if self.starving and now - self.starved_at > STARVED_QUIET:
                self.starving = False
                log.info("accepting iSCSI connections again (%d open)", sum(self.open.values()))
            for protocol in list(self.protocols):
                protocol.check_alive(now)

    async def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watchdog
        self._close_listeners()
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.close()
        await asyncio.sleep(0)
