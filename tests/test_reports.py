"""Reports that survive loss: an agent keeps the mappings it made from a grant until the controller has said OK,
and agent messages are idempotent, so one transient store error never turns an acknowledged write into zeros.

The crash is real: a child process does the writes and flushes and ends with os._exit (nothing more is committed,
as after kill -9); the parent opens the data directory again and reads the blocks back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from san._fastmap import ZERO
from san.agent.agent import Agent, AgentIOError
from san.model import VDisk
from san.protocol.messages import LOAD_CHUNK, Action, Allocated, Command, Fault, Flush, Op, Reason, Release, Response
from san.service import LOCAL_AGENT, Service
from san.store.check import check_store

MIB = 1 << 20
FAR = 2000  # a vdisk segment whose chunk of the persistent table is not cached when its report arrives

CHILD = textwrap.dedent(
    """
    import asyncio, os, sqlite3, sys
    from san.agent.agent import AgentIOError
    from san.service import Service

    MIB = 1 << 20

    async def main(data):
        service = Service(data, commit_interval=3600)
        await service.start()
        c = service.controller
        await c.create_pool("p", 64 * MIB)
        v = await c.create_vdisk("v", "p", 4096 * MIB)
        await asyncio.sleep(0.2)                      # the reserve fills: the first allocation brings a grant
        await service.agent.write(v.id, 0, b"first".ljust(512, b"."))
        await service.agent.flush()
        await service.agent.write(v.id, {far} * 2048, b"acknowledged".ljust(512, b"."))
        assert service.agent.volumes[v.id].unreported, "mapped from the grant, not yet reported"
        store = c.store
        real = store.mappings
        calls = []

        def transient(*args):                         # one store error, where the report is looked up
            if not calls:
                calls.append(args)
                raise sqlite3.OperationalError("disk I/O error")
            return real(*args)

        store.mappings = transient
        c.metadata.cache.clear()                      # as on a busy store: the report's chunk is read from disk
        try:
            await service.agent.flush()
            print("first flush succeeded")
        except AgentIOError as exc:
            print("first flush failed:", exc.reason.value)
        store.mappings = real
        print("kept:", len(service.agent.volumes[v.id].unreported))
        await service.agent.flush()
        print("second flush succeeded", flush=True)
        os._exit(0)                                   # as if killed: no clean stop, no further commit

    asyncio.run(main(sys.argv[1]))
    """
).format(far=FAR)


def test_an_acknowledged_write_survives_a_failed_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    child = subprocess.run([sys.executable, "-c", CHILD, str(data)], capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, child.stdout + child.stderr
    lines = child.stdout.splitlines()
    assert lines == ["first flush failed: io_error", "kept: 1", "second flush succeeded"], child.stdout + child.stderr

    async def after_crash() -> None:
        service = Service(str(data))
        await service.start()
        try:
            vdisk = service.controller.vdisk("v")
            assert bytes(await service.agent.read(vdisk.id, 0, 1)) == b"first".ljust(512, b".")
            data_read = bytes(await service.agent.read(vdisk.id, FAR * 2048, 1))
            assert data_read == b"acknowledged".ljust(512, b"."), data_read[:16]
        finally:
            await service.stop()

    assert check_store(str(data / "san.db"))[0] == []
    asyncio.run(after_crash())


async def _written_once(service: Service) -> VDisk:
    """A thin vdisk with one block written: its first write fault brought the agent a grant."""
    c = service.controller
    await c.create_pool("p", 64 * MIB)
    v = await c.create_vdisk("v", "p", 32 * MIB)
    await asyncio.sleep(0.1)  # the reserve fills
    await service.agent.write(v.id, 0, b"a".ljust(512, b"."))
    return v


def test_repeated_reports_and_releases_answer_ok(tmp_path: Path) -> None:
    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c = service.controller
            v = await _written_once(service)
            granted = next(iter(c.policy.grants[v.id]))
            report = Allocated(v.id, ((3, *granted),), request=41)
            first = await c.handle(report, LOCAL_AGENT)
            assert first.action is Action.OK and first.request == 41
            again = await c.handle(report, LOCAL_AGENT)
            assert again.action is Action.OK and again.request == 41, "the same report again (its answer was lost)"
            mapped = c.mappings(v.id, 3, 4)[0]
            assert (mapped.container_id, mapped.pseg) == granted
            other = c.mappings(v.id, 0, 1)[0]
            conflict = await c.handle(Allocated(v.id, ((3, other.container_id, other.pseg),)), LOCAL_AGENT)
            assert conflict.action is Action.FAIL and conflict.reason is Reason.BAD_COMMAND
            release = Release(v.id, 3, 1, request=42)
            assert (await c.handle(release, LOCAL_AGENT)).action is Action.OK
            assert (await c.handle(release, LOCAL_AGENT)).action is Action.OK, "a release repeated answers OK"
            assert c.mappings(v.id, 3, 4) == []
            assert (await c.handle(Flush(request=43), LOCAL_AGENT)).request == 43
        finally:
            await service.stop()

    asyncio.run(body())
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []


def test_a_faults_answer_never_overwrites_a_mapping_made_from_the_grant(tmp_path: Path) -> None:
    """The agent against a fake controller, the order that bench/cluster.py once hit through a gateway: a first write
    to segment 5 asks the controller; meanwhile a grant arrives and a write to segment 6 maps from it; then the first
    answer comes, allocating ahead over segment 6. Segment 6 must keep the grant's mapping (it holds the data)."""
    pool = tmp_path / "pool.img"
    pool.write_bytes(bytes(64 << 20))
    held = asyncio.Event()
    reported: list[Allocated] = []

    class FakeController:
        async def send(self, message: object) -> Response:
            if isinstance(message, Fault) and message.segment == 5:
                await held.wait()
                return Response(Action.RETRY, 5, ((1, 10, 0), (1, 11, 0)), request=message.request)
            if isinstance(message, Fault):
                grant = ((1, 50), (1, 51))
                return Response(Action.RETRY, message.segment, ((1, 20, 0),), grant=grant, request=message.request)
            if isinstance(message, Allocated):
                reported.append(message)
            return Response(request=getattr(message, "request", 0))

    async def body() -> None:
        agent = Agent(FakeController())
        await agent.handle(Command(Op.ATTACH_CONTAINER, container=1, path=str(pool)))
        create = Command(Op.CREATE_TABLE, vdisk=1, nsegments=16, segment_blocks=2048, block_size=512, nblocks=16 * 2048)
        await agent.handle(create)
        agent.volumes[1].table.set_entries(0, [(0, 0, ZERO)] * 16)  # loaded: all unmapped
        first = asyncio.ensure_future(agent.write(1, 5 * 2048, b"5" * 512))
        await asyncio.sleep(0.05)
        await agent.write(1, 2 * 2048, b"2" * 512)  # its answer brings a grant
        await agent.write(1, 6 * 2048, b"6" * 512)  # mapped from the grant, no round trip
        held.set()
        await first
        assert bytes(await agent.read(1, 6 * 2048, 1)) == b"6" * 512, "segment 6 still reads what was written"
        assert agent.volumes[1].table.get_entries(6, 1)[0][:2] == (1, 50)
        await agent.flush()
        assert any((6, 1, 50) in report.entries for report in reported)
        agent.close()

    asyncio.run(body())


def _fake_agent(pool: Path, controller: object, nsegments: int = 16) -> tuple[Agent, Command, Command]:
    pool.write_bytes(bytes(64 << 20))
    attach = Command(Op.ATTACH_CONTAINER, container=1, path=str(pool))
    create = Command(Op.CREATE_TABLE, vdisk=1, nsegments=nsegments, segment_blocks=2048, block_size=512, nblocks=nsegments * 2048)
    return Agent(controller), attach, create  # type: ignore[arg-type]


def test_one_load_per_chunk_however_many_ios_fault_on_it(tmp_path: Path) -> None:
    """32 reads at once on a table just created (every entry INVALID), all in one chunk: one load is asked for, and
    every read waits for its answer (each used to ask on its own, and each answer is a whole chunk of entries)."""
    loads: list[Fault] = []

    class FakeController:
        async def send(self, message: object) -> Response:
            assert isinstance(message, Fault)
            loads.append(message)
            await asyncio.sleep(0.05)
            start = message.segment - message.segment % LOAD_CHUNK
            return Response(Action.RETRY, start, ((0, 0, ZERO),) * 64, request=message.request)

    async def body() -> None:
        agent, attach, create = _fake_agent(tmp_path / "pool.img", FakeController(), 64)
        await agent.handle(attach)
        await agent.handle(create)
        reads = await asyncio.gather(*(agent.read(1, segment * 2048, 1) for segment in range(32)))
        assert all(bytes(data) == bytes(512) for data in reads)
        assert len(loads) == 1, [fault.segment for fault in loads]
        agent.close()

    asyncio.run(body())


def test_a_grant_answered_after_a_revoke_is_not_taken(tmp_path: Path) -> None:
    """A write fault is answered with a grant, but the controller revoked the vdisk's grants while the answer was on
    its way (another agent opened the table): those segments went back to the pool, so the agent must not map onto
    them. The next first write asks again instead."""
    held = asyncio.Event()
    asked: list[Fault] = []

    class FakeController:
        async def send(self, message: object) -> Response:
            if isinstance(message, Fault):
                asked.append(message)
                if len(asked) == 1:
                    await held.wait()
                    return Response(Action.RETRY, 2, ((1, 20, 0),), grant=((1, 50), (1, 51)), request=message.request)
                return Response(Action.RETRY, message.segment, ((1, 30, 0),), request=message.request)
            return Response(request=getattr(message, "request", 0))

    async def body() -> None:
        agent, attach, create = _fake_agent(tmp_path / "pool.img", FakeController())
        await agent.handle(attach)
        await agent.handle(create)
        agent.volumes[1].table.set_entries(0, [(0, 0, ZERO)] * 16)
        first = asyncio.ensure_future(agent.write(1, 2 * 2048, b"2" * 512))
        await asyncio.sleep(0.05)
        assert (await agent.handle(Command(Op.REVOKE_GRANT, vdisk=1))).action is Action.OK
        held.set()
        await first
        assert not agent.volumes[1].grant, "the revoked grant's segments are not the agent's"
        await agent.write(1, 3 * 2048, b"3" * 512)
        assert len(asked) == 2 and agent.volumes[1].table.get_entries(3, 1)[0][:2] == (1, 30)
        agent.close()

    asyncio.run(body())


def test_a_half_used_grant_is_reported_at_once_and_topped_up(tmp_path: Path) -> None:
    """A busy writer never waits for the report timer: once half of its grant is mapped, the agent reports, and the
    report's answer brings more segments, so first writes go on without a fault."""
    faults: list[Fault] = []
    reports: list[Allocated] = []

    class FakeController:
        async def send(self, message: object) -> Response:
            if isinstance(message, Fault):
                faults.append(message)
                grant = tuple((1, 100 + i) for i in range(4))
                return Response(Action.RETRY, message.segment, ((1, 10, 0),), grant=grant, request=message.request)
            if isinstance(message, Allocated):
                reports.append(message)
                return Response(grant=tuple((1, 200 + 4 * len(reports) + i) for i in range(4)), request=message.request)
            return Response(request=getattr(message, "request", 0))

    async def body() -> None:
        agent, attach, create = _fake_agent(tmp_path / "pool.img", FakeController())
        await agent.handle(attach)
        await agent.handle(create)
        agent.volumes[1].table.set_entries(0, [(0, 0, ZERO)] * 16)
        for segment in range(8):
            await agent.write(1, segment * 2048, bytes([segment + 1]) * 512)
            await asyncio.sleep(0.01)  # well under the report timer (REPORT_DELAY)
        assert len(faults) == 1, "the first write faults; the rest map from the grant and its top-ups"
        assert reports and reports[0].entries == ((1, 1, 100), (2, 1, 101)), reports
        mapped = {agent.volumes[1].table.get_entries(s, 1)[0][1] for s in range(8)}
        assert any(pseg >= 200 for pseg in mapped), "segments from a report's answer were used"
        for segment in range(8):
            assert bytes(await agent.read(1, segment * 2048, 1)) == bytes([segment + 1]) * 512
        agent.close()

    asyncio.run(body())


def test_a_report_tops_up_the_grant_of_the_one_agent_serving_the_vdisk(tmp_path: Path) -> None:
    """The controller's side of the early report: the answer to a report that used up half of the grant brings new
    segments, recorded as granted (so a later report of them is accepted) and mapped to nothing."""

    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c = service.controller
            v = await _written_once(service)
            volume = service.agent.volumes[v.id]
            granted = list(volume.grant)
            volume.grant.clear()  # the agent's own use of the grant is not under test here
            used = granted[: len(granted) // 2 + 1]
            answer = await c.handle(Allocated(v.id, tuple((1 + i, *s) for i, s in enumerate(used)), request=7), LOCAL_AGENT)
            assert answer.action is Action.OK and answer.grant, answer
            assert set(answer.grant) <= set(c.policy.grants[v.id]) and not set(answer.grant) & set(used)
            mapped = {(m.container_id, m.pseg) for m in c.mappings(v.id, 0, 64)}
            assert not set(answer.grant) & mapped
            report = Allocated(v.id, ((20, *answer.grant[0]),), request=8)
            assert (await c.handle(report, LOCAL_AGENT)).action is Action.OK
        finally:
            await service.stop()

    asyncio.run(body())
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []


def test_ios_waiting_for_one_question_share_its_failure(tmp_path: Path) -> None:
    """The controller unreachable: the one load asked for a cold chunk fails (UNAVAILABLE, after the suspend timeout
    in a gateway), and the 15 reads waiting for it fail with it, at once, instead of each asking again in turn."""
    asked: list[Fault] = []

    class FakeController:
        async def send(self, message: object) -> Response:
            assert isinstance(message, Fault)
            asked.append(message)
            await asyncio.sleep(0.3)
            return Response(Action.FAIL, reason=Reason.UNAVAILABLE, message="no controller", request=message.request)

    async def body() -> None:
        agent, attach, create = _fake_agent(tmp_path / "pool.img", FakeController(), 64)
        await agent.handle(attach)
        await agent.handle(create)
        started = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(*(agent.read(1, s * 2048, 1) for s in range(16)), return_exceptions=True)
        elapsed = asyncio.get_running_loop().time() - started
        assert all(isinstance(o, AgentIOError) and o.reason is Reason.UNAVAILABLE for o in outcomes), outcomes
        assert len(asked) == 1 and elapsed < 0.6, (len(asked), elapsed)
        agent.close()

    asyncio.run(body())


def test_nothing_granted_while_a_revoke_runs_is_kept(tmp_path: Path) -> None:
    """The report a revoke makes is answered with a grant (the controller's second agent went away meanwhile): the
    agent keeps none of it, since the controller takes the vdisk's whole grant back once the revoke is answered."""

    class FakeController:
        async def send(self, message: object) -> Response:
            if isinstance(message, Fault):
                grant = ((1, 100), (1, 101))
                return Response(Action.RETRY, message.segment, ((1, 10, 0),), grant=grant, request=message.request)
            return Response(grant=((1, 200), (1, 201)), request=getattr(message, "request", 0))

    async def body() -> None:
        agent, attach, create = _fake_agent(tmp_path / "pool.img", FakeController())
        await agent.handle(attach)
        await agent.handle(create)
        agent.volumes[1].table.set_entries(0, [(0, 0, ZERO)] * 16)
        await agent.write(1, 0, b"0" * 512)  # faults: its answer grants 100 and 101
        await agent.write(1, 2048, b"1" * 512)  # mapped from the grant, not yet reported
        assert agent.volumes[1].unreported
        assert (await agent.handle(Command(Op.REVOKE_GRANT, vdisk=1))).action is Action.OK
        assert not agent.volumes[1].grant and not agent.volumes[1].unreported
        agent.close()

    asyncio.run(body())


def test_a_nearly_full_pool_takes_back_idle_grants_before_it_says_no_space(tmp_path: Path) -> None:
    """Vdisk a was written once and holds a grant of free segments it may never use; vdisk b then fills the pool.
    b's last first writes get a's unused granted segments (a reports what it mapped and gives back the rest) rather
    than NO SPACE, and a's acknowledged block stays."""

    async def body() -> None:
        service = Service(str(tmp_path / "data"), reserve_segments=8)
        await service.start()
        try:
            c, agent = service.controller, service.agent
            pool = await c.create_pool("p", 17 * MIB)  # 16 segments of 1 MiB after the label's
            a = await c.create_vdisk("a", "p", 16 * MIB)
            b = await c.create_vdisk("b", "p", 32 * MIB)
            await asyncio.sleep(0.2)  # the reserve fills
            await agent.write(a.id, 0, b"a" * 512)
            held = len(c.policy.grants.get(a.id, {}))
            assert held >= 2, f"a holds a grant of {held} segments"
            free = c.usage(pool).capacity_bytes // MIB - 1 - held
            for segment in range(free + held):
                await agent.write(b.id, segment * 2048, bytes([segment + 1]) * 512)
            for segment in range(free + held):
                assert await agent.read(b.id, segment * 2048, 1) == bytes([segment + 1]) * 512
            assert await agent.read(a.id, 0, 1) == b"a" * 512
            with pytest.raises(AgentIOError) as full:
                await agent.write(b.id, (free + held) * 2048, b"z" * 512)
            assert full.value.reason is Reason.NO_SPACE, "now the pool is full"
            await agent.flush()
        finally:
            await service.stop()

    asyncio.run(body())
    assert check_store(str(tmp_path / "data" / "san.db"))[0] == []
