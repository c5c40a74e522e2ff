"""Fault policy: the controller's answers to agents (faults, allocation reports, releases, flushes).

What to allocate and when lives here; the mappings go through the metadata object, segments through the allocator."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from san._fastmap import ERROR, INVALID, NOWRITE, SHARED, ZERO, runs_bitmap
from san.controller.allocator import PoolAllocator, Segment
from san.errors import StoreFailure
from san.model import Pool, VDisk
from san.protocol.messages import (
    LOAD_CHUNK,
    Action,
    Allocated,
    Command,
    Entry,
    Fault,
    Flush,
    Op,
    Reason,
    Release,
    Response,
)
from san.store.store import Mapping

if TYPE_CHECKING:
    from san.controller.agents import AgentSession
    from san.controller.controller import Controller

log = logging.getLogger("san.controller")
MAX_RESERVE_BYTES = 8 << 30
MAX_GRANT = 256

AgentMessage = Fault | Allocated | Release | Flush


class FaultPolicy:
    """Answers every message an agent sends; never raises (a failure is a FAIL response with its reason)."""

    def __init__(self, controller: Controller, grant_segments: int = 8) -> None:
        self.controller = controller
        self.grant_segments = grant_segments
        self.grants: dict[int, dict[Segment, None]] = {}  # vdisk -> segments its grant holder may map on its own
        self.owners: dict[int, str] = {}  # vdisk -> the agent that holds its grant
        self.grant_targets: dict[int, int] = {}  # grows while a vdisk's grant keeps running dry
        self.vdisk_locks: dict[int, asyncio.Lock] = {}  # with several agents: one mapping change per vdisk at a time
        self.revoking: set[int] = set()  # vdisks whose grant is being taken back: nothing is granted meanwhile

    async def handle(self, message: AgentMessage, agent: str = "") -> Response:
        """The answer to one agent's message. With other agents serving the vdisk, they are told first, one change
        of that vdisk at a time: of a new mapping (so none of them serves its old ZERO entry), of an unmap (with the
        blocking flag, before the segments can be freed)."""
        try:
            if isinstance(message, Flush):
                await self.controller.flush()
                response = Response()
            elif isinstance(message, Fault) and not message.write:
                response = self.handle_fault(message, agent)
            elif not self._others(agent):
                response = await self._change(message, agent)
            else:
                async with self.vdisk_locks.setdefault(message.vdisk, asyncio.Lock()):
                    response = await self._change(message, agent)
        except StoreFailure as exc:
            response = Response(Action.FAIL, reason=self.controller.store_reason(exc), message=str(exc))
        except OSError as exc:
            log.error("cannot answer %s: %s", type(message).__name__, exc)
            response = Response(Action.FAIL, reason=Reason.IO_ERROR, message=str(exc))
        return response.answering(message.request) if message.request else response

    async def _change(self, message: Fault | Allocated | Release, agent: str) -> Response:
        """A write fault, a report or a release: what may change a mapping. While a snapshot of the vdisk is being
        taken, those that come after its writes were fenced wait until it is recorded."""
        fence = self.controller.snapshots.fence(message.vdisk, agent, isinstance(message, Allocated))
        if fence is not None:
            await fence.wait()
        if isinstance(message, Allocated):
            response = self.record_allocated(message, agent)
            if response.action is Action.OK:
                for vseg, container_id, pseg in message.entries:
                    await self._tell_others(agent, message.vdisk, vseg, [(container_id, pseg, 0)])
            return response
        if isinstance(message, Release):
            refused = self.check_release(message)
            if refused is not None:
                return refused
            # Every agent, the releasing one too (a mapping another agent made meanwhile may have reached it), sets
            # the range ZERO and waits for its I/O there; only then can the segments be unmapped and, once that is
            # committed, freed.
            everyone = list(self.controller.agents.sessions) if self._others(agent) else []
            zero = Command(Op.SET_STATE, vdisk=message.vdisk, start=message.start, count=message.count, bits=ZERO, blocking=True)
            await asyncio.gather(*(self.controller.agents.send(s, zero, check=False) for s in everyone))
            return self.release(message)
        await self._stock(message.vdisk)
        response = self.handle_fault(message, agent)
        if response.reason is Reason.NO_SPACE and await self._reclaim(message.vdisk):
            await self._stock(message.vdisk)  # what came back is free: zero some of it into the reserve
            response = self.handle_fault(message, agent)
        if response.action is Action.RETRY and response.entries:
            await self._tell_others(agent, message.vdisk, response.start, list(response.entries))
        return response

    def _others(self, agent: str) -> list[AgentSession]:
        return [s for s in self.controller.agents.sessions if s.name != agent]

    def _ready(self, vdisk_id: int) -> VDisk | None:
        vdisk = self.controller.vdisks.get(vdisk_id)
        return vdisk if vdisk is not None and vdisk.state == "ready" and self.controller.online(vdisk.pool_id) else None

    async def _tell_others(self, agent: str, vdisk: int, start: int, entries: list[Entry]) -> None:
        others = self._others(agent)
        if others and entries:
            command = Command(Op.SET_ENTRIES, vdisk=vdisk, start=start, entries=tuple(entries))
            await asyncio.gather(*(self.controller.agents.send(s, command, check=False) for s in others))

    def handle_fault(self, fault: Fault, agent: str = "") -> Response:
        controller = self.controller
        vdisk = self._ready(fault.vdisk)
        if vdisk is None:
            return Response(Action.FAIL, reason=Reason.NO_VDISK, message=f"no vdisk {fault.vdisk}")
        pool = controller.pools[vdisk.pool_id]
        nsegments = vdisk.nsegments(pool.segment_size)
        if not 0 <= fault.segment < nsegments:
            return Response(Action.FAIL, reason=Reason.OUT_OF_RANGE, message=f"segment {fault.segment}")
        if fault.state & INVALID:
            start = fault.segment - fault.segment % LOAD_CHUNK
            entries, alternates = self.controller.snapshots.entries(vdisk, start, min(start + LOAD_CHUNK, nsegments))
            return Response(Action.RETRY, start, entries, alternates=alternates)
        if fault.state & ERROR:
            return Response(Action.FAIL, reason=Reason.IO_ERROR, message=f"segment {fault.segment} is in error")
        if fault.write and vdisk.origin:
            return Response(Action.FAIL, reason=Reason.WRITE_PROTECTED, message=f"{vdisk.name} is a snapshot: read-only")
        near = {
            m.vseg: m for m in controller.mappings(vdisk.id, max(fault.segment - 1, 0), fault.segment + pool.allocate_ahead + 2)
        }
        current = near.get(fault.segment)
        state = current.state if current else ZERO
        if fault.write and fault.state & SHARED:
            return self._copy_on_write(vdisk, pool, fault, current, agent)
        if not fault.write or not state & (NOWRITE | ZERO):
            entries, alternates = self.controller.snapshots.entries(vdisk, fault.segment, fault.segment + 1)
            return Response(Action.RETRY, fault.segment, entries, alternates=alternates)
        if state & NOWRITE:
            return Response(Action.FAIL, reason=Reason.WRITE_PROTECTED, message=f"segment {fault.segment} is read-only")
        if fault.zero_data:
            return Response(Action.COMPLETE)
        return self._allocate(vdisk, pool, fault.segment, nsegments, near, agent)

    def _copy_on_write(self, vdisk: VDisk, pool: Pool, fault: Fault, current: Mapping | None, agent: str) -> Response:
        """A write into an entry the agent holds as shared: while a snapshot shares it, the agent is granted a segment
        to take as its alternate location (it copies on write there, and reports the blocks); once none does any
        more, it is answered with the entry as it is now, to write in place."""
        entries, alternates = self.controller.snapshots.entries(vdisk, fault.segment, fault.segment + 1)
        if current is not None and current.state & NOWRITE:
            return Response(Action.FAIL, reason=Reason.WRITE_PROTECTED, message=f"segment {fault.segment} is read-only")
        if current is None or not entries[0][2] & SHARED:
            return Response(Action.RETRY, fault.segment, entries, alternates=alternates)
        if len(self.controller.agents) > 1:
            return Response(
                Action.FAIL,
                reason=Reason.WRITE_PROTECTED,
                message="copy on write through more than one gateway is not supported yet",
            )
        allocator = self.controller.allocators[pool.id]
        grant = self.grants.setdefault(vdisk.id, {})
        taken = allocator.take(1, (current.container_id, current.pseg + 1))
        if not taken:
            self.controller.space_exhausted(pool)
            return Response(Action.FAIL, reason=Reason.NO_SPACE, message=f"pool {pool.name!r} has no free segment")
        self.owners[vdisk.id] = agent
        allocator.granted.update(taken)
        grant.update(dict.fromkeys(taken))
        more = self._grant(vdisk, allocator, taken[-1], agent)
        if len(allocator.reserve) < allocator.reserve_target // 2:
            self.controller.low_reserve(pool.id)
        return Response(Action.RETRY, fault.segment, entries, alternates=alternates, grant=(*taken, *more))

    def _record_alternates(self, vdisk: VDisk, report: Allocated, agent: str, grant: dict[Segment, None]) -> Response | None:
        """Record the alternate locations (copy on write) a report names, with the blocks written there: into the
        mappings' rows, all or nothing. A new location must be granted to the reporting agent; blocks added to a
        location a snapshot shares are refused. None when recorded, else the refusal."""
        controller = self.controller
        pool = controller.pools[vdisk.pool_id]
        nbits = pool.segment_size // vdisk.block_size
        seen = controller.snapshots.seen(vdisk.id, taking=False)  # what is reported now is in one being taken
        rows: dict[int, Mapping] = {}
        taken: set[Segment] = set()
        nsegments = vdisk.nsegments(pool.segment_size)
        for alt in report.alternates:
            refused = Response(
                Action.FAIL,
                reason=Reason.BAD_COMMAND,
                message=f"segment {alt.container}:{alt.segment} is no alternate location for vdisk segment {alt.vseg}",
            )
            if not 0 <= alt.vseg < nsegments:
                return refused
            row = rows.get(alt.vseg)
            if row is None:
                found = controller.mappings(vdisk.id, alt.vseg, alt.vseg + 1)
                if not found:
                    return refused
                row = found[0]
            location = (alt.container, alt.segment)
            try:
                if row.bitmap is not None and (row.alt_container, row.alt_pseg) == location:
                    bitmap = runs_bitmap(alt.runs, nbits, row.bitmap)
                    if bitmap == row.bitmap:
                        continue  # repeated
                    if seen is not None and row.birth <= seen:
                        return refused  # a snapshot sees that location's blocks as they are
                elif location in grant and location not in taken and location != (row.container_id, row.pseg):
                    bitmap = runs_bitmap(alt.runs, nbits)
                    taken.add(location)
                else:
                    return refused
            except ValueError as exc:
                return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=str(exc))
            rows[alt.vseg] = row._replace(
                alt_container=alt.container, alt_pseg=alt.segment, bitmap=bitmap, birth=vdisk.generation
            )
        allocator = controller.allocators[vdisk.pool_id]
        for location in taken:
            del grant[location]
            allocator.granted.discard(location)
        if rows:
            controller.metadata.insert(vdisk.id, rows.values())
        return None

    def record_allocated(self, report: Allocated, agent: str = "") -> Response:
        """Record the mappings an agent made from its grant; all or nothing. A report repeated (its answer was lost)
        matches what is recorded and answers OK again."""
        controller = self.controller
        vdisk = controller.vdisks.get(report.vdisk)
        # A vdisk being deleted still takes reports: its agents report before dropping its table, so that a delete
        # whose commit fails loses nothing they mapped.
        if vdisk is None or vdisk.state not in ("ready", "deleting") or not controller.online(vdisk.pool_id):
            return Response(Action.FAIL, reason=Reason.NO_VDISK, message=f"no vdisk {report.vdisk}")
        grant = self.grants.get(report.vdisk, {}) if self.owners.get(report.vdisk) == agent else {}
        nsegments = vdisk.nsegments(controller.pools[vdisk.pool_id].segment_size)
        seen: set[int] = set()
        taken: set[Segment] = set()
        new: list[Mapping] = []
        for vseg, container_id, pseg in report.entries:
            segment = (container_id, pseg)
            recorded = controller.mappings(vdisk.id, vseg, vseg + 1) if 0 <= vseg < nsegments else []
            repeated = bool(recorded) and (recorded[0].container_id, recorded[0].pseg) == segment
            if (
                not 0 <= vseg < nsegments
                or vseg in seen
                or segment in taken
                or (not repeated and (recorded or segment not in grant))
            ):
                return Response(
                    Action.FAIL,
                    reason=Reason.BAD_COMMAND,
                    message=f"segment {container_id}:{pseg} is not granted for vdisk segment {vseg}",
                )
            seen.add(vseg)
            taken.add(segment)
            if not repeated:
                new.append(Mapping(vseg, container_id, pseg, 0, birth=vdisk.generation, pbirth=vdisk.generation))
        if report.alternates:
            if taken & {(a.container, a.segment) for a in report.alternates}:
                return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message="a segment reported twice")
            refused = self._record_alternates(vdisk, report, agent, grant)
            if refused is not None:
                return refused
        allocator = controller.allocators[vdisk.pool_id]
        for mapping in new:
            del grant[(mapping.container_id, mapping.pseg)]
            allocator.granted.discard((mapping.container_id, mapping.pseg))
        controller.metadata.insert(vdisk.id, new)
        controller.check_threshold(vdisk.pool_id)
        if vdisk.state != "ready" or not report.entries:
            return Response()  # (a copy-on-write report is topped up by the next fault that needs a segment)
        last = report.entries[-1]
        more = self._grant(vdisk, allocator, (last[1], last[2]), agent)  # the report of a writer tops its grant up
        if len(allocator.reserve) < allocator.reserve_target // 2:
            controller.low_reserve(vdisk.pool_id)
        return Response(grant=more)

    def check_release(self, message: Release) -> Response | None:
        """The refusal of a release that cannot be carried out (no such vdisk, out of range, thick), or None."""
        controller = self.controller
        vdisk = self._ready(message.vdisk)
        if vdisk is None:
            return Response(Action.FAIL, reason=Reason.NO_VDISK, message=f"no vdisk {message.vdisk}")
        nsegments = vdisk.nsegments(controller.pools[vdisk.pool_id].segment_size)
        start, stop = message.start, message.start + message.count
        if not 0 <= start <= stop <= nsegments:
            return Response(Action.FAIL, reason=Reason.OUT_OF_RANGE, message=f"segments {start}-{stop} of {nsegments}")
        if not vdisk.thin:
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"vdisk {vdisk.name!r} is thick")
        return None

    def release(self, message: Release) -> Response:
        """Unmap whole vdisk segments (UNMAP, WRITE SAME with UNMAP); the segments are free once that is durable. A
        release of segments already unmapped answers OK."""
        refused = self.check_release(message)
        if refused is not None:
            return refused
        self.controller.metadata.remove(message.vdisk, message.start, message.start + message.count)
        return Response()

    def _grant(self, vdisk: VDisk, allocator: PoolAllocator, after: Segment, agent: str) -> tuple[Segment, ...]:
        """Top up the vdisk's grant from the reserve, when one agent serves it (so no two agents map a segment twice)."""
        if len(self.controller.agents) != 1 or self.owners.get(vdisk.id, agent) != agent or vdisk.id in self.revoking:
            return ()
        grant = self.grants.setdefault(vdisk.id, {})
        target = self.grant_targets.get(vdisk.id, self.grant_segments)
        if len(grant) <= target // 2 and vdisk.id in self.owners:  # half of it used since the last top-up: busy
            target = self.grant_targets[vdisk.id] = min(target * 2, MAX_GRANT)
        want = target - len(grant)
        if want < target // 2:
            return ()
        self.owners[vdisk.id] = agent
        if len(allocator.reserve) < want:  # the reserve holds back a busy writer's grant: let it grow
            self._grow_reserve(allocator, self.controller.pools[vdisk.pool_id])
        extra = allocator.take(min(want, len(allocator.reserve)), (after[0], after[1] + 1))
        allocator.granted.update(extra)
        grant.update(dict.fromkeys(extra))
        return tuple(extra)

    def return_grant(self, vdisk: VDisk) -> list[Segment]:
        """Take back what a vdisk was granted (it is being deleted); the segments, for the allocator."""
        self.owners.pop(vdisk.id, None)
        self.grant_targets.pop(vdisk.id, None)
        granted = list(self.grants.pop(vdisk.id, {}))
        self.controller.allocators[vdisk.pool_id].granted.difference_update(granted)
        return granted

    async def revoke_grants(self, holders: list[AgentSession]) -> None:
        """Another agent serves the vdisks now: each grant's holder reports what it mapped and drops the rest, which
        goes back to the pool. A holder that cannot report keeps its grant (its report may still come); one that
        does not answer is fenced, and its grant comes back once its lease has lapsed."""
        for session in holders:
            for vdisk_id in [v for v, owner in self.owners.items() if owner == session.name]:
                await self._revoke(session, vdisk_id)

    async def _revoke(self, session: AgentSession, vdisk_id: int) -> int:
        """Take one vdisk's grant back from its holder; the number of segments that went back to the pool."""
        self.revoking.add(vdisk_id)
        try:
            response = await self.controller.agents.send(session, Command(Op.REVOKE_GRANT, vdisk=vdisk_id), check=False)
        finally:
            self.revoking.discard(vdisk_id)
        vdisk = self.controller.vdisks.get(vdisk_id)
        if response.action is Action.FAIL:
            log.error("agent %s could not give back vdisk %d's grant: %s", session.name, vdisk_id, response.message)
        elif vdisk is not None and self.owners.get(vdisk_id) == session.name:
            returned = self.return_grant(vdisk)
            self.controller.allocators[vdisk.pool_id].release(returned)
            return len(returned)
        return 0

    async def _reclaim(self, vdisk_id: int) -> bool:
        """The vdisk's pool has no free segment: take back the grants of its other vdisks (idle segments held for
        first writes that may never come). Whether any segment came back."""
        vdisk = self.controller.vdisks.get(vdisk_id)
        if vdisk is None:
            return False
        holders = {s.name: s for s in self.controller.agents.sessions if not s.fenced}
        returned = 0
        for other, owner in list(self.owners.items()):
            held = self.controller.vdisks.get(other)
            if held is not None and held.pool_id == vdisk.pool_id and self.grants.get(other) and owner in holders:
                returned += await self._revoke(holders[owner], other)
        if returned:
            log.info("pool %d was full: %d granted segments taken back for new writes", vdisk.pool_id, returned)
        return returned > 0

    def agent_gone(self, name: str) -> None:
        """An agent's session ended (fenced, lease lapsed or registered anew is handled by the new session's
        reports): with no agent left of that name, its grants go back to the pool."""
        if name in self.controller.agents.names():
            return
        for vdisk_id in [v for v, owner in self.owners.items() if owner == name]:
            vdisk = self.controller.vdisks.get(vdisk_id)
            if vdisk is not None:
                self.controller.allocators[vdisk.pool_id].release(self.return_grant(vdisk))

    def _allocate(self, vdisk: VDisk, pool: Pool, vseg: int, nsegments: int, mapped: dict[int, Mapping], agent: str) -> Response:
        """Map vseg (and, for a sequential writer, the next unmapped segments) onto reserved segments."""
        controller = self.controller
        hint: Segment | None = None
        count = 1
        ahead = pool.allocate_ahead if vdisk.id not in self.owners else 0  # a grant holder maps ahead on its own
        if vseg - 1 in mapped:
            before = mapped[vseg - 1]
            hint = (before.container_id, before.pseg + 1)
            while count <= ahead and vseg + count < nsegments and vseg + count not in mapped:
                count += 1
        elif vseg + 1 in mapped:
            after = mapped[vseg + 1]
            hint = (after.container_id, after.pseg - 1)
        allocator = controller.allocators[pool.id]
        taken = allocator.take(count, hint)
        if len(allocator.reserve) < allocator.reserve_target // 2:
            controller.low_reserve(pool.id)
        if not taken:
            controller.space_exhausted(pool)
            return Response(Action.FAIL, reason=Reason.NO_SPACE, message=f"pool {pool.name!r} has no free segment")
        generation = vdisk.generation
        controller.metadata.insert(
            vdisk.id, [Mapping(vseg + i, c, p, 0, birth=generation, pbirth=generation) for i, (c, p) in enumerate(taken)]
        )
        grant = self._grant(vdisk, allocator, taken[-1], agent)
        controller.check_threshold(pool.id)
        return Response(Action.RETRY, vseg, tuple((c, p, 0) for c, p in taken), grant=grant)

    async def _stock(self, vdisk_id: int) -> None:
        """Before a write fault: if its pool's reserve ran dry (faster than the background refill), zero a few
        segments now, in a thread, and let the reserve grow (up to an eighth of the pool or 8 GiB)."""
        controller = self.controller
        vdisk = self._ready(vdisk_id)
        allocator = controller.allocators.get(vdisk.pool_id) if vdisk is not None else None
        if vdisk is None or allocator is None or allocator.reserve:
            return
        if allocator.refilling is not None:  # a refill is on its way: wait for it (its segments are contiguous)
            await asyncio.wait([allocator.refilling])  # its failure is logged where it ran
            if allocator.reserve:
                return
        pool = controller.pools[vdisk.pool_id]
        runs = allocator.plan_reserve(pool.allocate_ahead + 1)
        if not runs:
            return
        try:
            await asyncio.to_thread(controller.zero_runs, pool.id, runs)
        except BaseException:
            allocator.cancel_reserve(runs)
            raise
        allocator.add_reserve(runs)
        self._grow_reserve(allocator, pool)

    @staticmethod
    def _grow_reserve(allocator: PoolAllocator, pool: Pool) -> None:
        """Double the pool's reserve target (up to an eighth of the pool or MAX_RESERVE_BYTES)."""
        ceiling = max(min(MAX_RESERVE_BYTES // pool.segment_size, allocator.capacity // 8), 1)
        allocator.reserve_target = min(allocator.reserve_target * 2, ceiling)
