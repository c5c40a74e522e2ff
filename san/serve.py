"""`san serve`: start the embedded service and the management API on one asyncio loop, stop cleanly.

SIGTERM and SIGINT commit metadata and flush containers before the process exits."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import uvicorn

from san.api.app import create_app
from san.service import DataDirLocked, FrontendUnavailable, Service

log = logging.getLogger("san")


async def serve(
    data_dir: str,
    host: str,
    port: int,
    commit_interval: float = 1.0,
    portals: list[tuple[str, int]] | None = None,
    target_name: str = "",
    open_access: bool = False,
    frontend: str = "iscsi",
    on_ready: Callable[[Service], Awaitable[None]] | None = None,
) -> int:
    """Run until a signal; 0 on a clean stop, 1 if the service could not start. on_ready runs once it serves."""
    try:
        service = Service(
            data_dir, commit_interval, portals=portals, target_name=target_name, open_access=open_access, frontend=frontend
        )
    except (DataDirLocked, FrontendUnavailable, OSError) as exc:
        log.error("%s", exc)
        return 1
    try:
        await service.start()
    except FrontendUnavailable as exc:
        log.error("%s", exc)
        await service.stop()
        return 1
    except OSError as exc:
        log.error("cannot listen for iSCSI on %s: %s", portals, exc)
        await service.stop()
        return 1
    if service.iscsi is not None or service.lio is not None:
        shown = ", ".join(f"{h}:{p}" for h, p in service.target.portals)
        note = " (open access: every initiator sees every vdisk)" if open_access else ""
        how = "LIO with san's TCMU handler" if service.lio is not None else "built-in"
        log.info("iSCSI target %s on %s (%s)%s", target_name, shown, how, note)
    if on_ready is not None:
        try:
            await on_ready(service)
        except Exception as exc:
            log.error("%s", exc)
            await service.stop()
            return 1
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        # uvicorn restores these after serving and re-raises the signal it caught: it must land here, not kill us.
        signal.signal(signum, lambda *_: setattr(server, "should_exit", True))
    log.info("san serving data %s, management API on http://%s:%d", service.data_dir, host, port)
    try:
        await server.serve()
    except SystemExit:
        pass
    finally:
        await service.stop()
    if not server.started:
        log.error("management API could not listen on %s:%d", host, port)
        return 1
    log.info("san stopped cleanly")
    return 0
