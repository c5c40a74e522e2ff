"""The management API: pools, vdisks, hosts, zones and status as HTTP/JSON resources, with /openapi.json generated.

Every request but /openapi.json needs the API token (auth.py); bodies are bounded (limits.py). Bad input gets a 4xx
answer {"error": "..."} that says what is wrong, and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

import san
from san.api.auth import BearerAuth
from san.api.bodies import (
    HostCreate,
    HostModify,
    PoolCreate,
    SnapshotCreate,
    VDiskCreate,
    VDiskGrow,
    VDiskRename,
    ZoneCreate,
    ZoneModify,
    size_of,
)
from san.api.limits import BodyLimit
from san.controller.controller import Controller
from san.errors import SanError
from san.metrics.endpoint import metrics_response
from san.model import Host, Pool, VDisk, Zone
from san.protocol.messages import SessionInfo


class Managed(Protocol):
    """What the API serves: `san serve`'s Service or `san controller`'s ControllerService."""

    @property
    def controller(self) -> Controller: ...

    @property
    def data_dir(self) -> str: ...

    async def settled(self) -> None: ...

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> object: ...

    def sessions(self, iqn: str) -> int | None: ...

    def iscsi_sessions(self) -> list[tuple[str, SessionInfo]]: ...

    def frontend_info(self) -> dict[str, Any]: ...


def create_app(
    service: Managed, token: str, metrics: CollectorRegistry | None = None, metrics_token: str | None = None
) -> FastAPI:
    """The FastAPI application serving one service; token is the bearer token every request must carry. With a
    metrics registry, GET /metrics serves it to Prometheus, with the token or with metrics_token (good for nothing
    else)."""
    controller = service.controller
    app = FastAPI(title="san management API", version=san.__version__, docs_url=None, redoc_url=None)
    started = time.time()

    @app.middleware("http")
    async def frontend_follows(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """A change is answered once the frontend shows it (LIO is reconfigured in the background)."""
        response = await call_next(request)
        if request.method != "GET":
            await service.settled()
        return response

    app.add_middleware(BodyLimit)
    app.add_middleware(
        BearerAuth, token=token, metrics_token=metrics_token if metrics is not None else None
    )  # added last: the outermost, before anything else looks at a request

    @app.exception_handler(SanError)
    async def san_error(_: Request, exc: SanError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"] if part != "body")
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        return JSONResponse({"error": "; ".join(problems)[:1000]}, status_code=400)

    def pool_json(pool: Pool) -> dict[str, Any]:
        usage = controller.usage(pool)
        return {
            **pool.to_dict(),
            "state": "offline" if pool.id in controller.offline else "online",
            "problem": controller.offline.get(pool.id, ""),
            "capacity_bytes": usage.capacity_bytes,
            "used_bytes": usage.used_bytes,
            "free_bytes": usage.free_bytes,
            "provisioned_bytes": usage.provisioned_bytes,
            "used_percent": usage.used_percent,
            "vdisks": sum(1 for v in controller.vdisks.values() if v.pool_id == pool.id and not v.origin),
            "containers": [
                {**c.public(), "path": controller.containers.paths.get(c.id) or controller.pool_manager.resolve(c.path)}
                for c in controller.pool_containers(pool)
            ],
        }

    def vdisk_json(vdisk: VDisk) -> dict[str, Any]:
        origin = controller.vdisks.get(vdisk.origin)
        return {
            **vdisk.to_dict(),
            "state": controller.vdisk_state(vdisk),
            "pool": controller.pools[vdisk.pool_id].name,
            "allocated_bytes": controller.allocated_bytes(vdisk),
            "progress": controller.progress.get(vdisk.id, 1.0),
            "snapshot_of": origin.name if origin is not None else None,
            "snapshots": [s.name for s in controller.snapshots.of(vdisk)],
        }

    if metrics is not None:

        @app.get("/metrics", include_in_schema=False)
        async def prometheus_metrics(request: Request) -> Response:
            return metrics_response(metrics, request)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {
            "version": san.__version__,
            "data_dir": service.data_dir,
            "uptime_seconds": round(time.time() - started, 1),
            "pools": len(controller.pools),
            "pools_offline": len(controller.offline),
            "vdisks": sum(1 for v in controller.vdisks.values() if not v.origin),
            "snapshots": sum(1 for v in controller.vdisks.values() if v.origin),
            "agents": len(controller.agents),
            "hosts": len(zoning.hosts),
            "zones": len(zoning.zones),
            "gateways": [s.name for s in controller.agents.sessions],
            "sessions": len(service.iscsi_sessions()),
            **service.frontend_info(),
        }

    @app.get("/sessions")
    async def list_sessions() -> list[dict[str, Any]]:
        """Every iSCSI session on every gateway (as of each one's last heartbeat), with the host it logged in as."""
        hosts = {h.iqn: h.name for h in zoning.hosts.values()}
        found = [{"gateway": gateway, "host": hosts.get(info.initiator), **asdict(info), "luns": list(info.luns)}
                 for gateway, info in service.iscsi_sessions()]  # fmt: skip
        return sorted(found, key=lambda s: (s["initiator"], s["gateway"], s["tsih"]))

    @app.get("/gateways")
    async def list_gateways() -> list[dict[str, Any]]:
        """The registered gateways: lease left (null: in-process, no lease), fenced or not, sessions per initiator."""
        now = time.monotonic()
        return [
            {
                "name": session.name,
                "epoch": session.epoch,
                "state": "fenced" if session.fenced else ("serving" if session.joined.is_set() else "joining"),
                "lease_seconds": None if session.lease == float("inf") else round(max(session.expires - now, 0.0), 1),
                "registrations": controller.agents.registrations[session.name],
                "sessions": dict(session.hosts),
            }
            for session in controller.agents.sessions
        ]

    @app.get("/pools")
    async def list_pools() -> list[dict[str, Any]]:
        return [pool_json(p) for p in sorted(controller.pools.values(), key=lambda p: p.name)]

    @app.post("/pools", status_code=201)
    async def create_pool(body: PoolCreate) -> dict[str, Any]:
        pool = await controller.create_pool(
            body.name,
            size_of(body.size),
            body.path,
            size_of(body.segment_size),
            body.warn_percent,
            body.allocate_ahead,
            body.existing,
        )
        return pool_json(pool)

    @app.get("/pools/{name}")
    async def show_pool(name: str) -> dict[str, Any]:
        return pool_json(controller.pool(name))

    @app.delete("/pools/{name}", status_code=204)
    async def delete_pool(name: str) -> None:
        await controller.delete_pool(name)

    @app.get("/vdisks")
    async def list_vdisks() -> list[dict[str, Any]]:
        """The vdisks (not their snapshots: /snapshots, /vdisks/{name}/snapshots)."""
        return [vdisk_json(v) for v in sorted(controller.vdisks.values(), key=lambda v: v.name) if not v.origin]

    @app.get("/snapshots")
    async def list_snapshots() -> list[dict[str, Any]]:
        """Every snapshot, by vdisk, oldest first."""
        live = sorted((v for v in controller.vdisks.values() if not v.origin), key=lambda v: v.name)
        return [vdisk_json(s) for v in live for s in controller.snapshots.of(v)]

    @app.get("/vdisks/{name}/snapshots")
    async def list_vdisk_snapshots(name: str) -> list[dict[str, Any]]:
        return [vdisk_json(s) for s in controller.snapshots.of(controller.vdisk(name))]

    @app.post("/vdisks/{name}/snapshots", status_code=201)
    async def create_snapshot(name: str, body: SnapshotCreate) -> dict[str, Any]:
        """Snapshot NAME@{body.name}: a point-in-time, read-only image of the vdisk (every write acknowledged
        before the request is in it, none that starts after)."""
        return vdisk_json(await controller.snapshots.create(f"{name}@{body.name}"))

    @app.delete("/vdisks/{name}/snapshots/{snapshot}", status_code=204)
    async def delete_snapshot(name: str, snapshot: str) -> None:
        await controller.snapshots.delete(f"{name}@{snapshot}")

    @app.post("/vdisks", status_code=201)
    async def create_vdisk(body: VDiskCreate) -> JSONResponse:
        size = size_of(body.size)
        assert size is not None
        vdisk = await controller.create_vdisk(body.name, body.pool, size, not body.thick, body.block_size)
        if vdisk.state == "allocating":
            service.spawn(controller.finish_thick(vdisk))
            return JSONResponse(vdisk_json(vdisk), status_code=202)
        return JSONResponse(vdisk_json(vdisk), status_code=201)

    @app.get("/vdisks/{name}")
    async def show_vdisk(name: str) -> dict[str, Any]:
        return vdisk_json(controller.vdisk(name))

    @app.post("/vdisks/{name}/grow")
    async def grow_vdisk(name: str, body: VDiskGrow) -> dict[str, Any]:
        size = size_of(body.size)
        assert size is not None
        return vdisk_json(await controller.grow_vdisk(name, size))

    @app.delete("/vdisks/{name}", status_code=204)
    async def delete_vdisk(name: str) -> None:
        await controller.delete_vdisk(name)

    zoning = controller.zoning

    def zone_json(zone: Zone) -> dict[str, Any]:
        return {
            "host": zoning.hosts[zone.host_id].name,
            "vdisk": controller.vdisks[zone.vdisk_id].name,
            "lun": zone.lun,
            "read_only": zone.read_only,
        }

    def host_json(host: Host) -> dict[str, Any]:
        zones = sorted((zone_json(z) for z in zoning.zones_of(host)), key=lambda z: z["lun"])
        return {**host.to_dict(), "zones": zones, "sessions": service.sessions(host.iqn)}

    @app.get("/hosts")
    async def list_hosts(secrets: bool = False) -> list[dict[str, Any]]:
        """Every host; with secrets=true their CHAP secrets too (for `san config export --with-secrets`)."""
        shown = [host_json(h) for h in sorted(zoning.hosts.values(), key=lambda h: h.name)]
        if secrets:
            for entry in shown:
                host = zoning.host(entry["name"])
                entry.update(chap_secret=host.chap_secret, mutual_secret=host.mutual_secret)
        return shown

    @app.post("/hosts", status_code=201)
    async def create_host(body: HostCreate) -> dict[str, Any]:
        chap, mutual = (body.chap_user, body.chap_secret), (body.mutual_user, body.mutual_secret)
        host = host_json(await zoning.create_host(body.name, body.iqn, chap, mutual))
        warnings = [] if body.chap_user else ["this host has no CHAP: any initiator that claims its iSCSI name logs in as it"]
        return {**host, "warnings": warnings}

    @app.get("/hosts/{name}")
    async def show_host(name: str) -> dict[str, Any]:
        return host_json(zoning.host(name))

    @app.delete("/hosts/{name}", status_code=204)
    async def delete_host(name: str) -> None:
        await zoning.delete_host(name)

    @app.get("/zones")
    async def list_zones() -> list[dict[str, Any]]:
        return sorted((zone_json(z) for z in zoning.zones), key=lambda z: (z["host"], z["lun"]))

    @app.post("/zones", status_code=201)
    async def add_zone(body: ZoneCreate) -> dict[str, Any]:
        return zone_json(await zoning.add(body.host, body.vdisk, body.lun, body.read_only))

    @app.delete("/zones/{host}/{vdisk}", status_code=204)
    async def remove_zone(host: str, vdisk: str) -> None:
        await zoning.remove(host, vdisk)

    @app.patch("/zones/{host}/{vdisk}")
    async def modify_zone(host: str, vdisk: str, body: ZoneModify) -> dict[str, Any]:
        return zone_json(await zoning.modify(host, vdisk, body.lun, body.read_only))

    @app.patch("/hosts/{name}")
    async def modify_host(name: str, body: HostModify) -> dict[str, Any]:
        current = zoning.host(name)

        def pair(user: str | None, secret: str | None, old: tuple[str, str]) -> tuple[str, str] | None:
            if user is None and secret is None:
                return None
            user = old[0] if user is None else user
            return (user, "") if not user else (user, old[1] if secret is None else secret)

        chap = pair(body.chap_user, body.chap_secret, (current.chap_user, current.chap_secret))
        mutual = pair(body.mutual_user, body.mutual_secret, (current.mutual_user, current.mutual_secret))
        return host_json(await zoning.modify_host(name, body.iqn, chap, mutual))

    @app.post("/vdisks/{name}/rename")
    async def rename_vdisk(name: str, body: VDiskRename) -> dict[str, Any]:
        return vdisk_json(await controller.rename_vdisk(name, body.name))

    return app
