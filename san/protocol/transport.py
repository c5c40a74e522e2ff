"""How messages travel: the link interfaces each side talks through, and the in-process implementation.

A network transport implements the same two links; neither the agent nor the controller changes."""

from __future__ import annotations

from typing import Protocol

from san.protocol.messages import Allocated, Command, Config, Fault, Flush, Release, Response


class ControllerLink(Protocol):
    """The agent's line to the controller."""

    async def send(self, message: Fault | Allocated | Release | Flush) -> Response: ...


class AgentLink(Protocol):
    """The controller's line to one agent (and the gateway it serves)."""

    async def send(self, command: Command | Config) -> Response: ...


class FaultHandler(Protocol):
    async def handle(self, message: Fault | Allocated | Release | Flush, agent: str = "") -> Response: ...


class CommandHandler(Protocol):
    async def handle(self, command: Command | Config) -> Response: ...


class LocalControllerLink:
    """Agent -> controller in one process: a direct call, as the agent of that name."""

    def __init__(self, controller: FaultHandler, agent: str) -> None:
        self.controller = controller
        self.agent = agent

    async def send(self, message: Fault | Allocated | Release | Flush) -> Response:
        return await self.controller.handle(message, self.agent)


class LocalAgentLink:
    """Controller -> agent in one process: a direct call, awaited for blocking commands."""

    def __init__(self, agent: CommandHandler) -> None:
        self.agent = agent

    async def send(self, command: Command | Config) -> Response:
        return await self.agent.handle(command)
