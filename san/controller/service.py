"""The controller service: the data directory, the controller, its timers (metadata commits, reserve refills, thick
allocation) and what it tells the gateways.

Every change a gateway must see (a vdisk ready, grown or gone, hosts, zones, a pool past its threshold) is published
as one Config to every agent; settled() waits until they all have it (and LIO shows it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from san.controller.agents import AgentSession
from san.controller.allocator import PoolAllocator
from san.controller.controller import Controller
from san.datadir import DataDir
from san.errors import StoreFailure
from san.metrics.collectors import ControllerCollector
from san.metrics.endpoint import registry_of
from san.model import VDisk
from san.protocol.messages import Config, SessionInfo

log = logging.getLogger("san")
EXPIRY_CHECK = 0.5


class ControllerService:
    """The controller and its background work; start() before use, stop() to commit and close."""

    def __init__(
        self,
        data_dir: str,
        commit_interval: float = 1.0,
        reserve_segments: int = 64,
        allow_paths: tuple[str, ...] = (),
    ) -> None:
        self.data = DataDir(data_dir)
        self.data_dir = self.data.path
        try:
            self.controller = Controller(self.data.open_store(), self.data_dir, reserve_segments, allow_paths=allow_paths)
        except BaseException:
            self.data.close()
            raise
        self.commit_interval = commit_interval
        self.tasks: set[asyncio.Task[None]] = set()
        self.refilling: set[PoolAllocator] = set()
        self.version = time.time_ns()  # a Config's version grows across restarts too
        self.pushing: asyncio.Future[None] | None = None
        self.dirty = False
        self.controller.on_low_reserve = self.refill
        self.controller.on_change = self._vdisk_changed
        self.controller.on_threshold = lambda pool_id, above: self.publish()
        self.controller.zoning.on_change = self.publish

    async def start(self) -> None:
        for vdisk in self.controller.unfinished_thick():
            self.spawn(self.controller.finish_thick(vdisk))
        for pool_id in self.controller.pools:
            self.controller.low_reserve(pool_id)
        for vdisk in self.controller.snapshots.unreclaimed():  # a reclaim that a stop (or a crash) cut short
            self.controller.snapshots.reclaim(vdisk)
        self.spawn(self._maintain())
        self.spawn(self._expire())

    async def add_agent(self, session: AgentSession) -> None:
        """A newly registered agent: its containers and tables (from the controller), then the current Config."""
        try:
            await self.controller.add_agent(session)
        finally:
            session.joined.set()  # from here on every published change reaches it too
        await self.controller.agents.send(session, self.config(), check=False)

    # -- what the gateways are told ------------------------------------------------------------------------

    def config(self) -> Config:
        """Everything a gateway serves, as of now."""
        c = self.controller
        zoning = c.zoning
        ready = tuple(v for v in sorted(c.vdisks.values(), key=lambda v: v.id) if c.vdisk_state(v) == "ready")
        return Config(
            self.version,
            ready,
            tuple(sorted(zoning.hosts.values(), key=lambda h: h.id)),
            tuple(zoning.zones),
            tuple(sorted(c.above_threshold)),
        )

    def publish(self) -> None:
        """Something the gateways serve changed: send every agent the new Config (in the background, coalesced)."""
        self.version = max(self.version + 1, time.time_ns())
        self.dirty = True
        if self.pushing is None or self.pushing.done():
            self.pushing = asyncio.ensure_future(self._push())

    async def _push(self) -> None:
        while self.dirty:
            self.dirty = False
            await self.controller.agents.broadcast(self.config(), check=False, joined_only=True)

    async def settled(self) -> None:
        """Wait until every agent has the latest Config (and its frontend shows it)."""
        while self.pushing is not None and not self.pushing.done():
            await asyncio.shield(self.pushing)

    def sessions(self, iqn: str) -> int | None:
        """A host's iSCSI sessions on every gateway, as of each one's last heartbeat (None with no gateway)."""
        live = [s for s in self.controller.agents.sessions if not s.fenced]
        return sum(s.hosts.get(iqn, 0) for s in live) if live else None

    def iscsi_sessions(self) -> list[tuple[str, SessionInfo]]:
        """The sessions on every gateway that is not fenced, as of its last heartbeat."""
        return [(s.name, info) for s in self.controller.agents.sessions if not s.fenced for info in s.iscsi]

    def frontend_info(self) -> dict[str, Any]:
        """The controller serves no iSCSI itself: its gateways do (each with its own portals)."""
        return {"target": None, "portals": [], "frontend": None}

    def metrics(self) -> CollectorRegistry:
        """What the controller's /metrics serves."""
        return registry_of(ControllerCollector(self.controller, self.sessions))

    def _vdisk_changed(self, event: str, vdisk: VDisk) -> None:
        self.publish()

    # -- background work -----------------------------------------------------------------------------------

    def refill(self, pool_id: int) -> None:
        """Top up a pool's reserve in the background: the zeroing and its flush run in a thread."""
        allocator = self.controller.allocators[pool_id]
        if allocator not in self.refilling:
            self.refilling.add(allocator)
            allocator.refilling = self.spawn(self._refill(pool_id, allocator))

    async def _refill(self, pool_id: int, allocator: PoolAllocator) -> None:
        try:
            runs = allocator.plan_reserve(allocator.reserve_target)
            if not runs:
                return
            try:
                await asyncio.to_thread(self.controller.zero_runs, pool_id, runs)
            except BaseException:
                allocator.cancel_reserve(runs)
                raise
            allocator.add_reserve(runs)
        finally:
            self.refilling.discard(allocator)
            allocator.refilling = None

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a background job; failures are logged, not lost."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background job failed", exc_info=task.exception())

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            try:
                await self.controller.flush()
            except StoreFailure:
                pass  # the metadata object logged it; its changes stay pending for the next commit
            except Exception:
                log.exception("metadata commit failed; retrying in %s s", self.commit_interval)

    async def _expire(self) -> None:
        """Agents whose lease lapsed are gone: their grants come back."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK)
            self.controller.agents.expire()

    async def stop(self) -> None:
        """Cancel the background work, commit what is pending, close the store and the data directory."""
        for task in [*self.tasks, *([self.pushing] if self.pushing is not None else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.controller.close()
        self.data.close()
