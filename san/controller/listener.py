"""The controller's listener for gateways: each verified connection (mutual TLS, a node of the cluster) registers as
an agent under its certificate's name, keeps its lease with heartbeats, and is answered like the in-process agent.

A connection that ends leaves its session to its lease: the agent is fenced once the lease has lapsed (or at once,
when it registers again)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

from san.cluster.pki import Cluster
from san.controller.agents import AgentSession
from san.protocol.link import Link
from san.protocol.messages import (
    PROTOCOL_VERSION,
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
)
from san.protocol.network import Listener, listen

if TYPE_CHECKING:
    from san.controller.service import ControllerService

log = logging.getLogger("san.controller")


class RemoteAgentLink:
    """The controller's AgentLink over one connection."""

    def __init__(self, link: Link, timeout: float) -> None:
        self.link = link
        self.timeout = timeout

    async def send(self, command: Command | Config) -> Response:
        answer = await self.link.send(command, self.timeout)
        if not isinstance(answer, Response):
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"the agent answered {type(answer).__name__}")
        return answer

    def close(self) -> None:
        self.link.close("fenced")


class Endpoint:
    """One gateway connection, as the controller answers it."""

    def __init__(self, service: ControllerService, peer: str, lease: float, timeout: float, own_name: str) -> None:
        self.service = service
        self.peer = peer
        self.own_name = own_name
        self.lease = lease
        self.timeout = timeout
        self.link: Link | None = None
        self.session: AgentSession | None = None

    async def handle(self, message: Message) -> Message:
        agents = self.service.controller.agents
        if isinstance(message, Register):
            return self._register(message)
        session = self.session
        if session is None or session.fenced:
            return Response(Action.FAIL, reason=Reason.FENCED, message="not registered (or fenced): register again")
        if isinstance(message, Heartbeat):
            if message.epoch != session.epoch or not agents.renew(session):
                return Response(Action.FAIL, reason=Reason.FENCED, message=f"epoch {message.epoch} is over")
            session.iscsi = message.sessions
            session.hosts = dict(Counter(s.initiator for s in message.sessions))
            return Response()
        if isinstance(message, (Fault, Allocated, Release, Flush)):
            await session.joined.wait()  # until grants elsewhere are taken back and its tables are there
            return await self.service.controller.handle(message, session.name)
        return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"a controller does not take {type(message).__name__}")

    def _register(self, message: Register) -> Message:
        if message.version != PROTOCOL_VERSION:
            why = f"protocol {message.version}; this controller speaks {PROTOCOL_VERSION}"
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=why)
        if message.name != self.peer:
            why = f"this connection is node {self.peer}, not {message.name!r}"
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=why)
        if self.peer == self.own_name:
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message="that is the controller's own name")
        assert self.link is not None
        agents = self.service.controller.agents
        self.session = agents.register(self.peer, RemoteAgentLink(self.link, self.timeout), self.lease)
        log.info("gateway %s registered (epoch %d)", self.peer, self.session.epoch)
        self.service.spawn(self.service.add_agent(self.session))
        return Registered(self.session.epoch, self.lease)

    def lost(self) -> None:
        """The connection ended: the session runs out with its lease."""
        if self.session is not None and not self.session.gone.is_set():
            self.service.spawn(self.service.controller.agents.fence(self.session, "its connection ended"))


class AgentListener:
    """Listens for gateways; start() once the controller service runs, stop() before it stops."""

    def __init__(self, service: ControllerService, cluster: Cluster, name: str, lease: float, timeout: float = 30.0) -> None:
        self.service = service
        self.cluster = cluster
        self.name = name
        self.lease = lease
        self.timeout = timeout
        self.server: Listener | None = None
        self.links: set[Link] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await listen(self.cluster, self.name, host, port, self._connected)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _connected(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoint = Endpoint(self.service, peer, self.lease, self.timeout, self.name)
        link = endpoint.link = Link(reader, writer, endpoint.handle, peer)
        self.links.add(link)
        try:
            await link.run()
        finally:
            self.links.discard(link)
            endpoint.lost()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for link in list(self.links):
            link.close("the controller is stopping")
        if self.server is not None:
            await self.server.wait_closed()
