"""Each side of the network link against a fake peer: the controller (a real one, on a real store) with a fake agent,
and a gateway's session with a fake controller. Lost answers, repeated and reordered messages, registrations that
replace each other, leases that lapse, a controller that is gone for good, strangers; and a gateway's own ends of
it: BUSY for I/O that waited too long, containers found by label.

The fakes speak the real protocol over mutual TLS on 127.0.0.1 (the cluster's certificates are made per test)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from san.agent.agent import Agent
from san.cluster.pki import Cluster
from san.controller.listener import AgentListener
from san.controller.service import ControllerService
from san.gateway.session import ControllerSession
from san.gateway.storage import Storage
from san.model import MIB
from san.protocol.codec import Envelope, frame
from san.protocol.link import Link
from san.protocol.messages import (
    Action,
    Allocated,
    Command,
    Config,
    Fault,
    Flush,
    Heartbeat,
    Message,
    Op,
    Reason,
    Register,
    Registered,
    Release,
    Response,
    SessionInfo,
)
from san.protocol.network import PeerRefused, connect, listen
from san.scsi.disk import Disk, Nexus
from san.scsi.pages import UnitInfo
from san.scsi.sense import Status
from san.storage.containers import ContainerError
from san.storage.label import Label, new_id, write_label

LEASE = 1.0


def certs(tmp_path: Path) -> Cluster:
    return Cluster.init(str(tmp_path / "certs"), ["controller", "gw1", "gw2"])


class FakeAgent:
    """A gateway as the controller meets it: answers every command OK and records what it was sent."""

    def __init__(self) -> None:
        self.received: list[Command | Config] = []
        self.events: list[str] = []
        self.drain = 0.0  # how long a blocking command waits (the agent's I/O draining)

    async def handle(self, message: Message) -> Message:
        assert isinstance(message, (Command, Config))
        self.received.append(message)
        if isinstance(message, Command) and message.blocking and self.drain:
            self.events.append(f"blocking {message.op.value}")
            await asyncio.sleep(self.drain)
        return Response()

    async def connect(self, cluster: Cluster, name: str, port: int) -> Link:
        _, reader, writer = await connect(cluster, name, "127.0.0.1", port)
        link = Link(reader, writer, self.handle, "controller")
        self.task = asyncio.ensure_future(link.run())
        return link


def with_controller(tmp_path: Path, body: Callable[[ControllerService, Cluster, int], Awaitable[None]]) -> None:
    async def main() -> None:
        cluster = certs(tmp_path)
        service = ControllerService(str(tmp_path / "data"))
        await service.start()
        listener = AgentListener(service, cluster, "controller", LEASE, timeout=2.0)
        await listener.start("127.0.0.1", 0)
        try:
            await body(service, cluster, listener.port)
        finally:
            await listener.stop()
            await service.stop()

    asyncio.run(main())


def test_nothing_is_answered_before_registration_and_a_name_is_its_certificates(tmp_path: Path) -> None:
    async def body(service: ControllerService, cluster: Cluster, port: int) -> None:
        agent = FakeAgent()
        link = await agent.connect(cluster, "gw1", port)
        before = await link.send(Fault(1, 0, 1, True, request=1), 5)
        assert isinstance(before, Response) and before.reason is Reason.FENCED
        assert (await link.send(Flush(request=2), 5)).reason is Reason.FENCED  # type: ignore[union-attr]
        wrong = await link.send(Register("gw2"), 5)
        assert isinstance(wrong, Response) and "node gw1" in wrong.message, "a gateway registers under its own name only"
        old = await link.send(Register("gw1", version=99), 5)
        assert isinstance(old, Response) and old.action is Action.FAIL
        registered = await link.send(Register("gw1"), 5)
        assert isinstance(registered, Registered) and registered.lease == LEASE
        assert (await link.send(Heartbeat(registered.epoch + 1), 5)).reason is Reason.FENCED  # type: ignore[union-attr]
        assert (await link.send(Heartbeat(registered.epoch), 5)).action is Action.OK  # type: ignore[union-attr]
        assert service.sessions("iqn.2024-01.org.example:h") == 0
        one = SessionInfo("iqn.2024-01.org.example:h", "198.18.0.9:40000", "400001370000", 1, False, False, (0,))
        census = Heartbeat(registered.epoch, sessions=(one, replace(one, tsih=2)))
        assert (await link.send(census, 5)).action is Action.OK  # type: ignore[union-attr]
        assert service.sessions("iqn.2024-01.org.example:h") == 2, "a host's sessions as the gateway's heartbeat said"
        await asyncio.sleep(0.2)
        assert any(isinstance(m, Config) for m in agent.received), "a registered agent is sent the configuration"
        link.close()

    with_controller(tmp_path, body)


def test_repeated_and_reordered_messages_change_nothing_twice(tmp_path: Path) -> None:
    async def body(service: ControllerService, cluster: Cluster, port: int) -> None:
        c = service.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 16 * MIB)
        agent = FakeAgent()
        link = await agent.connect(cluster, "gw1", port)
        assert isinstance(await link.send(Register("gw1"), 5), Registered)
        await asyncio.sleep(0.2)
        # A release that comes before anything was mapped there (reordered after a lost answer): OK, nothing freed.
        assert (await link.send(Release(v.id, 3, 1, request=5), 5)).action is Action.OK  # type: ignore[union-attr]
        first = await link.send(Fault(v.id, 2, 4, True, request=6), 5)  # a write to a ZERO segment: allocates
        assert isinstance(first, Response) and first.action is Action.RETRY and first.request == 6
        again = await link.send(Fault(v.id, 2, 4, True, request=6), 5)  # the same fault, its answer lost
        assert isinstance(again, Response) and again.entries == first.entries, "a repeated fault maps nothing new"
        assert [m.vseg for m in c.mappings(v.id, 0, 16)] == [2]
        bogus = await link.send(Allocated(v.id, ((5, 1, 60),), request=7), 5)
        assert isinstance(bogus, Response) and bogus.reason is Reason.BAD_COMMAND, "no report of what was never granted"
        for _ in range(2):
            assert (await link.send(Release(v.id, 2, 1, request=8), 5)).action is Action.OK  # type: ignore[union-attr]
        assert c.mappings(v.id, 0, 16) == []
        assert (await link.send(Flush(request=9), 5)).action is Action.OK  # type: ignore[union-attr]
        link.close()

    with_controller(tmp_path, body)


def test_two_agents_hear_of_each_others_allocations_and_unmaps_in_order(tmp_path: Path) -> None:
    """One vdisk, two agents: an allocation for one is told to the other before it is answered; an unmap is told to
    both (blocking) before the segments are unmapped, and a write fault that comes meanwhile waits, then gets a
    new segment, never the one being given back."""

    async def body(service: ControllerService, cluster: Cluster, port: int) -> None:
        c = service.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 16 * MIB)
        a, b = FakeAgent(), FakeAgent()
        link_a, link_b = await a.connect(cluster, "gw1", port), await b.connect(cluster, "gw2", port)
        assert isinstance(await link_a.send(Register("gw1"), 5), Registered)
        assert isinstance(await link_b.send(Register("gw2"), 5), Registered)
        await asyncio.sleep(0.3)
        first = await link_a.send(Fault(v.id, 2, 4, True, request=1), 5)
        assert isinstance(first, Response) and first.action is Action.RETRY and not first.grant, "no grants with two agents"
        told = [m for m in b.received if isinstance(m, Command) and m.op is Op.SET_ENTRIES and m.start == 2]
        assert told and told[0].entries[0][:2] == first.entries[0][:2], "the other agent heard before the answer"
        old = first.entries[0][:2]
        a.drain = 0.5
        releasing = asyncio.ensure_future(link_b.send(Release(v.id, 2, 1, request=2), 10))
        await asyncio.sleep(0.1)
        again = await link_a.send(Fault(v.id, 2, 4, True, request=3), 10)
        a.events.append("answered")
        assert (await releasing).action is Action.OK  # type: ignore[union-attr]
        assert isinstance(again, Response) and again.action is Action.RETRY
        assert a.events == ["blocking set_state", "answered"], "the fault waited for the unmap"
        assert again.entries[0][:2] != old, "a new segment, not the one given back"
        assert any(isinstance(m, Command) and m.op is Op.SET_STATE for m in b.received), "the releasing agent too"
        assert [(m.vseg, m.container_id, m.pseg) for m in c.mappings(v.id, 0, 16)] == [(2, *again.entries[0][:2])]
        link_a.close()
        link_b.close()

    with_controller(tmp_path, body)


def test_a_new_registration_ends_the_old_one_and_a_lapsed_lease_ends_the_session(tmp_path: Path) -> None:
    async def body(service: ControllerService, cluster: Cluster, port: int) -> None:
        agents = service.controller.agents
        first = await FakeAgent().connect(cluster, "gw1", port)
        one = await first.send(Register("gw1"), 5)
        assert isinstance(one, Registered)
        second = await FakeAgent().connect(cluster, "gw1", port)
        two = await second.send(Register("gw1"), 5)
        assert isinstance(two, Registered) and two.epoch > one.epoch, "every registration a new epoch"
        assert (await first.send(Heartbeat(one.epoch), 5)).reason is Reason.FENCED  # type: ignore[union-attr]
        assert [s.epoch for s in agents.sessions] == [two.epoch]
        # No heartbeat: after the lease (and its grace) the session is gone.
        deadline = time.monotonic() + LEASE + 5
        while agents.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert agents.sessions == [], "a lease that is not renewed lapses"
        assert (await second.send(Heartbeat(two.epoch), 5)).reason is Reason.FENCED  # type: ignore[union-attr]
        first.close()
        second.close()

    with_controller(tmp_path, body)


def test_an_agent_that_does_not_answer_is_fenced_and_the_command_goes_on(tmp_path: Path) -> None:
    async def body(service: ControllerService, cluster: Cluster, port: int) -> None:
        c = service.controller
        await c.create_pool("p", 64 * MIB)
        silent = FakeAgent()

        async def never(message: Message) -> Message:
            await asyncio.sleep(60)
            return Response()

        silent.handle = never  # type: ignore[method-assign]
        link = await silent.connect(cluster, "gw1", port)
        assert isinstance(await link.send(Register("gw1"), 5), Registered)
        started = time.monotonic()
        v = await c.create_vdisk("v", "p", 16 * MIB)  # its CREATE_TABLE is never answered
        took = time.monotonic() - started
        assert v.state == "ready" and c.agents.sessions == [], "the silent agent was fenced"
        assert 2.0 <= took < 2.0 + LEASE + 3, f"timeout, then the lease: {took:.1f} s"
        link.close()

    with_controller(tmp_path, body)


# -- the gateway's session against a fake controller ---------------------------------------------------------


class FakeAgentCore:
    """What the session calls on its agent when the lease lapses or it registers again."""

    def __init__(self) -> None:
        self.dropped = 0
        self.started_over = 0

    def drop_all(self, why: str) -> None:
        self.dropped += 1

    async def start_over(self, why: str) -> None:
        self.started_over += 1


class FakeController:
    """Registers anyone and renews leases while `renew` is set (else it hangs); loses the first answer to a Fault
    (closes the connection instead), answers the repeat."""

    def __init__(self) -> None:
        self.renew = True
        self.faults: list[int] = []
        self.registrations = 0
        self.links: list[Link] = []

    async def connected(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(reader, writer, lambda m: self.handle(link, m), peer)
        self.links.append(link)
        await link.run()

    async def handle(self, link: Link, message: Message) -> Message:
        if isinstance(message, (Register, Heartbeat)) and not self.renew:
            await asyncio.sleep(60)  # hung: the connection stays, nothing is answered
        if isinstance(message, Register):
            self.registrations += 1
            return Registered(self.registrations, LEASE)
        if isinstance(message, Heartbeat):
            return Response()
        if isinstance(message, Fault):
            self.faults.append(message.request)
            if len(self.faults) == 1:
                link.close("lost")
                await asyncio.sleep(60)
            return Response(Action.RETRY, start=message.segment, entries=((1, 7, 0),), request=message.request)
        return Response()


FakeBody = Callable[[FakeController, ControllerSession, FakeAgentCore], Awaitable[None]]


def with_fake_controller(tmp_path: Path, body: FakeBody) -> None:
    async def main() -> None:
        cluster = certs(tmp_path)
        fake = FakeController()
        server = await listen(cluster, "controller", "127.0.0.1", 0, fake.connected)
        port = server.sockets[0].getsockname()[1]
        session = ControllerSession(cluster, "gw1", [("127.0.0.1", port)], suspend_timeout=3.0, request_timeout=2.0)
        core = FakeAgentCore()

        async def handler(message: Command | Config) -> Response:
            return Response()

        session.attach(core, handler)  # type: ignore[arg-type]
        running = asyncio.ensure_future(session.run())
        try:
            await body(fake, session, core)
        finally:
            session.stop()
            running.cancel()
            server.close()

    asyncio.run(main())


def test_a_lost_answer_is_asked_again_on_a_new_connection(tmp_path: Path) -> None:
    async def body(fake: FakeController, session: ControllerSession, core: FakeAgentCore) -> None:
        answer = await session.send(Fault(1, 4, 1, False, request=77))
        assert answer.action is Action.RETRY and answer.request == 77 and answer.entries == ((1, 7, 0),)
        assert fake.faults == [77, 77], "the same request, sent again after the connection died"
        assert fake.registrations == 2 and core.started_over == 2, "each registration starts from nothing"

    with_fake_controller(tmp_path, body)


def test_a_link_lost_while_a_request_is_being_woken_is_waited_for_again(tmp_path: Path) -> None:
    async def body(fake: FakeController, session: ControllerSession, core: FakeAgentCore) -> None:
        await asyncio.wait_for(session.ready.wait(), 10)
        await session.send(Fault(1, 4, 1, False, request=1))  # the fake loses its first fault's answer: done now
        session.ready.clear()
        asking = asyncio.ensure_future(session.send(Flush(request=5)))
        await asyncio.sleep(0.01)  # it waits for the link
        session.ready.set()  # woken ...
        session.ready.clear()  # ... and the link is lost before it runs, as the session's end leaves it
        lost, session.link = session.link, None
        await asyncio.sleep(0.05)
        assert lost is not None and not asking.done(), "it waits for the next link"
        lost.close("lost")
        answer = await asyncio.wait_for(asking, 10)
        assert answer.action is Action.OK and fake.registrations >= 3, "answered over the next registration"

    with_fake_controller(tmp_path, body)


def test_a_lease_that_is_not_renewed_drops_the_agents_mappings(tmp_path: Path) -> None:
    async def body(fake: FakeController, session: ControllerSession, core: FakeAgentCore) -> None:
        await asyncio.wait_for(session.ready.wait(), 10)
        fake.renew = False
        started = time.monotonic()
        while not core.dropped and time.monotonic() - started < LEASE + 3:
            await asyncio.sleep(0.05)
        assert core.dropped == 1, "the lease lapsed on the gateway's side"
        assert time.monotonic() - started <= LEASE + 1

    with_fake_controller(tmp_path, body)


def test_a_controller_gone_for_good_fails_io_with_a_retryable_reason(tmp_path: Path) -> None:
    async def body(fake: FakeController, session: ControllerSession, core: FakeAgentCore) -> None:
        await asyncio.wait_for(session.ready.wait(), 10)
        session.controllers = [("127.0.0.1", 9)]  # nothing listens there
        for link in fake.links:
            link.close("controller gone")
        started = time.monotonic()
        answer = await session.send(Flush(request=5))
        assert answer.action is Action.FAIL and answer.reason is Reason.UNAVAILABLE
        assert 2.5 <= time.monotonic() - started <= 5, "it waited for the suspend timeout, no longer"

    with_fake_controller(tmp_path, body)


def test_commands_reach_a_registered_gateway(tmp_path: Path) -> None:
    async def body(fake: FakeController, session: ControllerSession, core: FakeAgentCore) -> None:
        await asyncio.wait_for(session.ready.wait(), 10)
        answer = await fake.links[-1].send(Command(Op.SET_STATE, vdisk=1, start=0, count=1, bits=2), 5)
        assert answer == Response()
        refused = await fake.links[-1].send(Fault(1, 0, 1, False), 5)
        assert isinstance(refused, Response) and refused.reason is Reason.BAD_COMMAND, "a gateway takes no faults"

    with_fake_controller(tmp_path, body)


def test_strangers_reach_no_controller(tmp_path: Path) -> None:
    """A plain TCP client sending a well-formed Register, a TLS client without a certificate, and a node of another
    cluster: refused before a byte is read; no session, nothing changed."""

    async def body(service: ControllerService, cluster: Cluster, port: int) -> None:
        theirs = Cluster.init(str(tmp_path / "theirs"), ["controller", "gw1"])
        hello = frame(Envelope(False, 1, Register("gw1")))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            assert b"msg" not in await asyncio.wait_for(reader.read(), 15), "a plain client is never answered"
        writer.close()
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.load_verify_locations(str(cluster.path / "ca.pem"))
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=anonymous)
            writer.write(hello)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 15) == b"", "no certificate, no conversation"
        with pytest.raises(PeerRefused):
            await connect(theirs, "gw1", "127.0.0.1", port)
        await asyncio.sleep(0.2)
        assert service.controller.agents.sessions == [], "no stranger registered"

    with_controller(tmp_path, body)


def test_io_that_waited_past_the_suspend_timeout_is_answered_busy() -> None:
    """The SCSI layer's end of a controller gone for good: BUSY (the initiator retries), not an error."""

    class Unreachable:
        async def send(self, message: Fault | Allocated | Release | Flush) -> Response:
            return Response(Action.FAIL, reason=Reason.UNAVAILABLE, message="the controller is unreachable (60 s)")

    async def body() -> None:
        agent = Agent(Unreachable())
        create = Command(Op.CREATE_TABLE, vdisk=1, nsegments=1, segment_blocks=2048, block_size=512, nblocks=2048)
        assert (await agent.handle(create)).action is Action.OK
        disk = Disk(1, agent, UnitInfo("0" * 16, 512, 2048, True), ("iqn.2003-01.org.san:t", 1))
        nexus = Nexus("host")
        await disk.execute(nexus, bytes(6), b"")  # the first command of a nexus: its unit attention
        reply = await disk.execute(nexus, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), b"")
        assert reply.status == Status.BUSY
        agent.close()

    asyncio.run(body())


def test_a_gateway_finds_containers_by_label_never_by_name(tmp_path: Path) -> None:
    store, ours, theirs = new_id(), new_id(), new_id()
    pools = tmp_path / "pools"
    pools.mkdir()

    def labelled(name: str, uuid: str) -> Path:
        path = pools / name
        path.write_bytes(bytes(1 << 20))
        fd = os.open(path, os.O_RDWR)
        try:
            write_label(fd, Label(store, uuid, new_id(), 3, 1, 1 << 20, 1, "p"))
        finally:
            os.close(fd)
        return path

    labelled("p.img", theirs)  # the name the controller knows: another container's label is on it now
    moved = labelled("renamed.img", ours)
    (pools / "link.img").symlink_to(moved)  # links are not followed
    storage = Storage([str(pools)])
    assert storage.locate(3, ours, store) == str(moved)
    with pytest.raises(ContainerError, match="carries the label"):
        storage.locate(3, new_id(), store)
    with pytest.raises(ContainerError, match="carries the label"):
        storage.locate(3, ours, new_id())  # the same container uuid under another store's id: not ours
    shutil.copyfile(moved, pools / "copy.img")
    with pytest.raises(ContainerError, match="taking none"):
        storage.locate(3, ours, store)


def test_a_gateway_registers_with_the_controller_only(tmp_path: Path) -> None:
    """Every node of a cluster has a certificate from its CA: one that is not the controller cannot pose as it."""

    async def main() -> None:
        cluster = certs(tmp_path)
        fake = FakeController()
        server = await listen(cluster, "gw2", "127.0.0.1", 0, fake.connected)  # another gateway, listening
        port = server.sockets[0].getsockname()[1]
        session = ControllerSession(cluster, "gw1", [("127.0.0.1", port)], suspend_timeout=1.0)
        running = asyncio.ensure_future(session.run())
        try:
            assert not await _ready(session, 2.0), "it never registered with a gateway"
            assert fake.registrations == 0
        finally:
            session.stop()
            running.cancel()
            server.close()

    asyncio.run(main())


async def _ready(session: ControllerSession, timeout: float) -> bool:
    try:
        await asyncio.wait_for(session.ready.wait(), timeout)
    except TimeoutError:
        return False
    return True
