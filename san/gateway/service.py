"""The gateway root: one agent, the vdisks' SCSI units, and the frontend (built-in iSCSI or LIO with its reconcile).

It hears from the controller only through the protocol: Commands for the agent's tables, Config for everything its
frontend serves (vdisks, hosts with their CHAP credentials, zones, the pools past their threshold). A gateway of its
own (`san gateway`) finds containers by their labels; the embedded one opens them where the controller has them."""

from __future__ import annotations

import asyncio
import copy
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from san.agent.agent import Agent, AgentIOError
from san.errors import SanError
from san.gateway.storage import Storage
from san.gateway.view import View
from san.iscsi.chap import Credentials
from san.iscsi.server import IscsiServer, Limits
from san.iscsi.target import Access, Target
from san.lio import cfgstring
from san.lio.cfgstring import Served
from san.lio.config import LioConfig, LioError, RTSLibError, Wanted
from san.lio.handler import AdoptRefused, TcmuHandler
from san.model import VDisk
from san.protocol.messages import Action, Command, Config, Op, Reason, Response, SessionInfo
from san.protocol.transport import ControllerLink
from san.scsi.disk import Disk
from san.scsi.luns import Zoned
from san.scsi.pages import UnitInfo
from san.scsi.sense import UnitAttention
from san.storage.containers import ContainerError

log = logging.getLogger("san")
FRONTENDS = ("iscsi", "lio", "auto")
VIEW_WAIT = 30.0  # seconds a vdisk made for targetcli may take to reach this gateway's view
LIO_TRIES, LIO_RETRY = 3, 0.5  # runs of a reconcile that fails, and seconds between them

MakeVDisk = Callable[[str, str, int, int], Awaitable[VDisk]]  # (name, pool, size, block size) -> a ready thin vdisk
Deleted = Callable[[], set[str]]  # the serials of the vdisks the controller deleted since it started


def lio_present() -> bool:
    """Whether this kernel has LIO and the TCMU backstore ready (configfs mounted, target_core_user loaded)."""
    return os.path.isdir("/sys/kernel/config/target/core") and os.path.isdir("/sys/module/target_core_user")


class FrontendUnavailable(Exception):
    """The frontend asked for cannot run on this machine."""


def resolve_frontend(frontend: str) -> str:
    """iscsi or lio for a --frontend value (auto: lio when the kernel has it); FrontendUnavailable for lio without LIO."""
    if frontend not in FRONTENDS:
        raise ValueError(f"unknown frontend {frontend!r}: use one of {', '.join(FRONTENDS)}")
    if frontend == "auto":
        frontend = "lio" if lio_present() else "iscsi"
    if frontend == "lio" and not lio_present():
        raise FrontendUnavailable(
            "--frontend lio needs LIO: configfs at /sys/kernel/config and the target_core_user module "
            "(modprobe target_core_user iscsi_target_mod)"
        )
    return frontend


class Gateway:
    """Agent + SCSI units + frontend; handle() answers the controller's requests. start() before use, stop() after."""

    def __init__(
        self,
        link: ControllerLink,
        portals: list[tuple[str, int]] | None = None,
        target_name: str = "",
        open_access: bool = False,
        frontend: str = "iscsi",
        limits: Limits | None = None,
        storage: Storage | None = None,
        direct_io: str = "off",
        io_stats: bool = True,
    ) -> None:
        self.frontend = resolve_frontend(frontend)
        self.storage = storage
        self.agent = Agent(link, direct_io)
        self.view = View()
        self.disks: dict[int, Disk] = {}
        self.open_access = open_access
        self.target = Target(target_name, portals or [], self.access, io_stats=io_stats)
        self.iscsi = IscsiServer(self.target, limits) if portals and self.frontend == "iscsi" else None
        self.tcmu: TcmuHandler | None = None
        self.lio: LioConfig | None = None
        self.lio_thread = ThreadPoolExecutor(1, thread_name_prefix="lio")
        self.lio_job: asyncio.Future[None] | None = None
        self.lio_dirty = False
        self.lio_error: str | None = None
        self.lio_partial = False  # lio_error names objects that failed; the rest was configured
        self.stopping = False
        self.make_vdisk: MakeVDisk | None = None  # these two are set where the controller is in this process
        self.deleted: Deleted | None = None
        self.adopting: set[str] = set()  # names of vdisks being made for storage objects made in targetcli
        if self.frontend == "lio":
            self.tcmu = TcmuHandler(self._disk_for_config, io_stats, self._adopt, self._lio_changed)
            self.lio = LioConfig(target_name, portals or [], open_access)

    async def handle(self, message: Command | Config) -> Response:
        """A request from the controller: a Command for the agent's tables, or a new Config."""
        if isinstance(message, Config):
            await self.configure(message)
            return Response()
        if isinstance(message, Command):
            if message.op is Op.DELETE_TABLE and message.vdisk in self.disks:
                self.disks.pop(message.vdisk).retired = True  # before a table of the same id can come
            if message.op is Op.ATTACH_CONTAINER and self.storage is not None:
                try:  # found by its label here, not where the controller has it
                    message = replace(message, path=self.storage.locate(message.container, message.uuid, message.store))
                except ContainerError as exc:
                    return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=str(exc))
            return await self.agent.handle(message)
        return Response(Action.FAIL, reason=Reason.BAD_COMMAND, message=f"a gateway does not take {type(message).__name__}")

    async def start(self) -> None:
        if self.iscsi is not None:
            await self.iscsi.start()
        if self.tcmu is not None:
            await self.tcmu.start()
            self._lio_changed()
            await self.settled()
            if self.lio_error is not None and not self.lio_partial:
                raise FrontendUnavailable(f"cannot configure LIO: {self.lio_error}")

    def vdisk_name(self, vdisk_id: int) -> str | None:
        """The name of a vdisk this gateway serves (for its metrics)."""
        vdisk = self.view.vdisks.get(vdisk_id)
        return vdisk.name if vdisk is not None else None

    def census(self) -> tuple[SessionInfo, ...]:
        """The iSCSI sessions here (discovery ones aside), for the controller (`san session list`, `san host show`)."""
        found = []
        for session in self.target.sessions.values():
            if not session.initiator or session.discovery:
                continue
            connection = session.connection
            header, data = connection.digests if connection is not None else (False, False)
            address = ""
            if connection is not None:
                address = (
                    f"[{connection.peer}]:{connection.peer_port}"
                    if ":" in connection.peer
                    else f"{connection.peer}:{connection.peer_port}"
                )
            luns = tuple(sorted(session.view.luns))
            found.append(SessionInfo(session.initiator, address, session.isid.hex(), session.tsih, header, data, luns))
        return tuple(found)

    def registered(self) -> None:
        """A new registration: the next Config is taken whatever its version (the controller may have restarted)."""
        self.view.version = 0

    async def configure(self, config: Config) -> None:
        """Serve what the new Config says: units of vdisks that went away are dropped, grown ones raise CAPACITY
        DATA HAS CHANGED, a pool past its threshold raises the soft-threshold attention once; then the frontend
        follows (LIO is reconciled before this returns). A Config older than the one held is ignored."""
        if config.version <= self.view.version:
            return
        self.view = View.of(config)
        for vdisk_id, disk in list(self.disks.items()):
            vdisk = self.view.vdisks.get(vdisk_id)
            if vdisk is None or vdisk.serial != disk.unit.serial:  # gone, or its id taken by a new vdisk
                del self.disks[vdisk_id]
                disk.retired = True
                continue
            if vdisk.nblocks != disk.unit.nblocks:
                disk.unit.nblocks = vdisk.nblocks
                disk.raise_attention(UnitAttention.CAPACITY_CHANGED)
            above = vdisk.pool_id in self.view.above_threshold
            if above != disk.over_threshold:
                disk.threshold(above)
        self.target.refresh()
        if self.tcmu is not None:
            self.tcmu.refresh()
        self._lio_changed()
        await self.settled()

    def disk(self, vdisk: VDisk) -> Disk:
        """The SCSI unit of a vdisk (one per vdisk, shared by every session that sees it)."""
        disk = self.disks.get(vdisk.id)
        if disk is None:
            unit = UnitInfo(vdisk.serial, vdisk.block_size, vdisk.nblocks, vdisk.thin, ndob=self.frontend != "lio")
            disk = self.disks[vdisk.id] = Disk(vdisk.id, self.agent, unit, (self.target.name, 1))
            disk.over_threshold = vdisk.pool_id in self.view.above_threshold
        return disk

    def _disk_for_config(self, obj: str, config: str) -> Disk | None:
        """The SCSI unit a TCMU device serves, if its vdisk is ready: the one its config (`<vdisk id>`) names, or for
        a storage object made in targetcli the vdisk its cfgstring is bound to (by id and serial); one not bound yet
        (made by an earlier san, or bound when san stopped) gets the vdisk of its name that nothing serves, and the
        reconcile binds it."""
        if cfgstring.is_vdisk_id(config):
            vdisk = self.view.vdisks.get(int(config))
            return self.disk(vdisk) if vdisk is not None else None
        try:
            binding = cfgstring.parse(config).binding
        except cfgstring.CfgStringError:
            return None
        if binding is not None:
            return self._bound(binding)
        named = next((v for v in self.view.vdisks.values() if v.name == obj), None)
        if named is None or (self.tcmu is not None and self.tcmu.serving(named.id)):
            return None
        return self.disk(named)

    def _bound(self, binding: tuple[int, str]) -> Disk | None:
        vdisk = self.view.vdisks.get(binding[0])
        return self.disk(vdisk) if vdisk is not None and vdisk.serial == binding[1] else None

    async def _adopt(self, obj: str, config: str, size: int, block_size: int) -> Disk:
        """A storage object made in targetcli (`/backstores/user:san create name=vm1 size=10G cfgstring=pool=fast`):
        a thin vdisk of its name, size and block size is made in the cfgstring's pool, and served once it is here;
        one whose cfgstring is bound (restored by targetcli) serves its vdisk again."""
        try:
            wanted = cfgstring.parse(config)
        except cfgstring.CfgStringError as exc:
            raise AdoptRefused(str(exc)) from None
        if wanted.binding is not None:
            return self._rebind(wanted.binding)
        if self.make_vdisk is None:
            raise AdoptRefused("this gateway has no controller in its process: make the vdisk with `san vdisk create`")
        pool = wanted.pool
        if any(v.name == obj for v in self.view.vdisks.values()) or obj in self.adopting:
            raise AdoptRefused(f"vdisk {obj!r} exists (san exports it as user:{cfgstring.SUBTYPE}/{obj})", errno.EEXIST)
        self.adopting.add(obj)
        try:
            try:  # shielded: a create cancelled half-way (san stopping) would leave the store and the controller apart
                vdisk = await asyncio.shield(self.make_vdisk(obj, pool, size, block_size))
            except SanError as exc:
                raise AdoptRefused(str(exc)) from None
            deadline = time.monotonic() + VIEW_WAIT
            while (here := self.view.vdisks.get(vdisk.id)) is None or here.serial != vdisk.serial:
                if time.monotonic() > deadline:
                    raise AdoptRefused(
                        f"vdisk {obj!r} was made but did not reach this gateway; `san vdisk delete {obj}` removes it",
                        errno.ETIMEDOUT,
                    )
                await asyncio.sleep(0.01)
        finally:
            self.adopting.discard(obj)
        log.info("vdisk %s (%d bytes) made in pool %s for user:%s/%s", obj, size, pool, cfgstring.SUBTYPE, obj)
        return self.disk(here)

    def _rebind(self, binding: tuple[int, str]) -> Disk:
        """The unit for a storage object whose cfgstring names its vdisk: refused when that vdisk is not here or a
        device serves it already."""
        disk = self._bound(binding)
        if disk is None:
            raise AdoptRefused(f"vdisk {binding[0]} (serial {binding[1]}) is not here: deleted, or not ready", errno.ENOENT)
        if self.tcmu is not None and self.tcmu.serving(binding[0]):
            raise AdoptRefused(f"vdisk {binding[0]} is served by another storage object", errno.EEXIST)
        return disk

    def access(self, initiator: str) -> Access | None:
        """What an initiator may see: its host's zones; for an unknown initiator, nothing, or with open access (demo
        mode) every ready vdisk, in creation order."""
        view = self.view
        host = view.by_iqn(initiator)
        if host is not None:
            luns = {z.lun: Zoned(self.disk(view.vdisks[z.vdisk_id]), z.read_only) for z in view.zones_of(host)}
            credentials = Credentials(host.chap_user, host.chap_secret, host.mutual_user, host.mutual_secret)
            return Access(luns, credentials if host.chap_user else None)
        if not self.open_access:
            return None
        ready = sorted((v for v in view.vdisks.values() if not v.origin), key=lambda v: v.id)  # snapshots: zoned only
        return Access({lun: Zoned(self.disk(v)) for lun, v in enumerate(ready)})

    # -- LIO -----------------------------------------------------------------------------------------------

    def _lio_changed(self) -> None:
        """LIO must follow the view: reconcile it in the LIO thread (one run at a time, again if needed)."""
        if self.lio is None or self.stopping:
            return
        self.lio_dirty = True
        if self.lio_job is None or self.lio_job.done():
            self.lio_job = asyncio.ensure_future(self._reconcile())

    async def _reconcile(self) -> None:
        """Reconcile until LIO shows the latest view; a failed run is tried again (targetcli may be changing configfs
        under it: deleting an object's last sibling removes their HBA), LIO_TRIES times in all."""
        assert self.lio is not None
        loop = asyncio.get_running_loop()
        failures = 0
        while self.lio_dirty:
            self.lio_dirty = False
            view = self.view
            wanted = Wanted(
                [copy.copy(v) for v in view.vdisks.values()],
                [copy.copy(h) for h in view.hosts.values()],
                [copy.copy(z) for z in view.zones if z.vdisk_id in view.vdisks],
                self.tcmu.adopted() if self.tcmu is not None else Served(),
                set(self.adopting),
                self.deleted() if self.deleted is not None else set(),
            )
            try:
                await loop.run_in_executor(self.lio_thread, self.lio.reconcile, wanted)
                self.lio_error = None
                failures = 0
                continue
            except (LioError, RTSLibError, OSError) as exc:
                self.lio_error = str(exc)
                self.lio_partial = isinstance(exc, LioError)
            except Exception as exc:  # rtslib on a configfs it did not expect: keep serving, say what happened
                log.debug("LIO configuration failed", exc_info=True)
                self.lio_error = f"{type(exc).__name__}: {exc}"
                self.lio_partial = False
            failures += 1
            if failures < LIO_TRIES and not self.stopping:
                log.warning("LIO configuration failed (%s); trying again", self.lio_error)
                await asyncio.sleep(LIO_RETRY)
                self.lio_dirty = True
            else:
                log.error("LIO configuration failed: %s", self.lio_error)
                failures = 0

    async def settled(self) -> None:
        """Wait until LIO shows the latest change (at once with the built-in frontend)."""
        while self.lio_job is not None and not self.lio_job.done():
            await asyncio.shield(self.lio_job)

    async def stop(self) -> None:
        """Stop serving: the frontend goes, then what was written is flushed (through the controller)."""
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
        try:
            await self.agent.flush()
        except AgentIOError as exc:
            log.error("the last flush failed: %s", exc)

    def close(self) -> None:
        self.agent.close()
