"""The mapping agent: map tables per vdisk, reads and writes through them, faults to the controller.

The common case never leaves the agent: translate, then pread/pwrite on the container with the GIL released."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import Histogram

from san._fastmap import ERROR, INVALID, LATENCY_BOUNDS, NOWRITE, SHARED, ZERO, MapFault, MapTable, bitmap_runs
from san.agent import alternates
from san.agent._blockio import AGAIN, DONE, FAULT, read_blocks, write_blocks
from san.groupcommit import GroupCommit
from san.protocol.messages import (
    LOAD_CHUNK,
    Action,
    Allocated,
    Alternate,
    Command,
    Fault,
    Flush,
    Op,
    Reason,
    Release,
    Response,
)
from san.protocol.transport import ControllerLink
from san.storage.containers import ContainerError, ContainerSet
from san.storage.label import LabelError

log = logging.getLogger("san.agent")
T = TypeVar("T")
DIRECT_IO = ("off", "auto", "on")  # auto: block devices (a shared disk) with O_DIRECT, files through the page cache
REPORT_DELAY = 0.2
IO_THREADS = 32
REPORT_RETRY = 1.0
UNMAP_CHUNK = 65536
ZERO_WRITE_BYTES = 1 << 20


class AgentIOError(Exception):
    """An I/O that cannot complete; reason says why (the SCSI layer turns it into sense data)."""

    def __init__(self, reason: Reason, message: str = "") -> None:
        super().__init__(message or reason.value)
        self.reason = reason


@dataclass
class _Claim:
    """A question to the controller that other I/O waits for instead of asking again: they share its failure (the
    controller unreachable past the suspend timeout fails them all at once, not one after another)."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: AgentIOError | None = None

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise AgentIOError(self.error.reason, str(self.error))


@dataclass
class Volume:
    """An agent's view of one vdisk: its map table, its size in blocks, its grant of zeroed segments
    (container, segment) to map on first writes without asking, and the mappings made from it not yet reported."""

    table: MapTable
    nblocks: int
    grant: dict[tuple[int, int], None] = field(default_factory=dict)  # in the order granted
    unreported: list[tuple[int, int, int]] = field(default_factory=list)
    releasing: list[tuple[int, int, asyncio.Event]] = field(default_factory=list)
    faulting: dict[int, _Claim] = field(default_factory=dict)  # segments a first write is asking for
    loading: dict[int, _Claim] = field(default_factory=dict)  # chunks (LOAD_CHUNK) whose entries are asked for
    topped: int = 0  # the grant's size when it was last topped up: a report goes early once half of it is used
    revokes: int = 0  # times the grant was revoked: an answer asked for before the last one brings no grant
    frozen: list[int] = field(default_factory=list)  # entries whose writable alternates a snapshot is freezing
    sharing: asyncio.Event | None = None  # set once a snapshot's fence has been answered: copies on write wait
    fences: int = 0  # fences begun: a copy on write that saw one begin meanwhile starts again


class Agent:
    """Holds volatile map tables; everything it knows can be rebuilt by faulting to the controller."""

    def __init__(self, link: ControllerLink, direct_io: str = "off") -> None:
        if direct_io not in DIRECT_IO:
            raise ValueError(f"direct I/O {direct_io!r} is not one of {', '.join(DIRECT_IO)}")
        self.link = link
        self.direct_io = direct_io
        self.volumes: dict[int, Volume] = {}
        self.containers = ContainerSet()
        self.drops = 0  # times every mapping was dropped (drop_all): an answer from before says nothing of now
        self.mapped = 0  # mappings made so far (faults that allocated, grant mappings): a generation count
        self.copies_on_write = 0  # alternate locations taken for writes into shared entries
        self.copied_bytes = 0  # bytes copied into them from the shared alternate locations they replaced
        self.durable = 0  # every mapping up to this generation is committed by the controller
        self.report_scheduled = False
        self.topping_up = False
        self.reporting = asyncio.Lock()
        self.requests = itertools.count(1)
        self.full: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.data_flush = GroupCommit(self._sync)
        self.io_threads = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io")
        self.metadata_commit = GroupCommit(self._commit)
        self.fault_seconds = Histogram(
            "san_fault_resolution_seconds",
            "Time from a fault sent to the controller to its answer, by the entry state that faulted",
            ["state"],
            registry=None,
            buckets=LATENCY_BOUNDS,
        )

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.io_threads.shutdown(wait=True)  # no container I/O left running when the fds close
        self.containers.close()

    async def _in_io_thread(self, work: Callable[..., T], *args: object) -> T:
        """Container I/O that waits for a device (not cached, or O_DIRECT), on one of IO_THREADS threads: as many
        such I/Os in flight at once as a disk queue takes, not asyncio's handful of default threads."""
        return await asyncio.get_running_loop().run_in_executor(self.io_threads, work, *args)

    async def handle(self, command: Command) -> Response:
        """Carry out a controller command; with the blocking flag, answer once earlier I/O has ended. A table is
        dropped only after what was mapped from its grant is reported (before, and after the I/O drained)."""
        if command.op is Op.REVOKE_GRANT:
            return await self._revoke_grant(command.vdisk)
        dropped = self.volumes.get(command.vdisk) if command.op is Op.DELETE_TABLE else None
        if dropped is not None:
            try:
                await self._report(command.vdisk, dropped)
            except AgentIOError as exc:
                return Response(Action.FAIL, reason=exc.reason, message=f"could not report before dropping the table: {exc}")
        try:
            response, volume = self._apply(command)
        except (ValueError, KeyError, ContainerError) as exc:
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=str(exc))
        except MemoryError:
            return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"no memory to carry out {command.op.value}")
        if command.op is Op.SET_STATE and command.bits & NOWRITE and volume is not None:
            return await self._fenced(command.vdisk, volume, response)
        if command.blocking and volume is not None:
            await _drained(volume.table)
        if dropped is not None:
            await self._report_quietly(command.vdisk, dropped)
        return response

    async def _fenced(self, vdisk: int, volume: Volume, response: Response) -> Response:
        """Writes to entries were fenced (NOWRITE; a snapshot's NOWRITE | SHARED): once the writes that were on their
        way have ended and set their bits, the frozen alternate locations take no more, and everything written so far
        is reported, so that a snapshot holds every write acknowledged before the command. Until then no write copies
        on write (what it wrote would be after the snapshot, reported before it)."""
        try:
            await _drained(volume.table)
            volume.table.thaw(volume.frozen)
            volume.frozen.clear()
            await self._report(vdisk, volume)
        except AgentIOError as exc:
            return Response(Action.FAIL, reason=exc.reason, message=f"could not report what was written: {exc}")
        finally:
            _end_fence(volume)
        return response

    async def _revoke_grant(self, vdisk: int) -> Response:
        """Another agent serves the vdisk too: map nothing more from the grant, report what was mapped from it."""
        volume = self.volumes.get(vdisk)
        if volume is None:
            return Response()
        volume.grant.clear()
        volume.revokes += 1
        try:
            await self._report(vdisk, volume)
        except AgentIOError as exc:
            return Response(Action.FAIL, reason=exc.reason, message=f"could not report the grant's mappings: {exc}")
        finally:  # nothing granted while the revoke ran is kept either: the controller takes it all back
            volume.grant.clear()
            volume.revokes += 1
        return Response()

    async def _report_quietly(self, vdisk: int, volume: Volume) -> None:
        try:
            await self._report(vdisk, volume)
        except AgentIOError as exc:
            log.error("could not report vdisk %d's mappings before dropping its table: %s", vdisk, exc)

    def drop_all(self, why: str) -> None:
        """Every entry INVALID, the grants and the mappings made from them forgotten: the lease lapsed, or the agent
        registers again (the controller may have given those segments to others, or changed any mapping, since).
        I/O faults, and waits, until the controller answers."""
        lost = 0
        self.drops += 1
        for volume in self.volumes.values():
            lost += volume.table.dirty
            volume.table.invalidate_all()
            volume.frozen.clear()
            _end_fence(volume)
            volume.grant.clear()
            lost += len(volume.unreported)
            volume.unreported.clear()
        if lost:
            log.error("%s: %d new mappings not yet reported are dropped (writes there since the last flush are lost)", why, lost)

    async def start_over(self, why: str) -> None:
        """drop_all(), then wait for the I/O that began before it: nothing of the old tables is in use on return."""
        self.drop_all(why)
        await asyncio.gather(*(_drained(volume.table) for volume in list(self.volumes.values())))

    def _apply(self, command: Command) -> tuple[Response, Volume | None]:
        op = command.op
        if op is Op.ATTACH_CONTAINER:
            fd = self.containers.attach(command.container, command.path)  # the fd it has, when attached already
            if command.uuid:
                try:
                    label = self.containers.label(command.container)
                except (OSError, LabelError):
                    label = None
                if label is None or label.container_uuid != command.uuid:
                    self.containers.detach(command.container)
                    raise ContainerError(f"{command.path} does not carry the label of container {command.container}")
            if self.direct_io == "on" or (self.direct_io == "auto" and stat.S_ISBLK(os.fstat(fd).st_mode)):
                try:
                    alignment = self.containers.set_direct(command.container)
                except ContainerError:
                    self.containers.detach(command.container)
                    raise
                if alignment > 512:
                    log.warning("%s takes direct I/O in %d-byte units: 512-byte-block vdisks fail on it", command.path, alignment)
            return Response(), None
        if op is Op.DETACH_CONTAINER:
            self.containers.detach(command.container)
            return Response(), None
        if op is Op.CREATE_TABLE:
            current = self.volumes.get(command.vdisk)
            if current is not None and (current.table.nsegments, current.table.segment_blocks, current.table.block_size,
                                        current.nblocks) == (command.nsegments, command.segment_blocks,
                                                             command.block_size, command.nblocks):  # fmt: skip
                return Response(), None  # already here (a delete that failed exports again): keep what it holds
            table = MapTable(command.nsegments, command.segment_blocks, command.block_size)
            self.volumes[command.vdisk] = Volume(table, command.nblocks)
            return Response(), None
        volume = self.volumes.get(command.vdisk)
        if volume is None:
            if op is Op.GET_ENTRIES:
                raise KeyError(f"no table for vdisk {command.vdisk}")
            return Response(), None  # nothing here to change: a table made later starts INVALID and reloads
        if op is Op.DELETE_TABLE:
            del self.volumes[command.vdisk]
        elif op is Op.GROW_TABLE:
            volume.table.grow(command.nsegments)
            volume.nblocks = command.nblocks
        elif op is Op.GET_ENTRIES:
            entries = volume.table.get_entries(command.start, command.count)
            found = tuple(
                Alternate(command.start + i, alt[0], alt[1], tuple(bitmap_runs(alt[2], volume.table.segment_blocks)), alt[3])
                for i, (_, _, _, alt) in enumerate(entries)
                if alt is not None
            )
            return Response(start=command.start, entries=tuple(e[:3] for e in entries), alternates=found), volume
        elif op is Op.SET_ENTRIES:
            volume.table.set_entries(command.start, command.entries)
            alternates.install(volume.table, command.alternates)
        elif op is Op.SET_ALTERNATES:
            alternates.install(volume.table, command.alternates)
        elif op is Op.MARK_ALTERNATES:
            alternates.mark(volume.table, command.alternates)
        elif op is Op.SET_STATE and command.bits == NOWRITE | SHARED:
            volume.table.share(command.start, command.count)
            volume.frozen += volume.table.freeze_alternates(command.start, command.count)
            volume.fences += 1
            volume.sharing = volume.sharing or asyncio.Event()
        elif op is Op.SET_STATE:
            volume.table.set_state(command.start, command.count, command.bits)
            if command.bits & NOWRITE:  # no write goes on into an alternate location there either
                volume.frozen += volume.table.freeze_alternates(command.start, command.count)
                volume.fences += 1
                volume.sharing = volume.sharing or asyncio.Event()
        elif op is Op.CLEAR_STATE:
            volume.table.clear_state(command.start, command.count, command.bits)
        return Response(), volume

    def _volume(self, vdisk: int, lba: int, nblocks: int) -> Volume:
        volume = self.volumes.get(vdisk)
        if volume is None:
            raise AgentIOError(Reason.NO_VDISK, f"vdisk {vdisk} is not served here")
        if nblocks < 0 or lba < 0 or lba + nblocks > volume.nblocks:
            raise AgentIOError(Reason.OUT_OF_RANGE, f"blocks {lba}+{nblocks} outside vdisk of {volume.nblocks} blocks")
        return volume

    async def read(self, vdisk: int, lba: int, nblocks: int) -> bytearray:
        """The data of blocks [lba, lba+nblocks); unwritten space reads as zeros."""
        volume = self._volume(vdisk, lba, nblocks)
        table = volume.table
        block_size = table.block_size
        buffer = bytearray(nblocks * block_size)
        outcome = self._read_into(volume, lba, nblocks, buffer, True)
        if outcome == AGAIN:  # not cached: read it in a thread, so the event loop never waits for a disk
            outcome = await self._in_io_thread(self._read_into, volume, lba, nblocks, buffer, False)
        if outcome == DONE:
            return buffer
        view = memoryview(buffer)
        hold = _Hold(table)
        try:
            pos, end = lba, lba + nblocks
            while pos < end:
                result = table.translate(pos, end - pos, False)
                if isinstance(result, MapFault):
                    await self._resolve(vdisk, volume, hold, result, False, view, lba, pos, end)
                    continue
                await self._transfer(result, view[(pos - lba) * block_size :], False)
                pos = end
        except (ContainerError, OSError) as exc:
            raise AgentIOError(Reason.IO_ERROR, str(exc)) from None
        finally:
            hold.release()
        return buffer

    def read_now(
        self, vdisk: int, lba: int, nblocks: int, into: memoryview | None = None, arrived: int = 0
    ) -> bytearray | memoryview | None:
        """read() when no fault stands in the way, done in C without leaving the caller's thread of control; None
        otherwise (the caller then takes the asynchronous path, which resolves the fault). With into (large enough),
        the blocks land there and the part of it they fill is returned: no copy. With arrived (time.monotonic_ns()
        when the command came in), a read done here is counted in the vdisk's I/O statistics, in C."""
        volume = self._volume(vdisk, lba, nblocks)
        nbytes = nblocks * volume.table.block_size
        buffer: bytearray | memoryview = into[:nbytes] if into is not None and len(into) >= nbytes else bytearray(nbytes)
        if self._read_into(volume, lba, nblocks, buffer, True, arrived) != DONE:
            return None
        return buffer

    def _read_into(
        self, volume: Volume, lba: int, nblocks: int, buffer: bytearray | memoryview, nowait: bool, arrived: int = 0
    ) -> int:
        try:
            return read_blocks(volume.table, self.containers.fd_table, lba, nblocks, buffer, nowait, arrived)
        except OSError as exc:
            raise AgentIOError(Reason.IO_ERROR, str(exc)) from None

    def write_now(self, vdisk: int, lba: int, view: memoryview, arrived: int = 0) -> bool:
        """write() without FUA when every block is already mapped for writing; False (nothing written) otherwise.
        With arrived, a write done here is counted as read_now() counts a read."""
        volume = self._volume(vdisk, lba, len(view) // self._block_size(vdisk))
        return self._write_from(volume, lba, view, True, arrived) not in (FAULT, AGAIN)

    def _block_size(self, vdisk: int) -> int:
        volume = self.volumes.get(vdisk)
        if volume is None:
            raise AgentIOError(Reason.NO_VDISK, f"vdisk {vdisk} is not served here")
        return volume.table.block_size

    def _write_from(self, volume: Volume, lba: int, view: memoryview, nowait: bool = True, arrived: int = 0) -> int:
        """write_blocks(): DONE, FAULT, or (nowait) AGAIN when it would wait for a device opened with O_DIRECT (with
        arrived, a write DONE is counted)."""
        try:
            return write_blocks(volume.table, self.containers.fd_table, lba, view, self.containers.dirty, nowait, arrived)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._no_space(volume, lba, len(view) // volume.table.block_size) from None
            raise AgentIOError(Reason.IO_ERROR, str(exc)) from None

    def _no_space(self, volume: Volume, lba: int, nblocks: int) -> AgentIOError:
        """A write met a full file system under a container: name the container once per episode (until a flush
        finds room again)."""
        extents = volume.table.translate(lba, nblocks, True) if nblocks else []
        containers = {c for c, _, _ in extents} if isinstance(extents, list) else set()
        for container in sorted(containers - self.full - {-1}):
            path = self.containers.paths.get(container, "?")
            self.full.add(container)
            log.error("the file system under container %d (%s) is full: writes that need space there fail", container, path)
        return AgentIOError(Reason.NO_SPACE, "the file system under a container is full")

    def _check_full(self) -> None:
        for container in sorted(self.full):
            path = self.containers.paths.get(container)
            try:
                room = path is not None and os.statvfs(path).f_bavail > 0
            except OSError:
                room = False
            if room or path is None:
                self.full.discard(container)
                log.info("the file system under container %d (%s) has room again", container, path)

    async def write(self, vdisk: int, lba: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write whole blocks at lba; with fua, the data and any new mapping are durable on return."""
        view = memoryview(data).cast("B")
        volume = self._volume(vdisk, lba, 0)
        table = volume.table
        block_size = table.block_size
        if len(view) % block_size:
            raise AgentIOError(Reason.OUT_OF_RANGE, f"{len(view)} bytes is not a whole number of {block_size}-byte blocks")
        nblocks = len(view) // block_size
        self._volume(vdisk, lba, nblocks)
        if not fua:
            outcome = self._write_from(volume, lba, view)
            if outcome == AGAIN:  # direct I/O: the device is waited for in a thread, never on the event loop
                outcome = await self._in_io_thread(self._write_from, volume, lba, view, False)
            if outcome != FAULT:
                return
        hold = _Hold(table)
        written: set[int] = set()
        try:
            pos, end = lba, lba + nblocks
            while pos < end:
                result = table.translate(pos, end - pos, True)
                if isinstance(result, MapFault):
                    pos = await self._resolve(vdisk, volume, hold, result, True, view, lba, pos, end, written)
                    continue
                await self._transfer(result, view[(pos - lba) * block_size :], True, written)
                table.mark_written(pos, end - pos)  # in a writable alternate location: its blocks are there now
                pos = end
            if fua:
                await self._sync(written)
        except (ContainerError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise self._no_space(volume, lba, nblocks) from None
            raise AgentIOError(Reason.IO_ERROR, str(exc)) from None
        finally:
            hold.release()
        if fua:
            first, last = lba // table.segment_blocks, (lba + nblocks - 1) // table.segment_blocks
            if any(alt is not None for _, _, _, alt in table.get_entries(first, last - first + 1)):
                self.mapped += 1  # the bits it set in an alternate location (maybe in a report on its way): committed
            needed = self.mapped  # the mappings this write may have used are all of this generation or older
            while self.durable < needed:
                await self.metadata_commit()

    async def _transfer(
        self, extents: list[tuple[int, int, int]], view: memoryview, write: bool, written: set[int] | None = None
    ) -> None:
        """Move the extents of a request between view and the containers (a read leaves unmapped ones as they are);
        in a thread when a container is open with O_DIRECT (it waits for the device)."""
        if any(container in self.containers.direct for container, _, _ in extents):
            await self._in_io_thread(self._transfer_now, extents, view, write, written)
        else:
            self._transfer_now(extents, view, write, written)

    def _transfer_now(self, extents: list[tuple[int, int, int]], view: memoryview, write: bool, written: set[int] | None) -> None:
        at = 0
        for container, offset, length in extents:
            if write:
                self.containers.write_from(container, offset, view[at : at + length])
                assert written is not None
                written.add(container)
            elif container >= 0:
                self.containers.read_into(container, offset, view[at : at + length])
            at += length

    async def _resolve(
        self,
        vdisk: int,
        volume: Volume,
        hold: _Hold,
        fault: MapFault,
        write: bool,
        view: memoryview,
        lba: int,
        pos: int,
        end: int,
        written: set[int] | None = None,
    ) -> int:
        """Handle a fault met at pos: do the usable part before the faulting segment, then ask the controller. While
        it waits, the I/O lets go of the table's gate (it touches no segment then, and a blocking command, which may
        be what it waits for, must not wait for it); a table dropped meanwhile ends it.

        Returns where the request goes on from (the faulting segment again, or past it if it completed)."""
        table = volume.table
        block_size = table.block_size
        seg_start = fault.segment * table.segment_blocks
        seg_end = min(seg_start + table.segment_blocks, end)
        if seg_start > pos:
            prefix = table.translate(pos, seg_start - pos, write)
            if isinstance(prefix, MapFault):
                return pos
            await self._transfer(prefix, view[(pos - lba) * block_size :], write, written)
            if write:
                table.mark_written(pos, seg_start - pos)
            pos = seg_start
        for start, stop, released in volume.releasing:
            if start <= fault.segment < stop:
                # An unmap is giving this segment back: map it anew only once that is done.
                await self._away(vdisk, volume, hold, released.wait())
                return pos
        if write and fault.state & SHARED and not fault.state & (INVALID | ERROR):
            return await self._copy_on_write(vdisk, volume, hold, fault, pos)
        zero_data = False
        fresh = write and fault.state == ZERO and table.get_entries(fault.segment, 1)[0][3] is None
        if fresh:
            piece = view[(pos - lba) * block_size : (seg_end - lba) * block_size]
            zero_data = piece.tobytes() == bytes(len(piece))
            if not zero_data:
                asking = volume.faulting.get(fault.segment)
                if asking is not None:  # another write is asking for this segment: it gets one mapping, for both
                    await self._away(vdisk, volume, hold, asking.wait())
                    return pos
                if volume.grant:
                    self._map_from_grant(volume, fault.segment)
                    return pos
                if volume.unreported:
                    await self._away(vdisk, volume, hold, self._report(vdisk, volume))
                    return pos  # look again: while it reported, a grant may have come and mapped this segment
        claims: dict[int, _Claim] | None = None
        if fault.state & INVALID:  # one load per chunk in flight: its answer fills the chunk for every I/O in it
            claims, key = volume.loading, fault.segment // LOAD_CHUNK
            loading = claims.get(key)
            if loading is not None:
                await self._away(vdisk, volume, hold, loading.wait())
                return pos
        elif fresh and not zero_data:
            claims, key = volume.faulting, fault.segment
        asked = Fault(vdisk, fault.segment, fault.state, write, zero_data, next(self.requests))
        revokes = volume.revokes
        claim = None
        if claims is not None:
            claim = claims[key] = _Claim()
        try:
            began = time.monotonic()
            response = await self._away(vdisk, volume, hold, self._ask(asked))
            if response.action is not Action.FAIL:  # answered: failures say nothing of how long resolution takes
                self.fault_seconds.labels(_state_name(fault.state)).observe(time.monotonic() - began)
        except AgentIOError as exc:
            if claim is not None:
                claim.error = exc
            raise
        finally:
            if claims is not None:
                claims.pop(key).done.set()
        self._take_grant(volume, revokes, response.grant)
        if response.action is Action.COMPLETE:
            return seg_end
        if fault.state & INVALID:
            self._fill(volume, response)
        elif response.entries:
            self._install(volume, response.start, response.entries)
            if fresh:
                self.mapped += 1
        return pos

    async def _copy_on_write(self, vdisk: int, volume: Volume, hold: _Hold, fault: MapFault, pos: int) -> int:
        """A write met an entry shared with a snapshot or clone: give it a writable alternate location, a segment of
        the grant (asked of the controller when there is none), and copy there first the blocks of the shared
        alternate location it may have had. The write then goes on into it; only the blocks it writes are new
        there. Returns where the write goes on from (the same place)."""
        segment, table = fault.segment, volume.table
        if volume.sharing is not None:  # a snapshot is being taken: what is written now comes after it
            await self._away(vdisk, volume, hold, volume.sharing.wait())
            return pos
        if fault.state & ZERO:  # unmapped: nothing to share, a first write maps a fresh segment
            table.clear_state(segment, 1, NOWRITE | SHARED)
            return pos
        asking = volume.faulting.get(segment)
        if asking is not None:  # another write is doing it: this one goes on once that is done
            await self._away(vdisk, volume, hold, asking.wait())
            return pos
        if not volume.grant:
            revokes = volume.revokes
            asked = Fault(vdisk, segment, fault.state, True, request=next(self.requests))
            response = await self._away(vdisk, volume, hold, self._ask(asked))
            self._take_grant(volume, revokes, response.grant)
            state = response.entries[0][2] if response.entries else SHARED
            if not state & SHARED and table.get_entries(segment, 1)[0][2] & SHARED:  # no snapshot shares it any more
                table.clear_state(segment, 1, SHARED | (0 if state & NOWRITE else NOWRITE))
            return pos  # look again: granted a segment, or no longer shared
        claim = volume.faulting[segment] = _Claim()
        location = next(iter(volume.grant))
        del volume.grant[location]
        fences, revokes, drops = volume.fences, volume.revokes, self.drops
        try:
            old = table.get_entries(segment, 1)[0][3]
            if old is not None:
                copy = alternates.copy_blocks
                copied = await self._away(
                    vdisk, volume, hold, self._in_io_thread(copy, self.containers, table, old[:2], location, old[2])
                )
                self.copied_bytes += copied
            if revokes != volume.revokes or drops != self.drops:
                return pos  # the grant was taken back (or everything dropped) meanwhile: that segment is not ours
            _, _, state, now = table.get_entries(segment, 1)[0]
            if fences != volume.fences or not state & SHARED or state & (INVALID | ERROR) or now != old:
                volume.grant[location] = None  # a snapshot began, or it changed (unshared, dropped): look again
                return pos
            table.set_alternate(segment, location[0], location[1], old[2] if old is not None else None, writable=True)
            table.mark_dirty(segment)  # reported even if no write lands there: the grant's segment is used
            self.mapped += 1
            self.copies_on_write += 1
        except (ContainerError, OSError) as exc:
            volume.grant[location] = None
            claim.error = AgentIOError(Reason.IO_ERROR, str(exc))
            raise claim.error from None
        except AgentIOError as exc:
            claim.error = exc
            raise
        finally:
            volume.faulting.pop(segment).done.set()
        return pos

    @staticmethod
    def _fill(volume: Volume, response: Response) -> None:
        """The entries a load was answered with, where they are still INVALID, with their alternate locations."""
        table = volume.table
        loading: set[int] = set()
        if response.alternates:
            current = table.get_entries(response.start, len(response.entries))
            loading = {response.start + i for i, entry in enumerate(current) if entry[2] & INVALID}
        table.fill_invalid(response.start, response.entries)
        alternates.install(table, response.alternates, loading)

    @staticmethod
    def _install(volume: Volume, start: int, entries: tuple[tuple[int, int, int], ...]) -> None:
        """Entries a write fault was answered with, each only where the table still has no mapping (INVALID, or
        ZERO with no alternate): a mapping made meanwhile (from the grant) holds data, and its report is on its way."""
        table = volume.table
        current = table.get_entries(start, len(entries))
        if all(_unmapped(state, alternate) for _, _, state, alternate in current):
            table.set_entries(start, entries)
            return
        for index, (entry, (_, _, state, alternate)) in enumerate(zip(entries, current, strict=True)):
            if _unmapped(state, alternate):
                table.set_entries(start + index, [entry])

    async def _away(self, vdisk: int, volume: Volume, hold: _Hold, waiting: Awaitable[T]) -> T:
        hold.release()
        try:
            return await waiting
        finally:
            hold.take()
            if self.volumes.get(vdisk) is not volume:
                raise AgentIOError(Reason.NO_VDISK, f"vdisk {vdisk} went away during the I/O")

    def _map_from_grant(self, volume: Volume, segment: int) -> None:
        """Map a ZERO segment onto a granted one (after its neighbour's when the grant has it); report it later."""
        grant = volume.grant
        choice = next(iter(grant))
        if segment > 0:
            container, pseg, state, _ = volume.table.get_entries(segment - 1, 1)[0]
            if state == 0 and (container, pseg + 1) in grant:
                choice = (container, pseg + 1)
        del grant[choice]
        volume.table.set_entries(segment, [(choice[0], choice[1], 0)])
        volume.unreported.append((segment, choice[0], choice[1]))
        self.mapped += 1
        if len(grant) <= volume.topped // 2 and not self.topping_up:
            self.topping_up = True  # half of the grant is used: report now, and the answer tops it up
            self._report_later()
        elif not self.report_scheduled:
            self.report_scheduled = True
            asyncio.get_running_loop().call_later(REPORT_DELAY, self._report_later)

    @staticmethod
    def _take_grant(volume: Volume, revokes: int, grant: tuple[tuple[int, int], ...], early: bool = False) -> None:
        """Add the segments an answer granted, unless the grant was revoked after its question was sent (the
        controller took them back with the rest). The next early report comes once half of what is held is used;
        none after an early report got nothing (the controller's reserve is refilling: the grant's end faults)."""
        if revokes != volume.revokes:
            return
        if grant:
            volume.grant.update(dict.fromkeys(grant))
            volume.topped = len(volume.grant)
        elif early:
            volume.topped = 0

    def _report_later(self) -> None:
        task = asyncio.ensure_future(self._report_all())
        self.tasks.add(task)
        task.add_done_callback(self._reported)

    def _reported(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reporting allocations failed (kept, tried again in %s s): %s", REPORT_RETRY, task.exception())
            if not self.report_scheduled:
                self.report_scheduled = True
                asyncio.get_running_loop().call_later(REPORT_RETRY, self._report_later)

    async def _report_all(self) -> None:
        self.report_scheduled = False
        failure: AgentIOError | None = None
        try:
            for vdisk, volume in list(self.volumes.items()):
                try:
                    await self._report(vdisk, volume)
                except AgentIOError as exc:
                    failure = failure or exc
        finally:
            self.topping_up = False  # answered (and topped up), or failed: the next half-used grant reports again
        if failure is not None:
            raise failure

    async def _report(self, vdisk: int, volume: Volume) -> None:
        """Tell the controller which granted segments now hold which vdisk segments. The mappings are kept until
        the controller has answered OK: one that is lost would leave acknowledged data pointing nowhere."""
        async with self.reporting:
            if not volume.unreported and not volume.table.dirty:
                return
            entries = tuple(volume.unreported)
            reports = alternates.take_reports(volume.table)
            drops, revokes = self.drops, volume.revokes
            try:
                response = await self._ask(Allocated(vdisk, entries, next(self.requests), reports[0] if reports else ()))
                for more in reports[1:]:  # a bitmap too fragmented for one message
                    await self._ask(Allocated(vdisk, (), next(self.requests), more))
            except AgentIOError as exc:
                if exc.reason is not Reason.BAD_COMMAND or drops != self.drops:
                    if drops == self.drops:
                        alternates.put_back(volume.table, reports)
                    raise  # a store error: kept, and sent again (or dropped meanwhile: nothing of it is left)
                # Refused for good (the controller maps these segments otherwise): sending them again would fail
                # every later flush too. Dropped, loudly; this flush fails.
                log.error("the controller refused vdisk %d's report of %d mappings (dropped): %s", vdisk, len(entries), exc)
                del volume.unreported[: len(entries)]
                refused = {vseg for vseg, _, _ in entries} | {alt.vseg for report in reports for alt in report}
                for vseg in refused:  # never write there again: fault, and take the controller's word for it
                    volume.table.set_entries(vseg, [(0, 0, INVALID)])
                raise
            if drops == self.drops:  # else drop_all() emptied the list; what is there now is unreported
                del volume.unreported[: len(entries)]
                self._take_grant(volume, revokes, response.grant, self.topping_up)

    async def _ask(self, message: Fault | Allocated | Release | Flush) -> Response:
        """Send a message (made with a new request id); its answer, or AgentIOError when it failed."""
        response = await self.link.send(message)
        if response.request not in (0, message.request):
            raise AgentIOError(Reason.IO_ERROR, f"the controller answered request {response.request}, not {message.request}")
        if response.action is Action.FAIL:
            raise AgentIOError(response.reason, response.message)
        return response

    async def unmap(self, vdisk: int, lba: int, nblocks: int) -> None:
        """Deallocate blocks [lba, lba+nblocks): they read as zeros afterwards. Whole segments go back to the pool;
        the blocks of partly covered segments are written with zeros (which allocates nothing where none was)."""
        volume = self._volume(vdisk, lba, nblocks)
        table = volume.table
        per = table.segment_blocks
        end = lba + nblocks
        first = -(-lba // per)
        last = table.nsegments if end == volume.nblocks else end // per
        if first >= last:
            await self._write_zeros(vdisk, lba, end)
            return
        await self._write_zeros(vdisk, lba, first * per)
        await self._write_zeros(vdisk, min(last * per, end), end)
        await self._report(vdisk, volume)
        for start in range(first, last, UNMAP_CHUNK):
            count = min(UNMAP_CHUNK, last - start)
            released = asyncio.Event()
            entry = (start, start + count, released)
            volume.releasing.append(entry)
            try:
                table.set_entries(start, [(0, 0, ZERO)] * count)
                await _drained(table)
                await self._report(vdisk, volume)  # mappings made from the grant meanwhile: recorded, then released
                await self._ask(Release(vdisk, start, count, next(self.requests)))
            finally:
                volume.releasing.remove(entry)
                released.set()

    async def _write_zeros(self, vdisk: int, start: int, stop: int) -> None:
        block_size = self.volumes[vdisk].table.block_size
        step = max(ZERO_WRITE_BYTES // block_size, 1)
        for at in range(start, stop, step):
            await self.write(vdisk, at, bytes(min(step, stop - at) * block_size))

    async def provisioning(self, vdisk: int, lba: int, max_segments: int = 64) -> list[tuple[int, int, bool]]:
        """Runs (lba, nblocks, mapped) from lba on, up to max_segments segments: mapped or deallocated (reads zeros)."""
        volume = self._volume(vdisk, lba, 1)
        table = volume.table
        per = table.segment_blocks
        first = lba // per
        last = min(first + max_segments, table.nsegments)
        runs: list[tuple[int, int, bool]] = []
        segment = first
        while segment < last:
            _, _, state, alternate = table.get_entries(segment, 1)[0]
            if state & INVALID:
                response = await self._ask(Fault(vdisk, segment, state, False, request=next(self.requests)))
                self._fill(volume, response)
                continue
            mapped = not state & ZERO or alternate is not None
            start = max(segment * per, lba)
            stop = min((segment + 1) * per, volume.nblocks)
            if runs and runs[-1][2] == mapped:
                runs[-1] = (runs[-1][0], stop - runs[-1][0], mapped)
            else:
                runs.append((start, stop - start, mapped))
            segment += 1
        return runs

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE: written data, then the metadata that points at it, made durable. Concurrent flushes
        share one fdatasync per container and one metadata commit, both done off the event loop."""
        await self.data_flush()
        if self.full:
            self._check_full()
        await self.metadata_commit()

    async def _sync(self, container_ids: set[int] | None = None) -> None:
        """fdatasync the named containers, or every one written since its last flush, in a thread."""
        taken = self.containers.take_dirty(container_ids)
        try:
            await asyncio.to_thread(self.containers.sync, taken)
        except OSError as exc:
            self.containers.dirty.update(container_id for container_id, _ in taken)
            raise AgentIOError(Reason.IO_ERROR, str(exc)) from None
        except BaseException:
            self.containers.dirty.update(container_id for container_id, _ in taken)
            raise

    async def _commit(self) -> None:
        """Report, then have the controller commit: every mapping made before this began is durable after it."""
        covers = self.mapped
        await self._report_all()
        await self._ask(Flush(next(self.requests)))
        self.durable = max(self.durable, covers)


def _state_name(state: int) -> str:
    """What a fault is about, by its most telling state bit."""
    for bit, name in ((ERROR, "error"), (INVALID, "invalid"), (ZERO, "zero"), (NOWRITE, "nowrite")):
        if state & bit:
            return name
    return "none"


def _end_fence(volume: Volume) -> None:
    """The fence of a volume's writes has been answered (or given up): copies on write go on."""
    if volume.sharing is not None:
        volume.sharing.set()
        volume.sharing = None


def _unmapped(state: int, alternate: object) -> bool:
    return bool(state & INVALID) or (state == ZERO and alternate is None)


class _Hold:
    """An I/O's place in its table's I/O gate (what the blocking flag waits for); let go while it waits."""

    def __init__(self, table: MapTable) -> None:
        self.table = table
        self.slot = table.io_start()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.table.io_end(self.slot)
            self.held = False

    def take(self) -> None:
        if not self.held:
            self.slot = self.table.io_start()
            self.held = True


async def _drained(table: MapTable) -> None:
    """Return once every I/O that started on the table before this call has ended (the blocking flag). The last
    I/O may end in a reader thread, so the wake-up crosses back to the loop thread safely."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    table.barrier(lambda: loop.call_soon_threadsafe(wake))
    await done
