"""The embedded process (`san serve`): the controller service and one gateway, joined by the in-process link.

The same classes run apart in `san controller` and `san gateway`; here the link is a direct call each way, or, with
network= a cluster directory, the real mutual-TLS link on 127.0.0.1 (so every message goes through the codec)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from san.agent.agent import Agent
from san.cluster.pki import Cluster
from san.controller.controller import Controller
from san.controller.listener import AgentListener
from san.controller.service import ControllerService
from san.datadir import DB_NAME, DataDir, DataDirLocked, DataDirUnsafe, StoreRefused
from san.errors import SanError
from san.gateway.service import FrontendUnavailable, Gateway, resolve_frontend
from san.gateway.session import ControllerSession
from san.iscsi.server import IscsiServer, Limits
from san.iscsi.target import Access, Target
from san.lio import cfgstring
from san.lio.config import LioConfig
from san.lio.dbus import TcmuService
from san.lio.handler import TcmuHandler
from san.metrics.collectors import ControllerCollector, GatewayCollector
from san.metrics.endpoint import registry_of
from san.model import VDisk
from san.protocol.messages import SessionInfo
from san.protocol.transport import ControllerLink, LocalAgentLink, LocalControllerLink
from san.scsi.disk import Disk

LOCAL_AGENT = "local"
NETWORK_CONTROLLER = "controller"
NETWORK_LEASE = 10.0
__all__ = ["DB_NAME", "LOCAL_AGENT", "DataDirLocked", "DataDirUnsafe", "FrontendUnavailable", "Service", "StoreRefused"]


class Service:
    """Controller service + gateway in one process; start() before use, stop() to flush, commit and close."""

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
        network: str | None = None,
        io_stats: bool = True,
    ) -> None:
        frontend = resolve_frontend(frontend)  # before the data directory is taken
        self.controller_service = ControllerService(data_dir, commit_interval, reserve_segments, allow_paths)
        self.listener: AgentListener | None = None
        self.session: ControllerSession | None = None
        self.running: asyncio.Future[None] | None = None
        link: ControllerLink = LocalControllerLink(self.controller_service.controller, LOCAL_AGENT)
        if network is not None:
            cluster = Cluster.init(network, [NETWORK_CONTROLLER, LOCAL_AGENT])
            self.listener = AgentListener(self.controller_service, cluster, NETWORK_CONTROLLER, NETWORK_LEASE)
            link = self.session = ControllerSession(cluster, LOCAL_AGENT, [])
        self.gateway = Gateway(link, portals, target_name, open_access, frontend, limits, io_stats=io_stats)
        self.gateway.make_vdisk = self._make_vdisk
        self.gateway.deleted = lambda: set(self.controller.deleted_serials)
        self.dbus = TcmuService(self._check_cfgstring) if frontend == "lio" else None

    @property
    def controller(self) -> Controller:
        return self.controller_service.controller

    @property
    def agent(self) -> Agent:
        return self.gateway.agent

    @property
    def data_dir(self) -> str:
        return self.controller_service.data_dir

    @property
    def data(self) -> DataDir:
        return self.controller_service.data

    @property
    def frontend(self) -> str:
        return self.gateway.frontend

    @property
    def target(self) -> Target:
        return self.gateway.target

    @property
    def iscsi(self) -> IscsiServer | None:
        return self.gateway.iscsi

    @property
    def tcmu(self) -> TcmuHandler | None:
        return self.gateway.tcmu

    @property
    def lio(self) -> LioConfig | None:
        return self.gateway.lio

    def disk(self, vdisk: VDisk) -> Disk:
        return self.gateway.disk(vdisk)

    def access(self, initiator: str) -> Access | None:
        return self.gateway.access(initiator)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> object:
        return self.controller_service.spawn(coroutine)

    def sessions(self, iqn: str) -> int | None:
        """The host's iSCSI sessions on this process's target."""
        return sum(1 for s in self.target.sessions.values() if s.initiator == iqn)

    def iscsi_sessions(self) -> list[tuple[str, SessionInfo]]:
        """The sessions of this process's target, as gateway "local"."""
        return [(LOCAL_AGENT, info) for info in self.gateway.census()]

    def frontend_info(self) -> dict[str, Any]:
        """What `san status` shows of the frontend: the target's name, its portals, built-in iSCSI or LIO."""
        portals = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.target.portals]
        return {"target": self.target.name, "portals": portals, "frontend": self.frontend}

    def metrics(self) -> CollectorRegistry:
        """What /metrics serves: the controller's figures and this process's gateway's."""
        controller = self.controller

        def name(vdisk_id: int) -> str | None:
            vdisk = controller.vdisks.get(vdisk_id)
            return vdisk.name if vdisk is not None else None

        return registry_of(ControllerCollector(controller, self.sessions), GatewayCollector(self.agent, name, self.target))

    async def start(self) -> None:
        await self.controller_service.start()
        if self.listener is None or self.session is None:
            session = self.controller.agents.register(LOCAL_AGENT, LocalAgentLink(self.gateway))
            await self.controller_service.add_agent(session)
        else:
            await self.listener.start("127.0.0.1", 0)
            self.session.controllers = [("127.0.0.1", self.listener.port)]
            self.session.attach(self.gateway.agent, self.gateway.handle, self.gateway.registered, self.gateway.census)
            self.running = asyncio.ensure_future(self.session.run())
            await self.session.ready.wait()
            while not self.gateway.view.version:  # the Config comes last when an agent is added
                await asyncio.sleep(0.01)
        await self.gateway.start()
        if self.dbus is not None:
            await self.dbus.start()

    async def _make_vdisk(self, name: str, pool: str, size: int, block_size: int) -> VDisk:
        """A thin vdisk for a storage object made in targetcli."""
        return await self.controller.create_vdisk(name, pool, size, True, block_size)

    def _check_cfgstring(self, config: str) -> str | None:
        """Why targetcli may not make a user:san storage object with this cfgstring (None: it may)."""
        try:
            wanted = cfgstring.parse(config)
            pool = self.controller.pool(wanted.pool)
            self.controller.pool_manager.require_online(pool)
        except (cfgstring.CfgStringError, SanError) as exc:
            return str(exc)
        if wanted.binding is not None:
            vdisk = self.controller.vdisks.get(wanted.binding[0])
            if vdisk is None or vdisk.serial != wanted.binding[1]:
                return f"no vdisk {wanted.binding[0]} with serial {wanted.binding[1]}"
        return None

    async def settled(self) -> None:
        """Wait until the gateway has the latest configuration and its frontend shows it."""
        await self.controller_service.settled()
        await self.gateway.settled()

    async def stop(self) -> None:
        if self.dbus is not None:
            await self.dbus.stop()
        await self.gateway.stop()
        if self.session is not None and self.running is not None:
            self.session.stop()
            self.running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.running
        if self.listener is not None:
            await self.listener.stop()
        await self.controller_service.stop()
        self.gateway.close()
