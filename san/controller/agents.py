"""The agents a controller knows: one session per agent name (its epoch, its link, its lease), and requests
(commands, configurations) sent to one or all of them.

A broadcast goes to every live agent at once. One that does not answer in time (or whose link is gone) stalls no one
for long: it is fenced (its lease is no longer renewed) and the broadcast goes on once that lease has lapsed, when
the agent has dropped every mapping it held. A request an agent refuses raises AgentFailure (unless the caller only
informs); the blocking flag is the agent's."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from san.errors import AgentFailure
from san.protocol.link import LinkClosed
from san.protocol.messages import Action, Command, Config, Response, SessionInfo
from san.protocol.transport import AgentLink

log = logging.getLogger("san.controller")
COMMAND_TIMEOUT = 30.0
GRACE = 1.0  # past the lease as the agent counts it (from when it sent its renewal), for I/O it had in flight


@dataclass(eq=False)
class AgentSession:
    """One registration of an agent: a new epoch each time; valid while its lease is renewed (inf: in-process)."""

    name: str
    epoch: int
    link: AgentLink
    lease: float = math.inf
    renewed: float = field(default_factory=time.monotonic)
    fenced: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    joined: asyncio.Event = field(default_factory=asyncio.Event)  # it has its containers, tables and Config
    hosts: dict[str, int] = field(default_factory=dict)  # initiator -> its sessions there, as of the last heartbeat
    iscsi: tuple[SessionInfo, ...] = ()  # those sessions, each as the last heartbeat told

    @property
    def expires(self) -> float:
        return self.renewed + self.lease + GRACE


class Agents:
    """The live sessions, in registration order; on_gone(session) runs once a fenced agent's lease has lapsed."""

    def __init__(self, timeout: float = COMMAND_TIMEOUT) -> None:
        self.timeout = timeout
        self.sessions: list[AgentSession] = []
        self.epochs = itertools.count(time.time_ns())  # every registration a new epoch, across restarts too
        self.on_gone: Callable[[AgentSession], None] | None = None
        self.registrations: Counter[str] = Counter()  # per agent name, since the controller started

    def __len__(self) -> int:
        return len(self.sessions)

    def names(self) -> set[str]:
        return {s.name for s in self.sessions}

    def register(self, name: str, link: AgentLink, lease: float = math.inf) -> AgentSession:
        """A new session for an agent; a previous one of the same name ends at once (that agent started over and
        holds nothing of it)."""
        for old in [s for s in self.sessions if s.name == name]:
            self._drop(old, "registered again")
        session = AgentSession(name, next(self.epochs), link, lease)
        self.sessions.append(session)
        self.registrations[name] += 1
        return session

    def renew(self, session: AgentSession) -> bool:
        """A heartbeat: extend the lease; False if the session is fenced or gone (the agent must register again)."""
        if session.fenced or session not in self.sessions:
            return False
        session.renewed = time.monotonic()
        return True

    def expire(self) -> None:
        """Drop the sessions whose lease has lapsed (their agents have dropped their mappings by now)."""
        now = time.monotonic()
        for session in [s for s in self.sessions if s.expires < now]:
            self._drop(session, "its lease lapsed")

    async def fence(self, session: AgentSession, why: str) -> None:
        """Stop renewing an agent's lease and wait until it has lapsed: then it holds no mapping any more."""
        if session.gone.is_set():
            return
        if not session.fenced:
            session.fenced = True
            log.warning("agent %s (epoch %d) fenced: %s", session.name, session.epoch, why)
            close = getattr(session.link, "close", None)
            if close is not None:
                close()
        delay = session.expires - time.monotonic()
        if delay > 0 and math.isfinite(delay):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.gone.wait(), delay)
        self._drop(session, why)

    def _drop(self, session: AgentSession, why: str) -> None:
        if session.gone.is_set():
            return
        session.fenced = True
        session.gone.set()
        if session in self.sessions:
            self.sessions.remove(session)
        log.info("agent %s (epoch %d) is gone: %s", session.name, session.epoch, why)
        if self.on_gone is not None:
            self.on_gone(session)

    async def broadcast(self, request: Command | Config, check: bool = True, joined_only: bool = False) -> None:
        """Send to every live agent in parallel (joined_only: those that have their tables and Config already); with
        check, a refusal raises once all have answered or been fenced."""
        sessions = [s for s in self.sessions if s.joined.is_set() or not joined_only]
        answers = await asyncio.gather(*(self.send(s, request, False) for s in sessions))
        if check:
            for response in answers:
                _check(request, response)

    async def send(self, session: AgentSession, request: Command | Config, check: bool = True) -> Response:
        """One request; an agent with a lease that does not answer within the timeout is fenced (and OK is returned
        once its lease has lapsed: it serves nothing of what the request would have changed). The in-process agent
        has no lease and no timeout: it cannot be cut off."""
        timeout = self.timeout if math.isfinite(session.lease) else None
        try:
            response = await asyncio.wait_for(session.link.send(request), timeout)
        except (LinkClosed, TimeoutError) as exc:
            await self.fence(session, f"no answer to {_what(request)}: {exc or 'timed out'}")
            return Response()
        if check:
            _check(request, response)
        return response


def _what(request: Command | Config) -> str:
    return request.op.value if isinstance(request, Command) else "the configuration"


def _check(request: Command | Config, response: Response) -> None:
    if response.action is Action.FAIL:
        raise AgentFailure(f"an agent refused {_what(request)}: {response.message}")
