"""The agents a controller knows: their links, and commands sent to one or all of them.

A command an agent refuses raises AgentFailure (unless the caller only informs); the blocking flag is the agent's."""

from __future__ import annotations

from san.errors import AgentFailure
from san.protocol.messages import Action, Command, Response
from san.protocol.transport import AgentLink


class Agents:
    """The registered agents, in registration order."""

    def __init__(self) -> None:
        self.links: list[AgentLink] = []

    def __len__(self) -> int:
        return len(self.links)

    def add(self, link: AgentLink) -> None:
        self.links.append(link)

    async def broadcast(self, command: Command, check: bool = True) -> None:
        for link in self.links:
            await self.send(link, command, check)

    @staticmethod
    async def send(link: AgentLink, command: Command, check: bool = True) -> Response:
        response = await link.send(command)
        if check and response.action is Action.FAIL:
            raise AgentFailure(f"an agent refused {command.op.value}: {response.message}")
        return response
