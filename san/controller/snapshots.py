"""Snapshots: taken by fencing writes on every agent with the blocking flag, served read-only, deleted in the background.

A snapshot is a generation of its vdisk: taking one is a row and a counter, whatever the vdisk's size; the versions of
mappings it still sees after the vdisk moved on are kept (store) until no snapshot sees them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from san._fastmap import NOWRITE, SHARED, ZERO, bitmap_runs
from san.controller.allocator import Segment
from san.controller.vdisks import runs_of
from san.errors import AgentFailure, Conflict, InvalidRequest, NotFound
from san.model import VDisk, check_name, shown
from san.protocol.messages import Action, Alternate, Command, Entry, Op
from san.store.sqlite import SQLiteStore
from san.store.store import Mapping

if TYPE_CHECKING:
    from san.controller.agents import AgentSession
    from san.controller.controller import Controller

log = logging.getLogger("san.snapshots")
MAX_SNAPSHOTS = 4096  # per vdisk
RECLAIM_BATCH = 4096  # kept mapping versions dropped per transaction
RECLAIM_PAUSE = 0.05  # seconds between two such transactions: the agents' commits go in between
UNSHARE_CHUNK = 65536


def split_name(name: str) -> tuple[str, str]:
    """VDISK@NAME as (VDISK, NAME); InvalidRequest for anything else."""
    vdisk, at, snap = name.partition("@")
    if not at or not vdisk or not snap:
        raise InvalidRequest(f"{shown(name)} is not a snapshot name (VDISK@NAME)")
    return vdisk, snap


class SnapshotManager:
    """The snapshots of one controller, and which of a vdisk's entries they share (what its agents must copy on
    write)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.taking: dict[int, int] = {}  # vdisk -> the generation of the snapshot being taken (its entries share)
        self.fences: dict[int, asyncio.Event] = {}  # vdisk -> set once that snapshot is recorded (or given up)
        self.answered: dict[int, set[str]] = {}  # vdisk -> the agents that have fenced its writes for it
        self.reclaims: dict[int, asyncio.Task[None]] = {}
        self.reclaimed = 0  # kept mapping versions dropped so far (metrics)

    # -- lookups -------------------------------------------------------------------------------------------

    def of(self, vdisk: VDisk) -> list[VDisk]:
        """A vdisk's snapshots, oldest first."""
        return sorted((v for v in self.controller.vdisks.values() if v.origin == vdisk.id), key=lambda v: v.generation)

    def seen(self, vdisk_id: int, taking: bool = True) -> int | None:
        """The newest generation of the vdisk a snapshot sees (with `taking`, one being taken too), None without any:
        an entry whose location came in that generation or before is shared."""
        generations = [v.generation for v in self.controller.vdisks.values() if v.origin == vdisk_id]
        if taking and vdisk_id in self.taking:
            generations.append(self.taking[vdisk_id])
        return max(generations, default=None)

    def fence(self, vdisk_id: int, agent: str, report: bool) -> asyncio.Event | None:
        """What a message about a vdisk whose snapshot is being taken waits for: a write fault or a release always
        (it comes after the writes were fenced), a report only from an agent that has answered the fence (before
        that, it reports writes acknowledged before the snapshot: they are in it)."""
        fence = self.fences.get(vdisk_id)
        if fence is None or (report and agent not in self.answered.get(vdisk_id, set())):
            return None
        return fence

    # -- what agents are told ------------------------------------------------------------------------------

    def entries(self, vdisk: VDisk, start: int, stop: int) -> tuple[tuple[Entry, ...], tuple[Alternate, ...]]:
        """Entries [start, stop) as an agent is to hold them, with their alternate locations: a snapshot's view,
        read-only; a vdisk's, shared where a snapshot sees the location (NOWRITE | SHARED: copy on write)."""
        c = self.controller
        pool = c.pools[vdisk.pool_id]
        nbits = pool.segment_size // vdisk.block_size
        if vdisk.origin:
            rows = c.store.snapshot_mappings(vdisk.origin, vdisk.generation, start, stop)
            seen: int | None = vdisk.generation
            base = NOWRITE
        else:
            rows = c.mappings(vdisk.id, start, stop)
            seen = self.seen(vdisk.id)
            base = 0
        entries: list[Entry] = [(0, 0, ZERO | base)] * (stop - start)
        alternates: list[Alternate] = []
        alone = len(c.agents) <= 1
        for m in rows:
            shared = seen is not None and m.pbirth <= seen
            persistent = bool(m.state & NOWRITE)  # read-only for good: not copied on write either
            state = m.state | base | (NOWRITE | SHARED if shared and not vdisk.origin and not persistent else 0)
            entries[m.vseg - start] = (m.container_id, m.pseg, state)
            if m.bitmap is not None:
                writable = not vdisk.origin and alone and not m.state & NOWRITE and not (seen is not None and m.birth <= seen)
                alternates.append(Alternate(m.vseg, m.alt_container, m.alt_pseg, tuple(bitmap_runs(m.bitmap, nbits)), writable))
        return tuple(entries), tuple(alternates)

    # -- management ----------------------------------------------------------------------------------------

    async def create(self, name: str) -> VDisk:
        """Take snapshot VDISK@NAME of a live vdisk: every agent fences the vdisk's writes (NOWRITE | SHARED with
        the blocking flag: it answers once the writes begun before have ended, and have been reported), then the
        snapshot is recorded: every write acknowledged before this began is in it, none that began after."""
        c = self.controller
        vdisk_name, snap_name = split_name(name)
        check_name("snapshot", snap_name)
        vdisk = c.vdisk(vdisk_name)
        pool = c.pools[vdisk.pool_id]
        async with c.locks.hold(("vdisk", vdisk_name), ("vdisk", name), ("pool", pool.name)):
            vdisk = c.vdisk(vdisk_name)
            if vdisk.origin:
                raise InvalidRequest(f"{shown(vdisk_name)} is a snapshot: take snapshots of its vdisk")
            if vdisk.state != "ready":
                raise Conflict(f"vdisk {vdisk_name!r} is {vdisk.state}")
            c.pool_manager.require_online(pool)
            if any(v.name == name for v in c.vdisks.values()):
                raise Conflict(f"snapshot {name!r} already exists")
            if len(self.of(vdisk)) >= MAX_SNAPSHOTS:
                raise Conflict(f"vdisk {vdisk_name!r} has {MAX_SNAPSHOTS} snapshots, the most it may have")
            if len(c.agents) > 1:
                raise Conflict("snapshots of a vdisk served by more than one gateway are not supported yet")
            snapshot = await self._take(vdisk, name, vdisk.nsegments(pool.segment_size))
        c.vdisks[snapshot.id] = snapshot
        await c.export(snapshot)
        log.info("snapshot %s taken (generation %d)", name, snapshot.generation)
        return snapshot

    async def _take(self, vdisk: VDisk, name: str, nsegments: int) -> VDisk:
        c = self.controller
        generation = vdisk.generation
        self.taking[vdisk.id] = generation
        self.answered[vdisk.id] = set()
        fence = self.fences[vdisk.id] = asyncio.Event()
        command = Command(Op.SET_STATE, vdisk=vdisk.id, start=0, count=nsegments, bits=NOWRITE | SHARED, blocking=True)

        async def fence_one(session: AgentSession) -> None:
            answer = await c.agents.send(session, command, check=False)
            if answer.action is Action.FAIL:
                raise AgentFailure(f"gateway {session.name} could not fence vdisk {vdisk.name!r}: {answer.message}")
            self.answered[vdisk.id].add(session.name)  # its later reports are of writes after the snapshot

        try:
            await asyncio.gather(*(fence_one(s) for s in list(c.agents.sessions)))
            vdisk.generation = generation + 1  # from here on the vdisk writes into the next generation
            created = datetime.now(UTC).isoformat(timespec="seconds")
            frozen = replace(vdisk, generation=generation)
            snapshot = await c.metadata.commit_async(lambda store: store.add_snapshot(frozen, name, created))
        except BaseException:
            self.taking.pop(vdisk.id, None)
            fence.set()
            with contextlib.suppress(Exception):
                await self.unshare(vdisk)
            raise
        finally:
            fence.set()
            self.fences.pop(vdisk.id, None)
            self.answered.pop(vdisk.id, None)
        self.taking.pop(vdisk.id, None)
        return snapshot

    async def delete(self, name: str) -> None:
        """Delete snapshot VDISK@NAME (not zoned to any host); what only it kept is reclaimed in the background."""
        c = self.controller
        split_name(name)
        snapshot = c.vdisk(name)
        if not snapshot.origin:
            raise InvalidRequest(f"{shown(name)} is not a snapshot")
        origin = c.vdisks.get(snapshot.origin)
        if origin is None:
            raise NotFound(f"the vdisk of snapshot {shown(name)} is gone")
        async with c.locks.hold(("vdisk", name), ("vdisk", origin.name)):
            if snapshot.state != "ready":
                raise Conflict(f"snapshot {name!r} is {snapshot.state}")
            c.zoning.check_unzoned(snapshot)
            snapshot.state = "deleting"
            try:
                c.changed("deleted", snapshot)
                await c.agents.broadcast(Command(Op.DELETE_TABLE, vdisk=snapshot.id, blocking=True))
                await c.metadata.commit_async(lambda store: store.delete_vdisk(snapshot.id))
            except BaseException:
                snapshot.state = "ready"
                await c.export(snapshot)
                raise
            del c.vdisks[snapshot.id]
            c.deleted_serials.add(snapshot.serial)
            c.changed("gone", snapshot)
        log.info("snapshot %s deleted; reclaiming what only it kept", name)
        self.reclaim(origin)

    def unreclaimed(self) -> list[VDisk]:
        """The vdisks keeping mapping versions: what a reclaim cut short may have left (reclaimed again at start)."""
        c = self.controller
        return [c.vdisks[v] for v in c.store.retaining() if v in c.vdisks and c.online(c.vdisks[v].pool_id)]

    def reclaim(self, origin: VDisk) -> None:
        """Start (or restart after the one running) the background reclaim of origin's kept versions."""
        running = self.reclaims.get(origin.id)
        task = asyncio.ensure_future(self._reclaim(origin, running))
        self.reclaims[origin.id] = task
        task.add_done_callback(lambda t: self._reclaimed(origin, t))

    def _reclaimed(self, origin: VDisk, task: asyncio.Task[None]) -> None:
        if self.reclaims.get(origin.id) is task:
            del self.reclaims[origin.id]
        if not task.cancelled() and task.exception() is not None:
            log.error("reclaiming the space of vdisk %s's deleted snapshots failed: %s", origin.name, task.exception())

    async def _reclaim(self, origin: VDisk, before: asyncio.Task[None] | None) -> None:
        c = self.controller
        if before is not None:
            await asyncio.wait([before])
        pool = c.pools[origin.pool_id]
        while origin.id in c.vdisks:

            def change(store: SQLiteStore) -> tuple[int, list[Segment]]:
                return store.drop_unseen(origin.id, RECLAIM_BATCH)

            dropped, freed = await c.metadata.commit_async(change)
            self.reclaimed += dropped
            if freed:
                await asyncio.to_thread(c.vdisk_manager.punch, pool, runs_of(freed))
                c.allocators[pool.id].release(freed)
                c.check_threshold(pool.id)
            if dropped < RECLAIM_BATCH:
                break
            await asyncio.sleep(RECLAIM_PAUSE)
        if origin.id in c.vdisks:
            async with c.locks.hold(("vdisk", origin.name)):  # no snapshot of it is taken meanwhile
                if origin.id in c.vdisks:
                    await self.unshare(origin)

    async def unshare(self, vdisk: VDisk) -> None:
        """Entries no snapshot shares any more are written in place again: the agents clear their SHARED state."""
        c = self.controller
        seen = self.seen(vdisk.id)
        pool = c.pools[vdisk.pool_id]
        nsegments = vdisk.nsegments(pool.segment_size)
        for start in range(0, nsegments, UNSHARE_CHUNK):
            stop = min(start + UNSHARE_CHUNK, nsegments)
            for first, last, keep in _runs(c.mappings(vdisk.id, start, stop), seen):
                bits = SHARED | (0 if keep else NOWRITE)
                await c.agents.broadcast(Command(Op.CLEAR_STATE, vdisk=vdisk.id, start=first, count=last - first, bits=bits))


def _runs(rows: list[Mapping], seen: int | None) -> list[tuple[int, int, bool]]:
    """Runs [first, last) of mapped entries whose location no snapshot sees (seen: the newest generation one sees),
    each with whether it keeps a persistent NOWRITE."""
    runs: list[tuple[int, int, bool]] = []
    for m in rows:
        if seen is not None and m.pbirth <= seen:
            continue
        keep = bool(m.state & NOWRITE)
        if runs and runs[-1][1] == m.vseg and runs[-1][2] == keep:
            runs[-1] = (runs[-1][0], m.vseg + 1, keep)
        else:
            runs.append((m.vseg, m.vseg + 1, keep))
    return runs
