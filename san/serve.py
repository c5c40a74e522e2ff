"""`san serve`: start the embedded service and the management API on one asyncio loop, stop cleanly.

SIGTERM and SIGINT commit metadata and flush containers before the process exits. Files are created 0600 (umask),
the descriptor limit is raised, and the API needs its token (TLS as well beyond loopback)."""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from san.api.app import create_app
from san.api.auth import METRICS_TOKEN, AuthSetupError, check_listen, load_token
from san.api.limits import MAX_CONNECTIONS
from san.api.server import check_free, run_api, tls_context
from san.iscsi.server import Limits
from san.service import DataDirLocked, DataDirUnsafe, FrontendUnavailable, Service, StoreRefused
from san.storage.paths import check_trusted

log = logging.getLogger("san")
API_FDS = MAX_CONNECTIONS + 256  # descriptors kept for the API, the store and the containers, whatever iSCSI does


@dataclass
class Options:
    """What `san serve` (and `san demo`) is told."""

    data_dir: str
    api: tuple[str, int] = ("127.0.0.1", 8080)
    commit_interval: float = 1.0
    portals: list[tuple[str, int]] = field(default_factory=list)
    target_name: str = ""
    open_access: bool = False
    frontend: str = "iscsi"
    allow_paths: tuple[str, ...] = ()
    api_cert: str | None = None
    api_key: str | None = None
    api_token_file: str | None = None
    limits: Limits = field(default_factory=Limits)
    metrics: bool = True  # /metrics on the API, and each command counted in its vdisk's I/O statistics


def raise_fd_limit(limits: Limits) -> Limits:
    """Raise the soft descriptor limit to the hard one; cap iSCSI connections so API_FDS always stay free."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    room = max(soft - API_FDS, 16)
    if limits.total > room:
        log.warning("at most %d iSCSI connections (the descriptor limit is %d)", room, soft)
        return Limits(room, min(limits.per_address, room))
    return limits


async def serve(options: Options, on_ready: Callable[[Service], Awaitable[None]] | None = None) -> int:
    """Run until a signal; 0 on a clean stop, 1 if the service could not start. on_ready runs once it serves."""
    os.umask(0o077)
    host, port = options.api
    try:
        context = tls_context(options.api_cert, options.api_key)
        check_listen(host, context is not None)
        check_free(host, port)
    except AuthSetupError as exc:
        log.error("%s", exc)
        return 1
    for allowed in options.allow_paths:
        try:
            check_trusted(allowed, "/")
        except OSError as exc:
            log.error("--allow-path %s: %s", allowed, exc.strerror or exc)
            return 1
    limits = raise_fd_limit(options.limits)
    try:
        service = Service(
            options.data_dir,
            options.commit_interval,
            portals=options.portals,
            target_name=options.target_name,
            open_access=options.open_access,
            frontend=options.frontend,
            allow_paths=options.allow_paths,
            limits=limits,
            io_stats=options.metrics,
        )
    except (DataDirLocked, DataDirUnsafe, FrontendUnavailable, StoreRefused, OSError) as exc:
        log.error("%s", exc)
        return 1
    try:
        token = load_token(service.data_dir, options.api_token_file)
        metrics_token = load_token(service.data_dir, None, METRICS_TOKEN) if options.metrics else None
        await service.start()
    except AuthSetupError as exc:
        log.error("%s", exc)
        await service.stop()
        return 1
    except FrontendUnavailable as exc:
        log.error("%s", exc)
        await service.stop()
        return 1
    except OSError as exc:
        log.error("cannot listen for iSCSI on %s: %s", options.portals, exc)
        await service.stop()
        return 1
    if service.iscsi is not None or service.lio is not None:
        shown = ", ".join(f"{h}:{p}" for h, p in service.target.portals)
        note = " (open access: every initiator sees every vdisk)" if options.open_access else ""
        how = "LIO with san's TCMU handler" if service.lio is not None else "built-in"
        log.info("iSCSI target %s on %s (%s)%s", options.target_name, shown, how, note)
    if on_ready is not None:
        try:
            await on_ready(service)
        except Exception as exc:
            log.error("%s", exc)
            await service.stop()
            return 1
    what = f"san serving data {service.data_dir}"
    try:
        app = create_app(service, token, service.metrics() if options.metrics else None, metrics_token)
        started = await run_api(app, host, port, options.api_cert, options.api_key, token, what)
    finally:
        await service.stop()
    if not started:
        return 1
    log.info("san stopped cleanly")
    return 0
