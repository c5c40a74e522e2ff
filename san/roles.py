"""`san controller` and `san gateway`: the two halves of `san serve` as separate processes, joined by the protocol
over mutual TLS (the cluster's certificates).

The controller holds the data directory, the management API and the listener for gateways; a gateway holds an agent
and a frontend and knows only what the controller sends it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field

from san.api.app import create_app
from san.api.auth import METRICS_TOKEN, AuthSetupError, check_listen, load_token
from san.api.server import check_free, run_api, tls_context
from san.cluster.pki import Cluster, ClusterError
from san.controller.listener import AgentListener
from san.controller.service import ControllerService
from san.datadir import DataDirLocked, DataDirUnsafe, StoreRefused
from san.gateway.service import FrontendUnavailable, Gateway
from san.gateway.session import ControllerSession
from san.gateway.storage import Storage
from san.iscsi.server import Limits
from san.metrics.collectors import GatewayCollector
from san.metrics.endpoint import MetricsServer, registry_of
from san.serve import raise_fd_limit
from san.storage.paths import check_trusted

log = logging.getLogger("san")


@dataclass
class ControllerOptions:
    data_dir: str
    listen: tuple[str, int]
    cluster: str
    name: str = "controller"
    api: tuple[str, int] = ("127.0.0.1", 8080)
    lease: float = 10.0
    commit_interval: float = 1.0
    allow_paths: tuple[str, ...] = ()
    api_cert: str | None = None
    api_key: str | None = None
    api_token_file: str | None = None


@dataclass
class GatewayOptions:
    name: str
    controllers: list[tuple[str, int]]
    cluster: str
    portals: list[tuple[str, int]] = field(default_factory=list)
    target_name: str = ""
    frontend: str = "iscsi"
    suspend_timeout: float = 60.0
    limits: Limits = field(default_factory=Limits)
    storage: list[str] = field(default_factory=list)
    controller_name: str = "controller"
    direct_io: str = "auto"
    metrics: tuple[str, int] | None = None  # where to serve /metrics (None: no metrics, no I/O counting)
    metrics_cert: str | None = None
    metrics_key: str | None = None
    metrics_token_file: str | None = None


async def controller(options: ControllerOptions) -> int:
    """Run the controller until a signal; 0 on a clean stop, 1 if it could not start."""
    os.umask(0o077)
    host, port = options.api
    try:
        check_listen(host, tls_context(options.api_cert, options.api_key) is not None)
        check_free(host, port)
        cluster = Cluster.open(options.cluster)
        for allowed in options.allow_paths:
            check_trusted(allowed, "/")
        service = ControllerService(options.data_dir, options.commit_interval, allow_paths=options.allow_paths)
    except (AuthSetupError, ClusterError, DataDirLocked, DataDirUnsafe, StoreRefused, OSError) as exc:
        log.error("%s", exc)
        return 1
    listener = AgentListener(service, cluster, options.name, options.lease)
    try:
        token = load_token(service.data_dir, options.api_token_file)
        metrics_token = load_token(service.data_dir, None, METRICS_TOKEN)
        await service.start()
        await listener.start(*options.listen)
    except (AuthSetupError, ClusterError, OSError) as exc:
        log.error("%s", exc)
        await service.stop()
        return 1
    log.info("listening for gateways on %s:%d (lease %g s)", options.listen[0], listener.port, options.lease)
    what = f"san controller serving data {service.data_dir}"
    try:
        app = create_app(service, token, service.metrics(), metrics_token)
        started = await run_api(app, host, port, options.api_cert, options.api_key, token, what)
    finally:
        await listener.stop()
        await service.stop()
    if not started:
        return 1
    log.info("san controller stopped cleanly")
    return 0


async def gateway(options: GatewayOptions) -> int:
    """Run a gateway until a signal; 0 on a clean stop, 1 if it could not start."""
    os.umask(0o077)
    limits = raise_fd_limit(options.limits)
    try:
        cluster = Cluster.open(options.cluster)
        cluster.context(options.name, server=False)  # its certificate loads, or say so now
        session = ControllerSession(
            cluster, options.name, options.controllers, options.suspend_timeout, controller_names=(options.controller_name,)
        )
        storage = Storage(options.storage)
        metrics_token = None
        if options.metrics is not None:
            check_listen(options.metrics[0], tls_context(options.metrics_cert, options.metrics_key) is not None)
            metrics_token = load_token(options.cluster, options.metrics_token_file, METRICS_TOKEN)
        gw = Gateway(session, options.portals, options.target_name, False, options.frontend, limits, storage,
                     options.direct_io, io_stats=options.metrics is not None)  # fmt: skip
    except (AuthSetupError, ClusterError, FrontendUnavailable, OSError) as exc:
        log.error("%s", exc)
        return 1
    metrics: MetricsServer | None = None
    if options.metrics is not None and metrics_token is not None:
        registry = registry_of(GatewayCollector(gw.agent, gw.vdisk_name, gw.target, session))
        metrics = MetricsServer(registry, *options.metrics, metrics_token, options.metrics_cert, options.metrics_key)
    session.attach(gw.agent, gw.handle, gw.registered, gw.census)
    running = asyncio.ensure_future(session.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gw.start()
    except (FrontendUnavailable, OSError) as exc:
        log.error("cannot serve iSCSI on %s: %s", options.portals, exc)
        session.stop()
        running.cancel()
        return 1
    if metrics is not None:
        try:
            await metrics.start()
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", metrics.host, metrics.port, exc.strerror or exc)
            await gw.stop()
            session.stop()
            running.cancel()
            gw.close()
            return 1
    shown = ", ".join(f"{h}:{p}" for h, p in gw.target.portals)
    log.info("gateway %s: iSCSI target %s on %s, controller %s", options.name, options.target_name, shown, options.controllers)
    try:
        await stop.wait()
    finally:
        if metrics is not None:
            await metrics.stop()
        await gw.stop()
        session.stop()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        gw.close()
    log.info("gateway %s stopped cleanly", options.name)
    return 0
