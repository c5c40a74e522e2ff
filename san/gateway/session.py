"""A gateway's session with the controller over the network: connect (mutual TLS), register for a new epoch, keep
the lease with heartbeats, and carry the agent's messages, waiting through outages.

The seed's rules (EP 1 178 407 [0026]-[0027]): while the lease holds, I/O that needs no fault goes on; once it has
lapsed every entry is INVALID and I/O waits for the controller; a message that waited longer than suspend_timeout
fails with UNAVAILABLE (the initiator is told to retry). Every message is idempotent, so one is sent again on a new
connection when the old one died before its answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from san.agent.agent import Agent
from san.cluster.pki import Cluster
from san.protocol.link import Link, LinkClosed
from san.protocol.messages import (
    Action,
    Allocated,
    Command,
    Config,
    Fault,
    Flush,
    Heartbeat,
    Message,
    Reason,
    Register,
    Registered,
    Release,
    Response,
    SessionInfo,
)
from san.protocol.network import PeerRefused, connect

log = logging.getLogger("san.gateway")
REQUEST_TIMEOUT = 30.0
RETRY_FIRST = 0.2
RETRY_MAX = 5.0

Handler = Callable[[Command | Config], Awaitable[Response]]


class ControllerSession:
    """The agent's ControllerLink over the network; run() keeps it connected until stop()."""

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        controllers: list[tuple[str, int]],
        suspend_timeout: float = 60.0,
        request_timeout: float = REQUEST_TIMEOUT,
        controller_names: tuple[str, ...] = ("controller",),
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.controller_names = controller_names
        self.controllers = controllers
        self.suspend_timeout = suspend_timeout
        self.request_timeout = request_timeout
        self.handler: Handler | None = None
        self.agent: Agent | None = None
        self.on_registered: Callable[[], None] | None = None
        self.census: Callable[[], tuple[SessionInfo, ...]] | None = None
        self.link: Link | None = None
        self.ready = asyncio.Event()
        self.epoch = 0
        self.lease = 0.0
        self.valid_until = 0.0  # monotonic: the lease as this side must assume it (from when the renewal was sent)
        self.expired = True
        self.registrations = 0
        self.drops = 0  # times the agent dropped its mappings (a lapse, a new registration)
        self.stopping = False

    def attach(
        self,
        agent: Agent,
        handler: Handler,
        on_registered: Callable[[], None] | None = None,
        census: Callable[[], tuple[SessionInfo, ...]] | None = None,
    ) -> None:
        """The agent and the handler of the controller's requests; census() the iSCSI sessions for each heartbeat."""
        self.agent = agent
        self.handler = handler
        self.on_registered = on_registered
        self.census = census

    async def send(self, message: Fault | Allocated | Release | Flush) -> Response:
        """The controller's answer; while it is unreachable, wait (up to suspend_timeout), then FAIL UNAVAILABLE."""
        deadline = time.monotonic() + self.suspend_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not (self.ready.is_set() or await _wait(self.ready, left)):
                return Response(
                    Action.FAIL, reason=Reason.UNAVAILABLE, message=f"the controller is unreachable ({self.suspend_timeout:g} s)"
                )
            link = self.link
            if link is None:  # lost again between being woken and running: wait for the next one
                continue
            drops = self.drops
            try:
                answer = await link.send(message, min(self.request_timeout, max(left, 0.1)))
            except LinkClosed:
                await asyncio.sleep(0.05)
                continue  # idempotent: sent again once a connection is back
            if self.drops != drops:
                continue  # the mappings were dropped while it was asked: an answer from before is stale now
            if not isinstance(answer, Response):
                what = type(answer).__name__
                return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"the controller answered {what}")
            if answer.reason is Reason.FENCED:
                link.close("fenced by the controller")
                continue
            return answer

    async def run(self) -> None:
        """Connect, register and serve until stop(); reconnect after every loss, to each controller in turn."""
        delay = RETRY_FIRST
        turn = 0
        watchdog = asyncio.ensure_future(self._watch_lease())
        try:
            while not self.stopping:
                host, port = self.controllers[turn % len(self.controllers)]
                turn += 1
                try:
                    peer, reader, writer = await connect(self.cluster, self.name, host, port)
                except PeerRefused as exc:
                    log.warning("%s; trying again in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_FIRST
                await self._serve(Link(reader, writer, self._handle, peer), f"{host}:{port}")
        finally:
            watchdog.cancel()

    async def _handle(self, message: Message) -> Message:
        if self.handler is None:
            return Response(Action.FAIL, reason=Reason.UNAVAILABLE, message="the gateway is not ready")
        if not isinstance(message, (Command, Config)):
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"a gateway does not take {type(message).__name__}")
        return await self.handler(message)

    async def _serve(self, link: Link, where: str) -> None:
        reading = asyncio.ensure_future(link.run())
        try:
            peer = link.peer
            if peer not in self.controller_names:
                expected = ", ".join(self.controller_names)
                log.error("%s is node %s, not the controller (%s): not registering there", where, peer, expected)
                await asyncio.sleep(RETRY_MAX)
                return
            if self.agent is not None:  # a new epoch starts from nothing: the controller's tables are the truth
                self.drops += 1
                await self.agent.start_over("registering with the controller again")
            sent = time.monotonic()
            answer = await link.send(Register(self.name), self.request_timeout)
            if not isinstance(answer, Registered):
                log.error("the controller at %s refused registration: %s", where, getattr(answer, "message", answer))
                await asyncio.sleep(RETRY_MAX)
                return
            if self.on_registered is not None:
                self.on_registered()
            self.epoch, self.lease = answer.epoch, answer.lease
            self.valid_until = sent + self.lease
            self.expired = False
            self.registrations += 1
            self.link = link
            log.info("registered with the controller at %s (epoch %d, lease %g s)", where, self.epoch, self.lease)
            self.ready.set()
            await self._heartbeats(link)
        except LinkClosed as exc:
            log.warning("lost the controller at %s: %s", where, exc)
        finally:
            self.ready.clear()
            self.link = None
            link.close()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading

    async def _heartbeats(self, link: Link) -> None:
        """Renew the lease four times a lease; the renewal counts from when it was sent. A heartbeat that gets no
        answer is not the end of the link (the controller may be busy): the link is given up once the lease has
        lapsed, or at once when the controller says this epoch is over."""
        while not link.closed.is_set():
            await _wait(link.closed, self.lease / 4)
            if link.closed.is_set():
                break
            sent = time.monotonic()
            try:
                census = self.census() if self.census is not None else ()
                answer = await link.send(Heartbeat(self.epoch, sessions=census), self.lease / 2)
            except LinkClosed:
                if link.closed.is_set() or time.monotonic() > self.valid_until:
                    raise
                continue
            if isinstance(answer, Response) and answer.action is Action.OK:
                self.valid_until = sent + self.lease
            else:
                log.warning("the controller ended this gateway's epoch %d: registering again", self.epoch)
                link.close("fenced")

    async def _watch_lease(self) -> None:
        """Once the lease has lapsed, drop every mapping: I/O waits for the controller from then on."""
        while True:
            await asyncio.sleep(0.1)
            if not self.expired and time.monotonic() > self.valid_until:
                self.expired = True
                log.error("the lease lapsed (no word from the controller for %g s): I/O waits for it", self.lease)
                self.drops += 1
                if self.agent is not None:
                    self.agent.drop_all("the lease lapsed")
                if self.link is not None:  # a new epoch, not a renewal of this one: the controller drops the old
                    self.link.close("the lease lapsed")

    def stop(self) -> None:
        self.stopping = True
        if self.link is not None:
            self.link.close("stopping")


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return event.is_set()
    return True
