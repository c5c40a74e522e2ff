"""The controller: pools, vdisks and their persistent tables; answers agents' faults; commits metadata.

Policy lives here (what to allocate, when to commit); data structures in allocator.py, persistence in the store."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from san._fastmap import ERROR, INVALID, NOWRITE, ZERO
from san.controller.allocator import PoolAllocator, Run, Segment
from san.controller.zoning import Zoning
from san.errors import AgentFailure, Conflict, InvalidRequest, NoSpace, NotFound, StoreFailure
from san.model import (
    BLOCK_SIZES,
    DEFAULT_ALLOCATE_AHEAD,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SEGMENT_SIZE,
    DEFAULT_WARN_PERCENT,
    MAX_CONTAINERS,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    Container,
    Pool,
    VDisk,
    check_name,
)
from san.protocol.messages import Action, Allocated, Command, Entry, Fault, Flush, Op, Reason, Release, Response
from san.protocol.transport import AgentLink
from san.storage.containers import (
    ContainerError,
    ContainerSet,
    check_unused_device,
    create_sparse_file,
    device_size,
    is_block_device,
)
from san.store.sqlite import SQLiteStore
from san.store.store import Mapping

log = logging.getLogger("san.controller")
LOAD_CHUNK = 1024
ZERO_STEP = 4096
MAX_SEGMENTS = 0xFFFFFFFF
MAX_RESERVE_BYTES = 8 << 30
MAX_VDISK_SEGMENTS = 1 << 28
CACHE_CHUNKS = 256


@dataclass
class PoolUsage:
    """A pool's capacity and fullness, in bytes."""

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    provisioned_bytes: int
    used_percent: float


def _runs(segments: Iterable[Segment]) -> list[Run]:
    """Consecutive (container, segment) pairs folded into (container, first, length) runs."""
    runs: list[Run] = []
    for container_id, pseg in segments:
        if runs and runs[-1][0] == container_id and runs[-1][1] + runs[-1][2] == pseg:
            runs[-1] = (container_id, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((container_id, pseg, 1))
    return runs


def _segments(run: Run) -> Iterable[Segment]:
    container_id, first, length = run
    return ((container_id, pseg) for pseg in range(first, first + length))


def _identity(path: str) -> tuple[int, ...] | None:
    """What makes two paths the same store: the device number of a block device, else (st_dev, st_ino)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_rdev,) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)


class Controller:
    """Owns the store, the allocators and the list of agents; every management change goes through here."""

    def __init__(self, store: SQLiteStore, data_dir: str, reserve_segments: int = 64, grant_segments: int = 8) -> None:
        self.store = store
        self.data_dir = data_dir
        self.reserve_segments = reserve_segments
        self.grant_segments = grant_segments
        self.grants: dict[int, dict[Segment, None]] = {}
        self.agents: list[AgentLink] = []
        self.containers = ContainerSet()
        self.pools: dict[int, Pool] = {}
        self.allocators: dict[int, PoolAllocator] = {}
        self.vdisks: dict[int, VDisk] = {}
        self.progress: dict[int, float] = {}
        self._thick_runs: dict[int, list[Run]] = {}
        self.pending: dict[int, dict[int, Mapping]] = {}
        self.unsaved: dict[int, dict[int, Mapping]] = {}
        self.freeing: dict[int, list[Segment]] = {}
        self.unmaps: list[tuple[int, int, int]] = []  # (vdisk, start, stop) done in the open transaction
        self.unmap_retry: list[tuple[int, int, int]] = []  # ones a failed commit rolled back: done again first
        self.cache: OrderedDict[tuple[int, int], list[Mapping | None]] = OrderedDict()
        self.on_low_reserve: Callable[[int], None] | None = None
        self.on_change: Callable[[str, VDisk], None] | None = None
        self.on_threshold: Callable[[int, bool], None] | None = None
        self.above_threshold: set[int] = set()
        self._load()
        self.zoning = Zoning(store, lambda: self.vdisks)

    def _load(self) -> None:
        self.pools = {pool.id: pool for pool in self.store.pools()}
        containers = self.store.containers()
        for pool in self.pools.values():
            self.allocators[pool.id] = PoolAllocator((c.id, c.nsegments) for c in containers if c.pool_id == pool.id)
        owner = {c.id: c.pool_id for c in containers}
        for c in containers:
            self.containers.attach(c.id, c.path)
        for container_id, pseg in self.store.used_segments():
            self.allocators[owner[container_id]].mark_used([(container_id, pseg)])
        self.vdisks = {vdisk.id: vdisk for vdisk in self.store.vdisks()}

    def close(self) -> None:
        self.commit()
        self.containers.close()
        self.store.close()

    # -- lookups -------------------------------------------------------------------------------------------

    def pool(self, name: str) -> Pool:
        for pool in self.pools.values():
            if pool.name == name:
                return pool
        raise NotFound(f"no pool named {name!r}")

    def vdisk(self, name: str) -> VDisk:
        for vdisk in self.vdisks.values():
            if vdisk.name == name:
                return vdisk
        raise NotFound(f"no vdisk named {name!r}")

    def pool_containers(self, pool: Pool) -> list[Container]:
        return self.store.containers(pool.id)

    def usage(self, pool: Pool) -> PoolUsage:
        allocator = self.allocators[pool.id]
        capacity = allocator.capacity * pool.segment_size
        used = allocator.used * pool.segment_size
        provisioned = sum(v.size_bytes for v in self.vdisks.values() if v.pool_id == pool.id)
        return PoolUsage(capacity, used, capacity - used, provisioned, round(100 * used / capacity, 2) if capacity else 0)

    def allocated_bytes(self, vdisk: VDisk) -> int:
        segment_size = self.pools[vdisk.pool_id].segment_size
        return (self.store.count_mappings(vdisk.id) + len(self.pending.get(vdisk.id, ()))) * segment_size

    # -- pools ---------------------------------------------------------------------------------------------

    async def create_pool(
        self,
        name: str,
        size: int | None = None,
        path: str | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        warn_percent: int = DEFAULT_WARN_PERCENT,
        allocate_ahead: int = DEFAULT_ALLOCATE_AHEAD,
    ) -> Pool:
        """A pool on one container: a new sparse file (default under the data directory) or an existing device."""
        check_name("pool", name)
        if any(p.name == name for p in self.pools.values()):
            raise Conflict(f"pool {name!r} already exists")
        if segment_size & (segment_size - 1) or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise InvalidRequest(f"segment size {segment_size} must be a power of two from 64K to 1G")
        if not 1 <= warn_percent <= 100:
            raise InvalidRequest(f"warning threshold {warn_percent}% must be between 1 and 100")
        if not 0 <= allocate_ahead <= 1024:
            raise InvalidRequest(f"allocate-ahead {allocate_ahead} must be between 0 and 1024 segments")
        if size is not None and size < segment_size:
            raise InvalidRequest(f"pool size {size} is smaller than one segment ({segment_size} bytes)")
        if len(self.store.containers()) >= MAX_CONTAINERS:
            raise Conflict(f"san serves at most {MAX_CONTAINERS} containers")
        path = self._container_path(path or os.path.join(self.data_dir, "pools", f"{name}.img"))
        owned = not os.path.exists(path)
        if owned:
            if size is None:
                raise InvalidRequest(f"{path} does not exist: give --size to create it")
            if not os.path.isdir(os.path.dirname(path)):
                if os.path.dirname(path) != os.path.join(os.path.realpath(self.data_dir), "pools"):
                    raise InvalidRequest(f"directory {os.path.dirname(path)} does not exist")
                os.makedirs(os.path.dirname(path), exist_ok=True)
            if size > os.statvfs(os.path.dirname(path)).f_blocks * os.statvfs(os.path.dirname(path)).f_frsize:
                raise InvalidRequest(f"{size} bytes is more than the whole file system under {os.path.dirname(path)}")
        else:
            if not (is_block_device(path) or os.path.isfile(path)):
                raise InvalidRequest(f"{path} is neither a regular file nor a block device")
            if is_block_device(path):
                try:
                    check_unused_device(path)
                except ContainerError as exc:
                    raise Conflict(str(exc)) from None
            actual = device_size(path)
            if size is None:
                size = actual
            elif size > actual:
                raise InvalidRequest(f"{path} has {actual} bytes, less than the {size} asked for")
        nsegments = size // segment_size
        if nsegments < 1 or nsegments > MAX_SEGMENTS:
            raise InvalidRequest(f"a container holds 1 to {MAX_SEGMENTS} segments, not {nsegments}")
        kind = "device" if is_block_device(path) else "file"
        try:
            if owned:
                create_sparse_file(path, size)
            pool = self.store.add_pool(name, segment_size, warn_percent, allocate_ahead)
            container = self.store.add_container(pool.id, path, kind, size, nsegments, owned)
            self.containers.attach(container.id, path)
            self.commit()
        except ContainerError as exc:
            self.store.rollback()
            if owned and os.path.exists(path):
                os.unlink(path)
            raise InvalidRequest(str(exc)) from None
        except BaseException:
            self.store.rollback()
            if owned and os.path.exists(path):
                os.unlink(path)
            raise
        self.pools[pool.id] = pool
        self.allocators[pool.id] = PoolAllocator([(container.id, nsegments)], self.reserve_segments)
        await self._broadcast(Command(Op.ATTACH_CONTAINER, container=container.id, path=container.path))
        if self.on_low_reserve is not None:
            self.on_low_reserve(pool.id)
        return pool

    def _container_path(self, path: str) -> str:
        """The real path of a new container, refused if it is another container under another name or in the data directory."""
        if "\0" in path:
            raise InvalidRequest("a path cannot contain a NUL byte")
        path = os.path.realpath(path)
        data = os.path.realpath(self.data_dir)
        if path.startswith(data + os.sep) and os.path.dirname(path) != os.path.join(data, "pools"):
            raise InvalidRequest(f"{path} is inside the data directory {data}; pool files belong in {data}/pools")
        identity = _identity(path)
        for container in self.store.containers():
            if container.path == path or (identity is not None and _identity(container.path) == identity):
                raise Conflict(f"{path} is already a container of a pool (as {container.path})")
        return path

    async def delete_pool(self, name: str) -> None:
        pool = self.pool(name)
        allocator = self.allocators[pool.id]
        while allocator.in_flight:
            await asyncio.sleep(0.01)
        users = sorted(v.name for v in self.vdisks.values() if v.pool_id == pool.id)
        if users:
            raise Conflict(f"pool {name!r} still has vdisks: {', '.join(users)}")
        containers = self.pool_containers(pool)
        for container in containers:
            await self._broadcast(Command(Op.DETACH_CONTAINER, container=container.id))
            self.containers.detach(container.id)
        self.store.delete_pool(pool.id)
        self.commit()
        del self.pools[pool.id]
        del self.allocators[pool.id]
        for container in containers:
            if container.owned and os.path.exists(container.path):
                os.unlink(container.path)

    # -- vdisks --------------------------------------------------------------------------------------------

    async def create_vdisk(
        self, name: str, pool_name: str, size: int, thin: bool = True, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> VDisk:
        """Create a vdisk; a thick one is returned in state 'allocating' and finished by finish_thick()."""
        check_name("vdisk", name)
        pool = self.pool(pool_name)
        if any(v.name == name for v in self.vdisks.values()):
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
        allocator = self.allocators[pool.id]
        if not thin and not await self._claimable(allocator, nsegments):
            raise NoSpace(
                f"a thick vdisk of {size} bytes needs {nsegments} segments; pool {pool.name!r} has {allocator.free} free"
            )
        if any(v.name == name for v in self.vdisks.values()):
            raise Conflict(f"vdisk {name!r} already exists")
        runs = [] if thin else allocator.claim_runs(nsegments)
        try:
            vdisk = self.store.add_vdisk(name, pool.id, size, block_size, thin, "ready" if thin else "allocating")
            self._map_runs(vdisk, runs, 0)
            self.commit()
        except BaseException:
            self.store.rollback()
            allocator.release(segment for run in runs for segment in _segments(run))
            raise
        self.vdisks[vdisk.id] = vdisk
        if not thin:
            self.progress[vdisk.id] = 0.0
            self._thick_runs[vdisk.id] = runs
            return vdisk
        try:
            await self._export(vdisk)
        except AgentFailure:
            await self._broadcast(Command(Op.DELETE_TABLE, vdisk=vdisk.id), check=False)
            del self.vdisks[vdisk.id]
            self.store.delete_vdisk(vdisk.id)
            self.commit()
            raise
        return vdisk

    async def _claimable(self, allocator: PoolAllocator, count: int) -> bool:
        """Whether count segments can be claimed, once the reserve refills under way have finished if need be."""
        while allocator.claimable < count <= allocator.free and allocator.in_flight:
            await asyncio.sleep(0.01)
        return allocator.claimable >= count

    def _map_runs(self, vdisk: VDisk, runs: list[Run], first_vseg: int) -> None:
        """Map consecutive vdisk segments from first_vseg onto claimed runs, in the store."""
        vseg = first_vseg
        mappings: list[Mapping] = []
        for container_id, first, length in runs:
            mappings.extend(Mapping(vseg + i, container_id, first + i, 0) for i in range(length))
            vseg += length
        self.store.add_mappings(vdisk.id, mappings)
        self._forget(vdisk.id)

    async def finish_thick(self, vdisk: VDisk, on_progress: Callable[[float], None] | None = None) -> None:
        """Zero a thick vdisk's segments in steps, yielding between them, then mark it ready and export it."""
        pool = self.pools[vdisk.pool_id]
        runs = self._thick_runs.pop(vdisk.id, None)
        if runs is None:
            runs = self._runs_of(vdisk, pool)
        total = sum(length for _, _, length in runs) or 1
        done = 0
        for container_id, first, length in runs:
            for start in range(first, first + length, ZERO_STEP):
                count = min(ZERO_STEP, first + length - start)
                self.containers.zero(container_id, [(start * pool.segment_size, count * pool.segment_size)])
                done += count
                self.progress[vdisk.id] = done / total
                if on_progress is not None:
                    on_progress(done / total)
                await asyncio.sleep(0)
        self.containers.flush({c for c, _, _ in runs})
        vdisk.state = "ready"
        self.store.update_vdisk(vdisk)
        self.commit()
        self.progress.pop(vdisk.id, None)
        await self._export(vdisk)

    def _runs_of(self, vdisk: VDisk, pool: Pool) -> list[Run]:
        return _runs((m.container_id, m.pseg) for m in self.mappings(vdisk.id, 0, vdisk.nsegments(pool.segment_size)))

    def unfinished_thick(self) -> list[VDisk]:
        return [v for v in self.vdisks.values() if v.state == "allocating"]

    async def grow_vdisk(self, name: str, size: int) -> VDisk:
        vdisk = self.vdisk(name)
        pool = self.pools[vdisk.pool_id]
        if vdisk.state != "ready":
            raise Conflict(f"vdisk {name!r} is still being allocated")
        if size <= vdisk.size_bytes:
            raise InvalidRequest(f"new size {size} must be larger than the current {vdisk.size_bytes} bytes")
        if size % vdisk.block_size:
            raise InvalidRequest(f"size {size} must be a multiple of the {vdisk.block_size}-byte block size")
        old_segments = vdisk.nsegments(pool.segment_size)
        new_segments = -(-size // pool.segment_size)
        if new_segments > MAX_VDISK_SEGMENTS:
            raise InvalidRequest(f"size {size} needs more than the {MAX_VDISK_SEGMENTS} segments a vdisk can have")
        allocator = self.allocators[pool.id]
        added = new_segments - old_segments
        if not vdisk.thin and added and not await self._claimable(allocator, added):
            raise NoSpace(f"growing thick vdisk {name!r} needs {added} segments; pool {pool.name!r} has {allocator.free} free")
        if vdisk.state != "ready" or vdisk.size_bytes >= size:
            raise Conflict(f"vdisk {name!r} changed while waiting for space; try again")
        runs = [] if vdisk.thin or not added else allocator.claim_runs(added)
        try:
            self._map_runs(vdisk, runs, old_segments)
            for container_id, first, length in runs:
                self.containers.zero(container_id, [(first * pool.segment_size, length * pool.segment_size)])
            self.containers.flush({c for c, _, _ in runs})
            self.store.update_vdisk(VDisk(**{**vdisk.to_dict(), "size_bytes": size}))
            self.commit()
        except BaseException:
            self.store.rollback()
            allocator.release(segment for run in runs for segment in _segments(run))
            self._forget(vdisk.id)
            raise
        vdisk.size_bytes = size
        await self._broadcast(Command(Op.GROW_TABLE, vdisk=vdisk.id, nsegments=new_segments, nblocks=vdisk.nblocks))
        self._changed("grown", vdisk)
        return vdisk

    async def delete_vdisk(self, name: str) -> None:
        """Remove a vdisk once no agent has I/O in flight on it; its segments go back to the pool."""
        vdisk = self.vdisk(name)
        if vdisk.state != "ready":
            raise Conflict(f"vdisk {name!r} is still being allocated")
        self.zoning.check_unzoned(vdisk)
        pool = self.pools[vdisk.pool_id]
        self._changed("deleted", vdisk)
        await self._broadcast(Command(Op.DELETE_TABLE, vdisk=vdisk.id, blocking=True))
        self._write_pending()
        freed = self.store.remove_mappings(vdisk.id, 0, vdisk.nsegments(pool.segment_size))
        self._forget(vdisk.id)
        self.store.delete_vdisk(vdisk.id)
        self.commit()
        del self.vdisks[vdisk.id]
        allocator = self.allocators[pool.id]
        granted = list(self.grants.pop(vdisk.id, {}))
        allocator.granted.difference_update(granted)
        allocator.release(freed + granted)
        self._check_threshold(pool.id)
        for container_id, first, length in _runs(freed):
            self.containers.zero(container_id, [(first * pool.segment_size, length * pool.segment_size)])

    async def set_state(self, name: str, start: int, count: int, state: int) -> None:
        """Give mapped segments [start, start+count) persistent state bits (NOWRITE, ERROR) and tell the agents."""
        vdisk = self.vdisk(name)
        if (
            state & ~(NOWRITE | ERROR)
            or start < 0
            or count < 1
            or start + count > vdisk.nsegments(self.pools[vdisk.pool_id].segment_size)
        ):
            raise InvalidRequest(f"bad state {state} or segments {start}+{count} for vdisk {name!r}")
        self._write_pending()
        self.store.set_mapping_state(vdisk.id, start, start + count, state)
        self.commit()
        self._forget(vdisk.id)
        await self._broadcast(Command(Op.SET_STATE, vdisk=vdisk.id, start=start, count=count, bits=state))

    async def _export(self, vdisk: VDisk) -> None:
        await self._broadcast(self._create_table(vdisk))
        self._changed("ready", vdisk)

    def _check_threshold(self, pool_id: int) -> None:
        """Tell the frontends when a pool's use crosses its warning threshold, up (the soft-threshold unit attention)
        or back down."""
        allocator, pool = self.allocators[pool_id], self.pools[pool_id]
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

    def _changed(self, event: str, vdisk: VDisk) -> None:
        """Tell the frontends a vdisk became ready, grew or went away."""
        if self.on_change is not None:
            self.on_change(event, vdisk)

    def _create_table(self, vdisk: VDisk) -> Command:
        pool = self.pools[vdisk.pool_id]
        return Command(
            Op.CREATE_TABLE,
            vdisk=vdisk.id,
            nsegments=vdisk.nsegments(pool.segment_size),
            segment_blocks=pool.segment_size // vdisk.block_size,
            block_size=vdisk.block_size,
            nblocks=vdisk.nblocks,
        )

    # -- agents --------------------------------------------------------------------------------------------

    async def add_agent(self, link: AgentLink) -> None:
        """Register an agent and give it every container and a table (all INVALID) for every ready vdisk."""
        self.agents.append(link)
        for container in self.store.containers():
            await self._send(link, Command(Op.ATTACH_CONTAINER, container=container.id, path=container.path))
        for vdisk in self.vdisks.values():
            if vdisk.state == "ready":
                await self._send(link, self._create_table(vdisk))

    async def _broadcast(self, command: Command, check: bool = True) -> None:
        for link in self.agents:
            await self._send(link, command, check)

    @staticmethod
    async def _send(link: AgentLink, command: Command, check: bool = True) -> None:
        response = await link.send(command)
        if check and response.action is Action.FAIL:
            raise AgentFailure(f"an agent refused {command.op.value}: {response.message}")

    # -- faults --------------------------------------------------------------------------------------------

    def handle(self, message: Fault | Allocated | Release | Flush) -> Response:
        """Answer an agent: a Flush commits metadata, Allocated records mappings, Release unmaps segments, a Fault
        gets entries or failure."""
        try:
            if isinstance(message, Flush):
                self.commit()
                return Response()
            if isinstance(message, Allocated):
                return self.record_allocated(message)
            if isinstance(message, Release):
                return self.release(message)
            return self.handle_fault(message)
        except (StoreFailure, OSError, sqlite3.Error) as exc:
            log.error("cannot answer %s: %s", message, exc)
            return Response(Action.FAIL, reason=Reason.IO_ERROR, message=str(exc))

    def handle_fault(self, fault: Fault) -> Response:
        vdisk = self.vdisks.get(fault.vdisk)
        if vdisk is None or vdisk.state != "ready":
            return Response(Action.FAIL, reason=Reason.NO_VDISK, message=f"no vdisk {fault.vdisk}")
        pool = self.pools[vdisk.pool_id]
        nsegments = vdisk.nsegments(pool.segment_size)
        if not 0 <= fault.segment < nsegments:
            return Response(Action.FAIL, reason=Reason.OUT_OF_RANGE, message=f"segment {fault.segment}")
        if fault.state & INVALID:
            start = fault.segment - fault.segment % LOAD_CHUNK
            return Response(Action.RETRY, start, self._entries(vdisk, start, min(start + LOAD_CHUNK, nsegments)))
        if fault.state & ERROR:
            return Response(Action.FAIL, reason=Reason.IO_ERROR, message=f"segment {fault.segment} is in error")
        near = {m.vseg: m for m in self.mappings(vdisk.id, max(fault.segment - 1, 0), fault.segment + pool.allocate_ahead + 2)}
        current = near.get(fault.segment)
        state = current.state if current else ZERO
        if not fault.write or not state & (NOWRITE | ZERO):
            return Response(Action.RETRY, fault.segment, self._entries(vdisk, fault.segment, fault.segment + 1))
        if state & NOWRITE:
            return Response(Action.FAIL, reason=Reason.WRITE_PROTECTED, message=f"segment {fault.segment} is read-only")
        if fault.zero_data:
            return Response(Action.COMPLETE)
        return self._allocate(vdisk, pool, fault.segment, nsegments, near)

    def record_allocated(self, report: Allocated) -> Response:
        """Record the mappings an agent made from its grant; all or nothing."""
        vdisk = self.vdisks.get(report.vdisk)
        grant = self.grants.get(report.vdisk, {})
        if vdisk is None:
            return Response(Action.FAIL, reason=Reason.NO_VDISK, message=f"no vdisk {report.vdisk}")
        nsegments = vdisk.nsegments(self.pools[vdisk.pool_id].segment_size)
        seen: set[int] = set()
        taken: set[Segment] = set()
        for vseg, container_id, pseg in report.entries:
            if (
                (container_id, pseg) not in grant
                or (container_id, pseg) in taken
                or not 0 <= vseg < nsegments
                or vseg in seen
                or self.mappings(vdisk.id, vseg, vseg + 1)
            ):
                return Response(
                    Action.FAIL,
                    reason=Reason.BAD_COMMAND,
                    message=f"segment {container_id}:{pseg} is not granted for vdisk segment {vseg}",
                )
            seen.add(vseg)
            taken.add((container_id, pseg))
        allocator = self.allocators[vdisk.pool_id]
        pending = self.pending.setdefault(vdisk.id, {})
        for vseg, container_id, pseg in report.entries:
            del grant[(container_id, pseg)]
            allocator.granted.discard((container_id, pseg))
            mapping = Mapping(vseg, container_id, pseg, 0)
            pending[vseg] = mapping
            self._chunk(vdisk.id, vseg // LOAD_CHUNK)[vseg % LOAD_CHUNK] = mapping
        self._check_threshold(vdisk.pool_id)
        return Response()

    def release(self, message: Release) -> Response:
        """Unmap whole vdisk segments (UNMAP, WRITE SAME with UNMAP). The change joins the open metadata transaction;
        the physical segments go back to the pool only once it is committed, so a crash can never leave this vdisk
        pointing at a segment another vdisk has been given."""
        vdisk = self.vdisks.get(message.vdisk)
        if vdisk is None or vdisk.state != "ready":
            return Response(Action.FAIL, reason=Reason.NO_VDISK, message=f"no vdisk {message.vdisk}")
        nsegments = vdisk.nsegments(self.pools[vdisk.pool_id].segment_size)
        start, stop = message.start, message.start + message.count
        if not 0 <= start <= stop <= nsegments:
            return Response(Action.FAIL, reason=Reason.OUT_OF_RANGE, message=f"segments {start}-{stop} of {nsegments}")
        if not vdisk.thin:
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"vdisk {vdisk.name!r} is thick")
        if not self.mappings(vdisk.id, start, stop):
            return Response()
        self._redo_unmaps()
        self._write_pending()
        freed = self.store.remove_mappings(vdisk.id, start, stop)
        for saved in self.unsaved.get(vdisk.id, {}), self.pending.get(vdisk.id, {}):
            for vseg in [v for v in saved if start <= v < stop]:
                del saved[vseg]
        self.freeing.setdefault(vdisk.pool_id, []).extend(freed)
        self.unmaps.append((vdisk.id, start, stop))
        self._forget(vdisk.id)
        return Response()

    def _grant(self, vdisk: VDisk, allocator: PoolAllocator, after: Segment) -> tuple[Segment, ...]:
        """Top up the vdisk's grant from the reserve, when one agent serves it (so no two agents map a segment twice)."""
        grant = self.grants.setdefault(vdisk.id, {})
        want = self.grant_segments - len(grant)
        if len(self.agents) != 1 or want < self.grant_segments // 2:
            return ()
        extra = allocator.take(min(want, len(allocator.reserve)), (after[0], after[1] + 1))
        allocator.granted.update(extra)
        grant.update(dict.fromkeys(extra))
        return tuple(extra)

    def _entries(self, vdisk: VDisk, start: int, stop: int) -> tuple[Entry, ...]:
        entries: list[Entry] = [(0, 0, ZERO)] * (stop - start)
        for m in self.mappings(vdisk.id, start, stop):
            entries[m.vseg - start] = (m.container_id, m.pseg, m.state)
        return tuple(entries)

    def _allocate(self, vdisk: VDisk, pool: Pool, vseg: int, nsegments: int, mapped: dict[int, Mapping]) -> Response:
        """Map vseg (and, for a sequential writer, the next unmapped segments) onto reserved segments."""
        hint: Segment | None = None
        count = 1
        if vseg - 1 in mapped:
            before = mapped[vseg - 1]
            hint = (before.container_id, before.pseg + 1)
            while count <= pool.allocate_ahead and vseg + count < nsegments and vseg + count not in mapped:
                count += 1
        elif vseg + 1 in mapped:
            after = mapped[vseg + 1]
            hint = (after.container_id, after.pseg - 1)
        allocator = self.allocators[pool.id]
        if not allocator.reserve:
            self._refill(pool, count)
            if allocator.reserve:
                ceiling = max(min(MAX_RESERVE_BYTES // pool.segment_size, allocator.capacity // 8), 1)
                allocator.reserve_target = min(allocator.reserve_target * 2, ceiling)
        taken = allocator.take(count, hint)
        if len(allocator.reserve) < allocator.reserve_target // 2 and self.on_low_reserve is not None:
            self.on_low_reserve(pool.id)
        if not taken:
            return Response(Action.FAIL, reason=Reason.NO_SPACE, message=f"pool {pool.name!r} has no free segment")
        pending = self.pending.setdefault(vdisk.id, {})
        for i, (c, p) in enumerate(taken):
            mapping = Mapping(vseg + i, c, p, 0)
            pending[vseg + i] = mapping
            self._chunk(vdisk.id, mapping.vseg // LOAD_CHUNK)[mapping.vseg % LOAD_CHUNK] = mapping
        grant = self._grant(vdisk, allocator, taken[-1])
        self._check_threshold(pool.id)
        return Response(Action.RETRY, vseg, tuple((c, p, 0) for c, p in taken), grant=grant)

    def _refill(self, pool: Pool, target: int) -> None:
        """Top up the reserve in line (the slow path: only when it ran dry before a background refill)."""
        runs = self.plan_refill(pool.id, target)
        try:
            self.zero_runs(pool.id, runs)
        except OSError:
            self.allocators[pool.id].cancel_reserve(runs)
            raise
        self.allocators[pool.id].add_reserve(runs)

    def plan_refill(self, pool_id: int, target: int | None = None) -> list[Run]:
        """Free runs set aside for the reserve; zero_runs() them (any thread), then add_reserve() them."""
        allocator = self.allocators[pool_id]
        return allocator.plan_reserve(target or allocator.reserve_target)

    def zero_runs(self, pool_id: int, runs: list[Run]) -> None:
        """Zero runs of segments and make the zeros durable: a handed-out segment never shows old bytes."""
        segment_size = self.pools[pool_id].segment_size
        for container_id, first, length in runs:
            self.containers.zero(container_id, [(first * segment_size, length * segment_size)])
        self.containers.flush({c for c, _, _ in runs})

    def maintain(self) -> None:
        """Timer work: commit pending metadata."""
        self.commit()

    def mappings(self, vdisk_id: int, start: int, stop: int) -> list[Mapping]:
        """Mappings of vdisk segments [start, stop), from the cache of the persistent table."""
        found: list[Mapping] = []
        for index in range(start // LOAD_CHUNK, (stop - 1) // LOAD_CHUNK + 1 if stop > start else 0):
            base = index * LOAD_CHUNK
            chunk = self._chunk(vdisk_id, index)
            found.extend(m for m in chunk[max(start - base, 0) : stop - base] if m is not None)
        return found

    def _chunk(self, vdisk_id: int, index: int) -> list[Mapping | None]:
        """One LOAD_CHUNK-entry slice of a vdisk's persistent table: the store's rows plus uncommitted ones."""
        key = (vdisk_id, index)
        chunk = self.cache.get(key)
        if chunk is not None:
            self.cache.move_to_end(key)
            return chunk
        base = index * LOAD_CHUNK
        chunk = [None] * LOAD_CHUNK
        for m in self.store.mappings(vdisk_id, base, base + LOAD_CHUNK):
            chunk[m.vseg - base] = m
        for unmapped, start, stop in self.unmap_retry:
            if unmapped == vdisk_id:
                for vseg in range(max(start, base), min(stop, base + LOAD_CHUNK)):
                    chunk[vseg - base] = None
        for vseg, m in self.pending.get(vdisk_id, {}).items():
            if base <= vseg < base + LOAD_CHUNK:
                chunk[vseg - base] = m
        self.cache[key] = chunk
        if len(self.cache) > CACHE_CHUNKS:
            self.cache.popitem(last=False)
        return chunk

    def _forget(self, vdisk_id: int) -> None:
        for key in [k for k in self.cache if k[0] == vdisk_id]:
            del self.cache[key]

    def _write_pending(self) -> None:
        """Put uncommitted allocations into the store's open transaction (kept until commit() succeeds)."""
        for vdisk_id, pending in self.pending.items():
            self.store.add_mappings(vdisk_id, sorted(pending.values()))
            self.unsaved.setdefault(vdisk_id, {}).update(pending)
        self.pending.clear()

    def _redo_unmaps(self) -> None:
        """Unmaps a failed commit rolled back go into the open transaction again, before any later mapping."""
        for vdisk_id, start, stop in self.unmap_retry:
            if vdisk_id in self.vdisks:
                freed = self.store.remove_mappings(vdisk_id, start, stop)
                self.freeing.setdefault(self.vdisks[vdisk_id].pool_id, []).extend(freed)
                self.unmaps.append((vdisk_id, start, stop))
        self.unmap_retry.clear()

    def commit(self) -> None:
        """Make every mapping change so far durable, atomically (a metadata commit, like dm-thin's).

        On failure the transaction is rolled back and the allocations wait for the next commit."""
        try:
            self._redo_unmaps()
            self._write_pending()
            self.store.commit()
        except sqlite3.Error as exc:
            self.store.rollback()
            for vdisk_id, mappings in self.unsaved.items():
                self.pending.setdefault(vdisk_id, {}).update(mappings)
            self.unsaved.clear()
            self.freeing.clear()  # the unmaps are undone with the transaction: their segments stay this vdisk's
            self.unmap_retry.extend(self.unmaps)
            self.unmaps.clear()
            for vdisk_id in list(self.vdisks):
                self._forget(vdisk_id)
            raise StoreFailure(f"metadata commit failed: {exc}") from exc
        self.unsaved.clear()
        self.unmaps.clear()
        self.unmap_retry.clear()
        for pool_id, segments in self.freeing.items():
            self.allocators[pool_id].release(segments)
            self._check_threshold(pool_id)
        self.freeing.clear()
