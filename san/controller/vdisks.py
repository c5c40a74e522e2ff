"""Vdisks: create (thin, or thick with every segment claimed and its blocks really allocated), grow, delete, states.

Each operation holds its vdisk's and pool's locks across its awaits and commits through the metadata object; on
failure it undoes its own change (segments released, tables re-exported) and nothing else."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from san._fastmap import ERROR, NOWRITE
from san.controller.allocator import PoolAllocator, Run, Segment
from san.errors import AgentFailure, Conflict, InvalidRequest, NoSpace, StoreFailure
from san.model import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, Pool, VDisk, check_name, shown
from san.protocol.messages import Command, Op
from san.store.sqlite import SQLiteStore
from san.store.store import Mapping

if TYPE_CHECKING:
    from san.controller.controller import Controller

log = logging.getLogger("san.controller")
ZERO_STEP = 4096
MAX_VDISK_SEGMENTS = 1 << 28
RETRY_SECONDS = 1.0


def runs_of(segments: Iterable[Segment]) -> list[Run]:
    """Consecutive (container, segment) pairs folded into (container, first, length) runs."""
    runs: list[Run] = []
    for container_id, pseg in segments:
        if runs and runs[-1][0] == container_id and runs[-1][1] + runs[-1][2] == pseg:
            runs[-1] = (container_id, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((container_id, pseg, 1))
    return runs


def segments_of(runs: Iterable[Run]) -> list[Segment]:
    return [(container_id, pseg) for container_id, first, length in runs for pseg in range(first, first + length)]


def _mappings(runs: list[Run], first_vseg: int, generation: int = 0) -> list[Mapping]:
    """Consecutive vdisk segments from first_vseg mapped onto claimed runs, written in that generation."""
    mappings: list[Mapping] = []
    vseg = first_vseg
    g = generation
    for container_id, first, length in runs:
        mappings.extend(Mapping(vseg + i, container_id, first + i, 0, birth=g, pbirth=g) for i in range(length))
        vseg += length
    return mappings


class VDiskManager:
    """The vdisk operations of one controller."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.thick_runs: dict[int, list[Run]] = {}

    def _locks(self, name: str, pool: Pool) -> tuple[tuple[str, str], tuple[str, str]]:
        return ("vdisk", name), ("pool", pool.name)

    async def create(self, name: str, pool_name: str, size: int, thin: bool = True, block_size: int | None = None) -> VDisk:
        """Create a vdisk; a thick one is returned in state 'allocating' and finished by finish_thick()."""
        c = self.controller
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        check_name("vdisk", name)
        pool = c.pool(pool_name)
        async with c.locks.hold(*self._locks(name, pool)):
            pool = c.pool(pool_name)
            c.pool_manager.require_online(pool)
            if any(v.name == name for v in c.vdisks.values()):
                raise Conflict(f"vdisk {name!r} already exists")
            if block_size not in BLOCK_SIZES:
                raise InvalidRequest(f"block size {block_size} must be 512 or 4096")
            if size <= 0 or size % block_size:
                raise InvalidRequest(f"size {size} must be a positive multiple of the {block_size}-byte block size")
            nsegments = -(-size // pool.segment_size)
            if nsegments > MAX_VDISK_SEGMENTS:
                raise InvalidRequest(
                    f"size {size} needs {nsegments} segments of {pool.segment_size} bytes; a vdisk has at most"
                    f" {MAX_VDISK_SEGMENTS} (use a pool with larger segments)"
                )
            allocator = c.allocators[pool.id]
            runs = [] if thin else await self._claim(pool, allocator, nsegments, f"a thick vdisk of {size} bytes")

            def change(store: SQLiteStore) -> VDisk:
                vdisk = store.add_vdisk(name, pool.id, size, block_size, thin, "ready" if thin else "allocating")
                store.add_mappings(vdisk.id, _mappings(runs, 0))
                return vdisk

            try:
                vdisk = await c.metadata.commit_async(change)
            except BaseException:
                allocator.release(segments_of(runs))
                raise
            assert vdisk is not None
            c.vdisks[vdisk.id] = vdisk
            if not thin:
                c.progress[vdisk.id] = 0.0
                self.thick_runs[vdisk.id] = runs
                return vdisk
            try:
                await c.export(vdisk)
            except AgentFailure:
                await c.agents.broadcast(Command(Op.DELETE_TABLE, vdisk=vdisk.id), check=False)
                await c.metadata.commit_async(lambda store: store.delete_vdisk(vdisk.id))
                del c.vdisks[vdisk.id]
                raise
            return vdisk

    async def _claim(self, pool: Pool, allocator: PoolAllocator, count: int, what: str) -> list[Run]:
        """Claim count segments as runs whose blocks the file system has really allocated (thick means the space
        exists); NoSpace, with nothing claimed, when the pool or the file system under it lacks room."""
        while allocator.claimable < count <= allocator.free and allocator.in_flight:
            await asyncio.sleep(0.01)  # reserve refills under way give their segments back when they end
        runs = allocator.claim_runs(count) if allocator.claimable >= count else []
        if not runs:
            raise NoSpace(f"{what} needs {count} segments; pool {pool.name!r} has {allocator.free} free")
        try:
            await asyncio.to_thread(self._allocate, pool, runs)
        except OSError as exc:
            allocator.release(segments_of(runs))
            if exc.errno == errno.ENOSPC:
                raise NoSpace(f"{what} needs {count * pool.segment_size} bytes that the file system under pool"
                              f" {pool.name!r} does not have (thick space must exist)") from None  # fmt: skip
            raise
        return runs

    def _allocate(self, pool: Pool, runs: list[Run]) -> None:
        """Have the file system allocate the runs' blocks; on failure give back what was allocated."""
        containers = self.controller.containers
        done: list[Run] = []
        try:
            for container_id, first, length in runs:
                containers.allocate(container_id, [(first * pool.segment_size, length * pool.segment_size)])
                done.append((container_id, first, length))
        except OSError:
            for container_id, first, length in done:
                containers.zero(container_id, [(first * pool.segment_size, length * pool.segment_size)])
            raise

    async def finish_thick(self, vdisk: VDisk, on_progress: Callable[[float], None] | None = None) -> None:
        """Zero a thick vdisk's segments in steps (off the event loop), then mark it ready and export it."""
        c = self.controller
        pool = c.pools[vdisk.pool_id]
        runs = self.thick_runs.pop(vdisk.id, None)
        if runs is None:
            runs = runs_of((m.container_id, m.pseg) for m in c.mappings(vdisk.id, 0, vdisk.nsegments(pool.segment_size)))
        total = sum(length for _, _, length in runs) or 1
        done = 0
        for container_id, first, length in runs:
            for start in range(first, first + length, ZERO_STEP):
                count = min(ZERO_STEP, first + length - start)
                step = [(start * pool.segment_size, count * pool.segment_size)]
                await asyncio.to_thread(c.containers.zero, container_id, step, True)
                done += count
                c.progress[vdisk.id] = done / total
                if on_progress is not None:
                    on_progress(done / total)
        await asyncio.to_thread(c.containers.flush, {container for container, _, _ in runs})
        ready = VDisk(**{**vdisk.to_dict(), "state": "ready"})
        while True:
            try:
                await c.metadata.commit_async(lambda store: store.update_vdisk(ready))
                break
            except StoreFailure:
                await asyncio.sleep(RETRY_SECONDS)
        vdisk.state = "ready"
        c.progress.pop(vdisk.id, None)
        await c.export(vdisk)

    async def grow(self, name: str, size: int) -> VDisk:
        c = self.controller
        pool = c.pools[c.vdisk(name).pool_id]
        async with c.locks.hold(*self._locks(name, pool)):
            vdisk = c.vdisk(name)
            c.pool_manager.require_online(pool)
            if vdisk.origin:
                raise InvalidRequest(f"{name!r} is a snapshot: read-only, its size is its vdisk's when it was taken")
            if vdisk.state != "ready":
                raise Conflict(f"vdisk {name!r} is {vdisk.state}")
            if size <= vdisk.size_bytes:
                raise InvalidRequest(f"new size {size} must be larger than the current {vdisk.size_bytes} bytes")
            if size % vdisk.block_size:
                raise InvalidRequest(f"size {size} must be a multiple of the {vdisk.block_size}-byte block size")
            old_segments = vdisk.nsegments(pool.segment_size)
            new_segments = -(-size // pool.segment_size)
            if new_segments > MAX_VDISK_SEGMENTS:
                raise InvalidRequest(f"size {size} needs more than the {MAX_VDISK_SEGMENTS} segments a vdisk can have")
            allocator = c.allocators[pool.id]
            added = new_segments - old_segments
            runs = [] if vdisk.thin or not added else await self._claim(pool, allocator, added, f"growing thick vdisk {name!r}")
            grown = VDisk(**{**vdisk.to_dict(), "size_bytes": size})

            def change(store: SQLiteStore) -> None:
                store.add_mappings(vdisk.id, _mappings(runs, old_segments, vdisk.generation))
                store.update_vdisk(grown)

            try:
                if runs:
                    await asyncio.to_thread(c.zero_runs, pool.id, runs, True)
                await c.metadata.commit_async(change)
            except BaseException:
                allocator.release(segments_of(runs))
                raise
            c.metadata.reload(vdisk.id)
            vdisk.size_bytes = size
            await c.agents.broadcast(Command(Op.GROW_TABLE, vdisk=vdisk.id, nsegments=new_segments, nblocks=vdisk.nblocks))
            c.changed("grown", vdisk)
            return vdisk

    async def rename(self, name: str, new_name: str) -> VDisk:
        """Give a vdisk another name; hosts see the same LUN, serial and data (with LIO, its storage object is
        made again under the new name)."""
        c = self.controller
        check_name("vdisk", new_name)
        pool = c.pools[c.vdisk(name).pool_id]
        async with c.locks.hold(*self._locks(name, pool), ("vdisk", new_name)):
            vdisk = c.vdisk(name)
            if vdisk.origin:
                raise InvalidRequest(f"{name!r} is a snapshot: snapshots are named after their vdisk")
            if vdisk.state != "ready":
                raise Conflict(f"vdisk {name!r} is {vdisk.state}")
            if any(v.name == new_name for v in c.vdisks.values()):
                raise Conflict(f"vdisk {new_name!r} already exists")
            snapshots = c.snapshots.of(vdisk)  # VDISK@NAME follow their vdisk
            renamed = [(s, new_name + s.name[len(name) :]) for s in snapshots]

            def change(store: SQLiteStore) -> None:
                store.rename_vdisk(vdisk.id, new_name)
                for snapshot, snapshot_name in renamed:
                    store.rename_vdisk(snapshot.id, snapshot_name)

            await c.metadata.commit_async(change)
            vdisk.name = new_name
            for snapshot, snapshot_name in renamed:
                snapshot.name = snapshot_name
        c.changed("renamed", vdisk)
        for snapshot, _ in renamed:
            c.changed("renamed", snapshot)
        return vdisk

    async def delete(self, name: str) -> None:
        """Remove a vdisk once no agent has I/O in flight on it; its segments go back to the pool."""
        c = self.controller
        pool = c.pools[c.vdisk(name).pool_id]
        async with c.locks.hold(*self._locks(name, pool)):
            vdisk = c.vdisk(name)
            if vdisk.origin:
                raise InvalidRequest(f"{name!r} is a snapshot: delete it with `san snapshot delete`")
            if vdisk.state != "ready":
                raise Conflict(f"vdisk {name!r} is {vdisk.state}")
            c.zoning.check_unzoned(vdisk)
            snapshots = c.snapshots.of(vdisk)
            if snapshots:
                raise Conflict(f"vdisk {name!r} has {len(snapshots)} snapshots ({snapshots[0].name}, ...): delete them first")
            vdisk.state = "deleting"  # faults fail from now on, and zoning refuses it
            dropped = False
            try:
                c.changed("deleted", vdisk)
                await c.agents.broadcast(Command(Op.DELETE_TABLE, vdisk=vdisk.id, blocking=True))
                dropped = True

                def change(store: SQLiteStore) -> list[Segment]:
                    freed = store.remove_mappings(vdisk.id, 0, vdisk.nsegments(pool.segment_size))
                    freed += store.delete_retained(vdisk.id)
                    store.delete_vdisk(vdisk.id)
                    return freed

                freed = await c.metadata.commit_async(change)
            except BaseException:
                vdisk.state = "ready"
                if dropped:  # every agent reported what it mapped, then dropped its table and grant: it goes back
                    c.allocators[pool.id].release(c.policy.return_grant(vdisk))
                await c.export(vdisk)
                raise
            assert freed is not None
            del c.vdisks[vdisk.id]
            c.metadata.forget(vdisk.id)
            c.deleted_serials.add(vdisk.serial)
            c.changed("gone", vdisk)  # deleted for good: what a gateway kept for it (an admin's LIO object) may go
            allocator = c.allocators[pool.id]
            granted = c.policy.return_grant(vdisk)
            # Punch before the segments are free: once released, a refill may hand one to another vdisk, and a
            # punch still running would then zero that vdisk's data.
            await asyncio.to_thread(self.punch, pool, runs_of(freed))
            allocator.release(freed + granted)
            c.check_threshold(pool.id)

    def punch(self, pool: Pool, runs: list[Run]) -> None:
        """Give a deleted vdisk's space back to the file system (it is zeroed again before anyone is handed it)."""
        for container_id, first, length in runs:
            try:
                self.controller.containers.zero(container_id, [(first * pool.segment_size, length * pool.segment_size)])
            except OSError as exc:
                log.warning("could not punch freed segments of container %d: %s", container_id, exc)

    async def set_state(self, name: str, start: int, count: int, state: int) -> None:
        """Give mapped segments [start, start+count) persistent state bits (NOWRITE, ERROR) and tell the agents."""
        c = self.controller
        vdisk = c.vdisk(name)
        pool = c.pools[vdisk.pool_id]
        if vdisk.origin:
            raise InvalidRequest(f"{name!r} is a snapshot: its entries are its vdisk's")
        async with c.locks.hold(*self._locks(name, pool)):
            if state & ~(NOWRITE | ERROR) or start < 0 or count < 1 or start + count > vdisk.nsegments(pool.segment_size):
                raise InvalidRequest(f"bad state {state} or segments {start}+{count} for vdisk {shown(name)}")
            await c.metadata.commit_async(lambda store: store.set_mapping_state(vdisk.id, start, start + count, state))
            c.metadata.reload(vdisk.id)
            await c.agents.broadcast(Command(Op.SET_STATE, vdisk=vdisk.id, start=start, count=count, bits=state))
