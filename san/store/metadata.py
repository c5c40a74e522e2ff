"""The one owner of the metadata transaction, after dm-thin-metadata: find/insert/remove mappings, commit, abort.

Agents' mapping changes wait in memory until a commit writes them (in a worker thread, grouped for every flush that
asks meanwhile) or a management change commits with them; what they free runs only once that commit is durable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from typing import TypeVar, cast

from san.errors import StoreFailure
from san.groupcommit import GroupCommit
from san.store.sqlite import SQLiteStore
from san.store.store import Mapping, StoreError

log = logging.getLogger("san.metadata")
T = TypeVar("T")
Segment = tuple[int, int]
Changes = dict[int, dict[int, Mapping | None]]  # vdisk -> vseg -> new mapping, None: unmapped
CHUNK = 1024
CACHE_CHUNKS = 256


@dataclass
class _Flight:
    """A commit running in the worker thread: what it writes, and what waits for it to be durable."""

    future: Future[list[Segment]]
    changed: Changes
    orphans: list[Segment]
    actions: list[Callable[[], None]]
    settled: bool = False


class Metadata:
    """The persistent tables as the controller sees them: committed rows plus the changes not yet committed.

    insert() and remove() are the agents' changes: visible to find() at once, durable at the next commit or flush.
    flush() commits them in a worker thread while the event loop goes on (find() then sees the commit in flight
    under the changes made since); concurrent flushes share one commit. commit(change) runs one management change
    with them in one transaction on the caller's thread. If anything fails, the transaction is aborted (rolled
    back), the change is lost and raises, and the agents' changes stay pending for the next commit. Nothing else
    begins, commits or rolls back a transaction on the store."""

    def __init__(self, store: SQLiteStore, on_freed: Callable[[list[Segment]], None]) -> None:
        self.store = store
        self.on_freed = on_freed
        self.changed: Changes = {}
        self.orphans: list[Segment] = []  # uncommitted mappings removed again: free once a commit is durable
        self.actions: list[Callable[[], None]] = []
        self.cache: OrderedDict[tuple[int, int], list[Mapping | None]] = OrderedDict()
        self.counts: dict[int, int] = {}
        self.failures = 0
        self.commits = 0
        self.flight: _Flight | None = None
        self.observe_commit: Callable[[float], None] = lambda seconds: None  # each transaction's time (metrics)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="metadata")
        self.flush = GroupCommit(self._flush)

    # -- reads ---------------------------------------------------------------------------------------------

    def find(self, vdisk_id: int, start: int, stop: int) -> list[Mapping]:
        """Mappings of vdisk segments [start, stop), committed or not, in segment order."""
        found: list[Mapping] = []
        for index in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else 0):
            base = index * CHUNK
            found.extend(m for m in self._chunk(vdisk_id, index)[max(start - base, 0) : stop - base] if m is not None)
        return found

    def count(self, vdisk_id: int) -> int:
        """How many segments of a vdisk are mapped, committed or not."""
        if vdisk_id in self.counts:
            return self.counts[vdisk_id]
        with _reading():
            committed = self.store.count_mappings(vdisk_id)
            for vseg, mapping in self._overlay(vdisk_id).items():
                had = bool(self.store.mappings(vdisk_id, vseg, vseg + 1))
                committed += (mapping is not None) - had
        if self.flight is None:  # with a commit in flight the reads above may straddle it: not kept
            self.counts[vdisk_id] = committed
        return committed

    @property
    def pending(self) -> int:
        """Uncommitted mapping changes (not counting a commit in flight)."""
        return sum(len(v) for v in self.changed.values())

    def _overlay(self, vdisk_id: int) -> dict[int, Mapping | None]:
        """A vdisk's changes not yet known committed: the commit in flight's, under the ones made since."""
        if self.flight is None or vdisk_id not in self.flight.changed:
            return self.changed.get(vdisk_id, {})
        return {**self.flight.changed[vdisk_id], **self.changed.get(vdisk_id, {})}

    # -- the agents' changes -------------------------------------------------------------------------------

    def insert(self, vdisk_id: int, mappings: Iterable[Mapping]) -> None:
        """Map vdisk segments, or give mapped ones a new version (durable at the next commit)."""
        changed = self.changed.setdefault(vdisk_id, {})
        for mapping in mappings:
            if vdisk_id in self.counts and not self.find(vdisk_id, mapping.vseg, mapping.vseg + 1):
                self.counts[vdisk_id] += 1  # (a new version of a mapping, copy on write's, maps nothing more)
            changed[mapping.vseg] = mapping
            self._view(vdisk_id, mapping.vseg, mapping)

    def remove(self, vdisk_id: int, start: int, stop: int) -> None:
        """Unmap vdisk segments [start, stop). Their physical segments go back only after the commit that makes the
        removal durable, so a crash can never leave this vdisk pointing at a segment someone else was given."""
        changed = self.changed.setdefault(vdisk_id, {})
        for mapping in self.find(vdisk_id, start, stop):
            if changed.get(mapping.vseg) is not None:  # what it holds that was never committed: nothing unreferences it
                self.orphans += self._uncommitted(vdisk_id, mapping)
            changed[mapping.vseg] = None
            self._view(vdisk_id, mapping.vseg, None)
            if vdisk_id in self.counts:
                self.counts[vdisk_id] -= 1

    def _uncommitted(self, vdisk_id: int, mapping: Mapping) -> list[Segment]:
        """The segments a pending mapping holds that no version of it in the store (or in the commit in flight) holds:
        a new mapping's, a new alternate location's; not the shared primary of a copy on write."""
        with _reading():
            held = {s for m in self.store.mappings(vdisk_id, mapping.vseg, mapping.vseg + 1) for s in _segments(m)}
        flying = self.flight.changed.get(vdisk_id, {}).get(mapping.vseg) if self.flight is not None else None
        if flying is not None:
            held.update(_segments(flying))
        return [s for s in _segments(mapping) if s not in held]

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run action once the next commit is durable."""
        self.actions.append(action)

    # -- the transaction -----------------------------------------------------------------------------------

    def commit(self, change: Callable[[SQLiteStore], T] | None = None) -> T | None:
        """Write the pending changes and change(store) in one transaction and make it durable; then free what it
        freed and run the after-commit actions. On failure, abort: nothing of change stays, the pending changes wait
        for the next commit, and the error propagates (a store error as StoreFailure). A commit in flight is waited
        for first (one transaction at a time)."""
        self._land()
        changed, orphans, actions = self._take()
        if change is None and not changed and not orphans and not actions:
            return None
        try:
            freed, result = self._transaction(changed, change)
        except StoreFailure as exc:
            self._restore(changed, orphans, actions, exc)
            raise
        except BaseException:
            self._restore(changed, orphans, actions)
            raise
        self._done(freed + orphans, actions)
        return result

    async def commit_async(self, change: Callable[[SQLiteStore], T]) -> T:
        """commit(change) with the transaction in the worker thread (change(store) runs there: it may touch only the
        store), while the event loop serves on. A management change is committed or not as a whole: if the caller
        is cancelled once its commit has begun, the cancellation is withdrawn: the caller gets the outcome and goes
        on to record it in memory."""
        await self._no_flight()
        changed, orphans, actions = self._take()
        results: list[T] = []

        def run() -> list[Segment]:
            freed, result = self._transaction(changed, change)
            results.append(cast(T, result))
            return freed

        try:
            future = self.worker.submit(run)
        except RuntimeError:  # the worker is shut down (the service is stopping)
            self._restore(changed, orphans, actions)
            raise StoreFailure("metadata commit failed: the store is closing") from None
        flight = self.flight = _Flight(future, changed, orphans, actions)
        waiting = asyncio.wrap_future(future)
        cancelled = False
        while not waiting.done():
            try:
                await asyncio.shield(waiting)
            except asyncio.CancelledError:
                cancelled = cancelled or not waiting.done()
            except BaseException:
                break  # the transaction's own failure: raised below, once settled
        self._settle(flight)
        task = asyncio.current_task()
        if cancelled and task is not None:
            task.uncancel()  # the operation runs to its end: what it committed is recorded in memory too
        if future.cancelled():
            raise StoreFailure("metadata commit failed: the metadata thread stopped before it ran")
        error = future.exception()
        if error is not None:
            raise error
        return results[0]

    async def _flush(self) -> None:
        """One grouped flush: the pending changes committed in the worker thread; the loop serves on meanwhile."""
        await self._no_flight()
        changed, orphans, actions = self._take()
        if not changed and not orphans and not actions:
            return
        future = self.worker.submit(lambda: self._transaction(changed, None)[0])
        flight = self.flight = _Flight(future, changed, orphans, actions)
        try:
            await asyncio.shield(asyncio.wrap_future(future))
        except StoreFailure:
            self._settle(flight)
            raise
        except BaseException:
            if future.done():
                self._settle(flight)
            raise  # cancelled while the commit runs: _land() settles it, whoever needs the store next
        self._settle(flight)

    async def _no_flight(self) -> None:
        """Wait in the loop until no commit is in flight (one transaction at a time); its failure is its own."""
        while self.flight is not None:
            flight = self.flight
            waiting = asyncio.wrap_future(flight.future)
            await asyncio.wait([waiting])
            if not waiting.cancelled():
                waiting.exception()  # retrieved: the flight's owner reports it
            self._settle(flight)

    def _land(self) -> None:
        """Wait for a commit in flight (blocking: it is one fsync) and take its outcome."""
        flight = self.flight
        if flight is not None:
            wait_for([flight.future])
            self._settle(flight)

    def _settle(self, flight: _Flight) -> None:
        if flight.settled:
            return
        flight.settled = True
        self.flight = None
        if flight.future.cancelled():  # never ran: its changes are pending again
            self._restore(flight.changed, flight.orphans, flight.actions)
        elif flight.future.exception() is None:
            self._done(flight.future.result() + flight.orphans, flight.actions)
        else:
            self._restore(flight.changed, flight.orphans, flight.actions, flight.future.exception())

    def _take(self) -> tuple[Changes, list[Segment], list[Callable[[], None]]]:
        taken = self.changed, self.orphans, self.actions
        self.changed, self.orphans, self.actions = {}, [], []
        return taken

    def _transaction(self, changed: Changes, change: Callable[[SQLiteStore], T] | None) -> tuple[list[Segment], T | None]:
        """begin, write, change, commit (in any one thread); rolled back, and a store error raised as StoreFailure,
        if anything fails."""
        store = self.store
        freed: list[Segment] = []
        began = time.monotonic()
        try:
            store.begin()
            for vdisk_id, entries in changed.items():  # a new version of a mapping may keep its segments
                store.remove_mapping_ranges(vdisk_id, _ranges(entries), collect=False)
                store.add_mappings(vdisk_id, sorted(m for m in entries.values() if m is not None))
            if changed:
                freed += store.unreferenced()
            result = change(store) if change is not None else None
            store.commit()
        except (sqlite3.Error, StoreError, OSError) as exc:
            self.abort()
            raise StoreFailure(f"metadata commit failed: {exc}") from exc
        except BaseException:
            self.abort()
            raise
        self.observe_commit(time.monotonic() - began)  # durable: nothing here may turn it into a failure
        return freed, result

    def _done(self, freed: list[Segment], actions: list[Callable[[], None]]) -> None:
        self.commits += 1
        self.on_freed(freed)
        for action in actions:
            action()

    def _restore(
        self, changed: Changes, orphans: list[Segment], actions: list[Callable[[], None]], error: BaseException | None = None
    ) -> None:
        """A commit failed: its changes are pending again, under any made since. A mapping it would have made that
        was replaced meanwhile never reached the store: its segment is an orphan, free after the next commit."""
        for vdisk_id, entries in changed.items():
            later = self.changed.setdefault(vdisk_id, {})
            for vseg, mapping in entries.items():
                if vseg not in later:
                    later[vseg] = mapping
                elif mapping is not None and later[vseg] != mapping:
                    newer = later[vseg]
                    kept = set(_segments(newer)) if newer is not None else set()
                    self.orphans += [s for s in self._uncommitted(vdisk_id, mapping) if s not in kept]
        self.orphans[:0] = orphans
        self.actions[:0] = actions
        if isinstance(error, StoreFailure):
            self.failures += 1
            log.error("%s (%d uncommitted mapping changes kept for the next one)", error, self.pending)

    def abort(self) -> None:
        """Roll back the open transaction, if any (in the thread that opened it): the store is as the last commit
        left it."""
        try:
            self.store.rollback()
        except sqlite3.Error as exc:
            log.error("metadata rollback failed: %s", exc)

    def close(self) -> None:
        """Land a commit in flight and stop the worker thread (the caller then commits what is left)."""
        self._land()
        self.worker.shutdown()

    def reload(self, vdisk_id: int) -> None:
        """A committed change touched this vdisk's mappings: read them from the store again."""
        for key in [k for k in self.cache if k[0] == vdisk_id]:
            del self.cache[key]
        self.counts.pop(vdisk_id, None)

    def forget(self, vdisk_id: int) -> None:
        """The vdisk is gone (its deletion committed): drop what was pending for it."""
        for mapping in self.changed.pop(vdisk_id, {}).values():
            if mapping is not None:
                self.orphans.append((mapping.container_id, mapping.pseg))
        self.reload(vdisk_id)

    # -- the view ------------------------------------------------------------------------------------------

    def _chunk(self, vdisk_id: int, index: int) -> list[Mapping | None]:
        """One CHUNK-entry slice of a vdisk's table: the store's rows with the uncommitted changes on top."""
        key = (vdisk_id, index)
        chunk = self.cache.get(key)
        if chunk is not None:
            self.cache.move_to_end(key)
            return chunk
        base = index * CHUNK
        chunk = [None] * CHUNK
        with _reading():
            rows = self.store.mappings(vdisk_id, base, base + CHUNK)
        for m in rows:
            chunk[m.vseg - base] = m
        for vseg, change in self._overlay(vdisk_id).items():
            if base <= vseg < base + CHUNK:
                chunk[vseg - base] = change
        self.cache[key] = chunk
        if len(self.cache) > CACHE_CHUNKS:
            self.cache.popitem(last=False)
        return chunk

    def _view(self, vdisk_id: int, vseg: int, mapping: Mapping | None) -> None:
        chunk = self.cache.get((vdisk_id, vseg // CHUNK))
        if chunk is not None:
            chunk[vseg % CHUNK] = mapping


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A read of the store that fails (an I/O error, a damaged page) is a StoreFailure like a failed commit."""
    try:
        yield
    except sqlite3.Error as exc:
        log.error("metadata read failed: %s", exc)
        raise StoreFailure(f"metadata read failed: {exc}") from exc


def _segments(mapping: Mapping) -> list[Segment]:
    """The physical segments a mapping holds: its primary location, and its alternate one if it has one."""
    found = [(mapping.container_id, mapping.pseg)]
    if mapping.bitmap is not None:
        found.append((mapping.alt_container, mapping.alt_pseg))
    return found


def _ranges(vsegs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted vdisk segments folded into [start, stop) ranges."""
    ranges: list[tuple[int, int]] = []
    for vseg in sorted(vsegs):
        if ranges and ranges[-1][1] == vseg:
            ranges[-1] = (ranges[-1][0], vseg + 1)
        else:
            ranges.append((vseg, vseg + 1))
    return ranges
