"""The embedded process: one controller, one agent, their in-process links, and the frontend (built-in iSCSI or LIO).

Owns the data directory, the metadata-commit timer, the reserve top-ups, the vdisks' SCSI units and LIO's config."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from san.agent.agent import Agent, AgentIOError
from san.controller.allocator import PoolAllocator
from san.controller.controller import Controller
from san.datadir import DB_NAME, DataDir, DataDirLocked, DataDirUnsafe, StoreRefused
from san.errors import StoreFailure
from san.iscsi.chap import Credentials
from san.iscsi.server import IscsiServer, Limits
from san.iscsi.target import Access, Target
from san.lio.config import LioConfig, RTSLibError, Wanted
from san.lio.handler import TcmuHandler
from san.model import VDisk
from san.protocol.transport import LocalAgentLink, LocalControllerLink
from san.scsi.disk import Disk
from san.scsi.luns import Zoned
from san.scsi.pages import UnitInfo
from san.scsi.sense import UnitAttention

log = logging.getLogger("san")
FRONTENDS = ("iscsi", "lio", "auto")
__all__ = ["DB_NAME", "DataDirLocked", "DataDirUnsafe", "FrontendUnavailable", "Service", "StoreRefused"]


def lio_present() -> bool:
    """Whether this kernel has LIO and the TCMU backstore ready (configfs mounted, target_core_user loaded)."""
    return os.path.isdir("/sys/kernel/config/target/core") and os.path.isdir("/sys/module/target_core_user")


class FrontendUnavailable(Exception):
    """The frontend asked for cannot run on this machine."""


class Service:
    """Controller + agent wired together; start() before use, stop() to commit and close."""

    def __init__(
        self,
        data_dir: str,
        commit_interval: float = 1.0,
        reserve_segments: int = 64,
        portals: list[tuple[str, int]] | None = None,
        target_name: str = "",
        open_access: bool = False,
        frontend: str = "iscsi",
        allow_paths: tuple[str, ...] = (),
        limits: Limits | None = None,
    ) -> None:
        if frontend not in FRONTENDS:
            raise ValueError(f"unknown frontend {frontend!r}: use one of {', '.join(FRONTENDS)}")
        if frontend == "auto":
            frontend = "lio" if lio_present() else "iscsi"
        if frontend == "lio" and not lio_present():
            raise FrontendUnavailable(
                "--frontend lio needs LIO: configfs at /sys/kernel/config and the target_core_user module "
                "(modprobe target_core_user iscsi_target_mod)"
            )
        self.frontend = frontend
        self.data = DataDir(data_dir)
        self.data_dir = self.data.path
        try:
            self.controller = Controller(self.data.open_store(), self.data_dir, reserve_segments, allow_paths=allow_paths)
        except BaseException:
            self.data.close()
            raise
        self.commit_interval = commit_interval
        self.agent = Agent(LocalControllerLink(self.controller))
        self.tasks: set[asyncio.Task[None]] = set()
        self.refilling: set[PoolAllocator] = set()
        self.controller.on_low_reserve = self.refill
        self.controller.on_change = self._vdisk_changed
        self.controller.on_threshold = self._threshold
        self.disks: dict[int, Disk] = {}
        self.open_access = open_access
        self.target = Target(target_name, portals or [], self.access)
        self.iscsi = IscsiServer(self.target, limits) if portals and frontend == "iscsi" else None
        self.controller.zoning.on_change = self._zoning_changed
        self.tcmu: TcmuHandler | None = None
        self.lio: LioConfig | None = None
        self.lio_thread = ThreadPoolExecutor(1, thread_name_prefix="lio")
        self.lio_job: asyncio.Future[None] | None = None
        self.lio_dirty = False
        self.lio_error: str | None = None
        self.stopping = False
        if frontend == "lio":
            self.tcmu = TcmuHandler(self._disk_for_config)
            self.lio = LioConfig(target_name, portals or [], open_access)

    async def start(self) -> None:
        await self.controller.add_agent(LocalAgentLink(self.agent))
        for vdisk in self.controller.unfinished_thick():
            self.spawn(self.controller.finish_thick(vdisk))
        for pool_id in self.controller.pools:
            self.controller.low_reserve(pool_id)
        self.spawn(self._maintain())
        if self.iscsi is not None:
            await self.iscsi.start()
        if self.tcmu is not None:
            await self.tcmu.start()
            self._lio_changed()
            await self.settled()
            if self.lio_error is not None:
                raise FrontendUnavailable(f"cannot configure LIO: {self.lio_error}")

    def disk(self, vdisk: VDisk) -> Disk:
        """The SCSI unit of a vdisk (one per vdisk, shared by every session that sees it)."""
        disk = self.disks.get(vdisk.id)
        if disk is None:
            unit = UnitInfo(vdisk.serial, vdisk.block_size, vdisk.nblocks, vdisk.thin, ndob=self.frontend != "lio")
            disk = self.disks[vdisk.id] = Disk(vdisk.id, self.agent, unit, (self.target.name, 1))
            disk.over_threshold = vdisk.pool_id in self.controller.above_threshold
        return disk

    def _disk_for_config(self, config: str) -> Disk | None:
        """The SCSI unit a TCMU device's config (`<vdisk id>`) names, if that vdisk is ready."""
        vdisk = self.controller.vdisks.get(int(config)) if config.isdigit() else None
        return self.disk(vdisk) if vdisk is not None and self.controller.vdisk_state(vdisk) == "ready" else None

    def _zoning_changed(self) -> None:
        self.target.refresh()
        self._lio_changed()

    def _lio_changed(self) -> None:
        """LIO must follow the controller: reconcile it in the LIO thread (one run at a time, again if needed)."""
        if self.lio is None or self.stopping:
            return
        self.lio_dirty = True
        if self.lio_job is None or self.lio_job.done():
            self.lio_job = asyncio.ensure_future(self._reconcile())

    async def _reconcile(self) -> None:
        assert self.lio is not None
        loop = asyncio.get_running_loop()
        while self.lio_dirty:
            self.lio_dirty = False
            zoning = self.controller.zoning
            wanted = Wanted(
                [copy.copy(v) for v in self.controller.vdisks.values() if self.controller.online(v.pool_id)],
                [copy.copy(h) for h in zoning.hosts.values()],
                [copy.copy(z) for z in zoning.zones],
            )
            try:
                await loop.run_in_executor(self.lio_thread, self.lio.reconcile, wanted)
                self.lio_error = None
            except (RTSLibError, OSError) as exc:
                self.lio_error = str(exc)
                log.error("LIO configuration failed: %s", exc)

    async def settled(self) -> None:
        """Wait until LIO shows the latest change (at once with the built-in frontend)."""
        while self.lio_job is not None and not self.lio_job.done():
            await asyncio.shield(self.lio_job)

    def access(self, initiator: str) -> Access | None:
        """What an initiator may see: its host's zones; for an unknown initiator, nothing, or with open access (demo
        mode) every ready vdisk, in creation order."""
        zoning = self.controller.zoning
        vdisks = self.controller.vdisks
        host = zoning.by_iqn(initiator)
        if host is not None:
            luns = {
                z.lun: Zoned(self.disk(vdisks[z.vdisk_id]), z.read_only)
                for z in zoning.zones_of(host)
                if self.controller.vdisk_state(vdisks[z.vdisk_id]) == "ready"
            }
            credentials = Credentials(host.chap_user, host.chap_secret, host.mutual_user, host.mutual_secret)
            return Access(luns, credentials if host.chap_user else None)
        if not self.open_access:
            return None
        ready = sorted((v for v in vdisks.values() if self.controller.vdisk_state(v) == "ready"), key=lambda v: v.id)
        return Access({lun: Zoned(self.disk(v)) for lun, v in enumerate(ready)})

    def _threshold(self, pool_id: int, above: bool) -> None:
        for vdisk_id, disk in self.disks.items():
            vdisk = self.controller.vdisks.get(vdisk_id)
            if vdisk is not None and vdisk.pool_id == pool_id:
                disk.threshold(above)

    def _vdisk_changed(self, event: str, vdisk: VDisk) -> None:
        if event == "deleted":
            self.disks.pop(vdisk.id, None)
        elif event == "grown" and vdisk.id in self.disks:
            disk = self.disks[vdisk.id]
            disk.unit.nblocks = vdisk.nblocks
            disk.raise_attention(UnitAttention.CAPACITY_CHANGED)
        self.target.refresh()
        self._lio_changed()

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
                await self.controller.flush()
            except StoreFailure:
                pass  # the metadata object logged it; its changes stay pending for the next commit
            except Exception:
                log.exception("metadata commit failed; retrying in %s s", self.commit_interval)

    async def stop(self) -> None:
        if self.iscsi is not None:
            await self.iscsi.stop()
        self.stopping = True
        if self.tcmu is not None and self.lio is not None:
            await self.settled()
            try:
                await asyncio.get_running_loop().run_in_executor(self.lio_thread, self.lio.remove)
            except (RTSLibError, OSError) as exc:
                log.error("could not remove san's LIO objects: %s", exc)
            await self.tcmu.stop()
        self.lio_thread.shutdown()
        for task in list(self.tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await self.agent.flush()
        except AgentIOError as exc:
            log.error("the last flush failed: %s", exc)
        self.controller.close()
        self.agent.close()
        self.data.close()
