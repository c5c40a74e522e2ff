"""The embedded process: one controller, one agent and their in-process links over one data directory.

Owns the directory lock, the metadata-commit timer and the reserve top-ups; frontends and the API sit on top."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Coroutine
from typing import Any

from san.agent.agent import Agent
from san.controller.allocator import PoolAllocator
from san.controller.controller import Controller
from san.protocol.transport import LocalAgentLink, LocalControllerLink
from san.store.sqlite import SQLiteStore

log = logging.getLogger("san")
DB_NAME = "san.db"


class DataDirLocked(Exception):
    """Another san process serves this data directory."""


class Service:
    """Controller + agent wired together; start() before use, stop() to commit and close."""

    def __init__(self, data_dir: str, commit_interval: float = 1.0, reserve_segments: int = 64) -> None:
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self._lock = open(os.path.join(self.data_dir, "lock"), "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataDirLocked(f"{self.data_dir} is in use by another san process") from None
        self.commit_interval = commit_interval
        self.controller = Controller(SQLiteStore(os.path.join(self.data_dir, DB_NAME)), self.data_dir, reserve_segments)
        self.agent = Agent(LocalControllerLink(self.controller))
        self.tasks: set[asyncio.Task[None]] = set()
        self.refilling: set[PoolAllocator] = set()
        self.controller.on_low_reserve = self.refill

    async def start(self) -> None:
        await self.controller.add_agent(LocalAgentLink(self.agent))
        for vdisk in self.controller.unfinished_thick():
            self.spawn(self.controller.finish_thick(vdisk))
        for pool_id in self.controller.pools:
            self.refill(pool_id)
        self.spawn(self._maintain())

    def refill(self, pool_id: int) -> None:
        """Top up a pool's reserve in the background: the zeroing and its flush run in a thread."""
        allocator = self.controller.allocators[pool_id]
        if allocator not in self.refilling:
            self.refilling.add(allocator)
            self.spawn(self._refill(pool_id, allocator))

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

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a background job; failures are logged, not lost."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background job failed", exc_info=task.exception())

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            try:
                self.controller.maintain()
            except Exception:
                log.exception("metadata commit failed; retrying in %s s", self.commit_interval)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.agent.flush()
        self.controller.close()
        self.agent.close()
        self._lock.close()
