"""The controller root: the registries (pools, containers, vdisks), the metadata, the agents, and what joins them.

Management operations live in pools.py and vdisks.py, answers to agents in faults.py, hosts and zones in zoning.py."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from san.controller.agents import Agents, AgentSession
from san.controller.allocator import PoolAllocator, Run, Segment
from san.controller.faults import AgentMessage, FaultPolicy
from san.controller.locks import Locks
from san.controller.pools import PoolManager
from san.controller.snapshots import SnapshotManager
from san.controller.vdisks import VDiskManager
from san.controller.zoning import Zoning
from san.errors import NotFound, StoreFailure
from san.model import Container, Pool, VDisk, shown
from san.protocol.messages import Action, Command, Op, Reason, Response
from san.storage.containers import ContainerSet
from san.store.metadata import Metadata
from san.store.sqlite import SQLiteStore
from san.store.store import Mapping

log = logging.getLogger("san.controller")


@dataclass
class PoolUsage:
    """A pool's capacity and fullness, in bytes."""

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    provisioned_bytes: int
    used_percent: float


class Controller:
    """Owns the store (through the metadata object), the allocators, the containers and the list of agents; every
    management change goes through here. Frontends hear of changes through the on_* callbacks."""

    def __init__(
        self,
        store: SQLiteStore,
        data_dir: str,
        reserve_segments: int = 64,
        grant_segments: int = 8,
        allow_paths: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.reserve_segments = reserve_segments
        self.metadata = Metadata(store, self._freed)
        self.agents = Agents()
        self.locks = Locks()
        self.containers = ContainerSet()
        self.pools: dict[int, Pool] = {}
        self.allocators: dict[int, PoolAllocator] = {}
        self.vdisks: dict[int, VDisk] = {}
        self.offline: dict[int, str] = {}
        self.progress: dict[int, float] = {}
        self.above_threshold: set[int] = set()
        self.exhausted: set[int] = set()
        self.on_low_reserve: Callable[[int], None] | None = None
        self.on_change: Callable[[str, VDisk], None] | None = None
        self.deleted_serials: set[str] = set()  # of the vdisks deleted since start (a gateway drops what it kept)
        self.on_threshold: Callable[[int, bool], None] | None = None
        self.policy = FaultPolicy(self, grant_segments)
        self.agents.on_gone = lambda session: self.policy.agent_gone(session.name)
        self.pool_manager = PoolManager(self, allow_paths)
        self.vdisk_manager = VDiskManager(self)
        self.snapshots = SnapshotManager(self)
        self.zoning = Zoning(self.metadata, lambda: self.vdisks, self.locks)
        self.pool_manager.load()

    def close(self) -> None:
        self.metadata.close()
        try:
            self.commit()
        except StoreFailure as exc:
            log.error("the last metadata commit failed: %s", exc)
        self.pool_manager.close()
        self.containers.close()
        self.store.close()

    # -- lookups -------------------------------------------------------------------------------------------

    def pool(self, name: str) -> Pool:
        for pool in self.pools.values():
            if pool.name == name:
                return pool
        raise NotFound(f"no pool named {shown(name)}")

    def vdisk(self, name: str) -> VDisk:
        for vdisk in self.vdisks.values():
            if vdisk.name == name:
                return vdisk
        raise NotFound(f"no vdisk named {shown(name)}")

    def online(self, pool_id: int) -> bool:
        return pool_id not in self.offline

    def pool_containers(self, pool: Pool) -> list[Container]:
        return self.store.containers(pool.id)

    def usage(self, pool: Pool) -> PoolUsage:
        allocator = self.allocators[pool.id]
        capacity = allocator.capacity * pool.segment_size
        used = allocator.used * pool.segment_size
        provisioned = sum(v.size_bytes for v in self.vdisks.values() if v.pool_id == pool.id and not v.origin)
        return PoolUsage(capacity, used, capacity - used, provisioned, round(100 * used / capacity, 2) if capacity else 0)

    def allocated_bytes(self, vdisk: VDisk) -> int:
        return self.metadata.count(vdisk.id) * self.pools[vdisk.pool_id].segment_size

    def mappings(self, vdisk_id: int, start: int, stop: int) -> list[Mapping]:
        """Mappings of vdisk segments [start, stop), committed or not."""
        return self.metadata.find(vdisk_id, start, stop)

    def vdisk_state(self, vdisk: VDisk) -> str:
        """What a vdisk is doing: its own state, or offline when its pool is."""
        return "offline" if vdisk.pool_id in self.offline else vdisk.state

    # -- management (pools.py, vdisks.py) ------------------------------------------------------------------

    async def create_pool(
        self,
        name: str,
        size: int | None = None,
        path: str | None = None,
        segment_size: int | None = None,
        warn_percent: int | None = None,
        allocate_ahead: int | None = None,
        existing: bool = False,
    ) -> Pool:
        return await self.pool_manager.create(name, size, path, segment_size, warn_percent, allocate_ahead, existing)

    async def delete_pool(self, name: str) -> None:
        await self.pool_manager.delete(name)

    async def create_vdisk(self, name: str, pool_name: str, size: int, thin: bool = True, block_size: int | None = None) -> VDisk:
        return await self.vdisk_manager.create(name, pool_name, size, thin, block_size)

    async def finish_thick(self, vdisk: VDisk, on_progress: Callable[[float], None] | None = None) -> None:
        await self.vdisk_manager.finish_thick(vdisk, on_progress)

    def unfinished_thick(self) -> list[VDisk]:
        return [v for v in self.vdisks.values() if v.state == "allocating" and self.online(v.pool_id)]

    async def grow_vdisk(self, name: str, size: int) -> VDisk:
        return await self.vdisk_manager.grow(name, size)

    async def rename_vdisk(self, name: str, new_name: str) -> VDisk:
        return await self.vdisk_manager.rename(name, new_name)

    async def delete_vdisk(self, name: str) -> None:
        await self.vdisk_manager.delete(name)

    async def set_state(self, name: str, start: int, count: int, state: int) -> None:
        await self.vdisk_manager.set_state(name, start, count, state)

    # -- agents --------------------------------------------------------------------------------------------

    async def add_agent(self, session: AgentSession) -> None:
        """Give a newly registered agent every container and a table (all INVALID) for every ready vdisk; grants
        another agent holds are taken back first (from now on allocation goes through the controller alone)."""
        others = [s for s in self.agents.sessions if s is not session]
        if others:
            await self.policy.revoke_grants(others)
        for container in self.store.containers():
            if self.online(container.pool_id):
                answer = await self.agents.send(session, self.attach_command(container), check=False)
                if answer.action is Action.FAIL:  # it serves the rest; I/O to this pool fails there
                    log.error("gateway %s cannot open container %d: %s", session.name, container.id, answer.message)
        for vdisk in self.vdisks.values():
            if vdisk.state == "ready" and self.online(vdisk.pool_id):
                await self.agents.send(session, self.create_table(vdisk))

    def attach_command(self, container: Container) -> Command:
        path = self.containers.paths[container.id]
        return Command(Op.ATTACH_CONTAINER, container=container.id, path=path, uuid=container.uuid, store=self.store.store_id)

    def create_table(self, vdisk: VDisk) -> Command:
        pool = self.pools[vdisk.pool_id]
        return Command(
            Op.CREATE_TABLE,
            vdisk=vdisk.id,
            nsegments=vdisk.nsegments(pool.segment_size),
            segment_blocks=pool.segment_size // vdisk.block_size,
            block_size=vdisk.block_size,
            nblocks=vdisk.nblocks,
        )

    async def export(self, vdisk: VDisk) -> None:
        """Give every agent the vdisk's table and tell the frontends it is ready."""
        await self.agents.broadcast(self.create_table(vdisk))
        self.changed("ready", vdisk)

    # -- answers to agents (faults.py) ---------------------------------------------------------------------

    async def handle(self, message: AgentMessage, agent: str = "") -> Response:
        """Answer the agent of that name: a Flush commits metadata, Allocated records mappings, Release unmaps
        segments, a Fault gets entries or failure."""
        return await self.policy.handle(message, agent)

    def store_reason(self, exc: StoreFailure) -> Reason:
        """Why a metadata failure fails I/O: no space when the metadata's file system is full."""
        cause = exc.__cause__
        full = isinstance(cause, sqlite3.OperationalError) and "full" in str(cause)
        return Reason.NO_SPACE if full or (isinstance(cause, OSError) and cause.errno == 28) else Reason.IO_ERROR

    # -- metadata ------------------------------------------------------------------------------------------

    def commit(self) -> None:
        """Make every mapping change so far durable, atomically (a metadata commit, like dm-thin's), on this thread.
        On failure the changes stay pending for the next commit and StoreFailure is raised."""
        self.metadata.commit()

    async def flush(self) -> None:
        """commit(), in the metadata thread and shared with every flush that asks meanwhile (group commit)."""
        await self.metadata.flush()

    def _freed(self, segments: list[Segment]) -> None:
        """A commit made these segments' release durable: they are free again."""
        pools: set[int] = set()
        for container_id, pseg in segments:
            for pool_id, allocator in self.allocators.items():
                if container_id in allocator.maps:
                    allocator.release([(container_id, pseg)])
                    pools.add(pool_id)
        for pool_id in pools:
            self.check_threshold(pool_id)

    # -- space ---------------------------------------------------------------------------------------------

    def low_reserve(self, pool_id: int) -> None:
        if self.on_low_reserve is not None and self.online(pool_id):
            self.on_low_reserve(pool_id)

    def plan_refill(self, pool_id: int, target: int | None = None) -> list[Run]:
        """Free runs set aside for the reserve; zero_runs() them (any thread), then add_reserve() them."""
        allocator = self.allocators[pool_id]
        return allocator.plan_reserve(target or allocator.reserve_target)

    def zero_runs(self, pool_id: int, runs: list[Run], keep_allocated: bool = False) -> None:
        """Zero runs of segments and make the zeros durable: a handed-out segment never shows old bytes."""
        segment_size = self.pools[pool_id].segment_size
        for container_id, first, length in runs:
            self.containers.zero(container_id, [(first * segment_size, length * segment_size)], keep_allocated)
        self.containers.flush({c for c, _, _ in runs})

    def space_exhausted(self, pool: Pool) -> None:
        """A write found no free segment: say so once, until space comes back."""
        if pool.id not in self.exhausted:
            self.exhausted.add(pool.id)
            log.error("pool %s is out of space: writes that need a new segment fail until space is freed", pool.name)

    def check_threshold(self, pool_id: int) -> None:
        """Tell the frontends when a pool's use crosses its warning threshold, up (the soft-threshold unit attention)
        or back down."""
        allocator, pool = self.allocators[pool_id], self.pools[pool_id]
        if pool_id in self.exhausted and allocator.claimable:
            self.exhausted.discard(pool_id)
            log.info("pool %s has free space again", pool.name)
        above = allocator.capacity > 0 and allocator.used * 100 >= pool.warn_percent * allocator.capacity
        if above == (pool_id in self.above_threshold):
            return
        if above:
            self.above_threshold.add(pool_id)
            log.warning(
                "pool %s is %d%% full (warning threshold %d%%)",
                pool.name,
                100 * allocator.used // allocator.capacity,
                pool.warn_percent,
            )
        else:
            self.above_threshold.discard(pool_id)
        if self.on_threshold is not None:
            self.on_threshold(pool_id, above)

    def changed(self, event: str, vdisk: VDisk) -> None:
        """Tell the frontends a vdisk became ready, grew, was renamed, went away (deleted: no longer served) or is gone
        (its deletion committed)."""
        if self.on_change is not None:
            self.on_change(event, vdisk)
