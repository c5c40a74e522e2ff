"""The management API: pools, vdisks, hosts, zones and status as HTTP/JSON resources, with /openapi.json generated.

Bad input gets a 4xx answer {"error": "..."} that says what is wrong, and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

import san
from san.errors import InvalidRequest, SanError
from san.model import (
    DEFAULT_ALLOCATE_AHEAD,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SEGMENT_SIZE,
    DEFAULT_WARN_PERCENT,
    Host,
    Pool,
    VDisk,
    Zone,
)
from san.service import Service
from san.units import parse_size


def _size(value: int | str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


class PoolCreate(BaseModel):
    """POST /pools: a pool on a new sparse file (size) or an existing file or block device (path)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    size: int | str | None = Field(None, description="bytes, or a size like 100G")
    path: str | None = Field(None, description="file or block device; default: <data>/pools/<name>.img")
    segment_size: int | str = Field(DEFAULT_SEGMENT_SIZE, description="power of two from 64K to 1G")
    warn_percent: int = DEFAULT_WARN_PERCENT
    allocate_ahead: int = DEFAULT_ALLOCATE_AHEAD


class VDiskCreate(BaseModel):
    """POST /vdisks: thin by default; thick allocates every segment (answer 202 while that runs)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    pool: str
    size: int | str
    thick: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in (512, 4096):
            raise ValueError("must be 512 or 4096")
        return value


class VDiskGrow(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    size: int | str


class HostCreate(BaseModel):
    """POST /hosts: an initiator by iSCSI name; CHAP credentials make it prove who it is."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    iqn: str
    chap_user: str = ""
    chap_secret: str = ""
    mutual_user: str = ""
    mutual_secret: str = ""


class ZoneCreate(BaseModel):
    """POST /zones: let a host see a vdisk, at a LUN (default the lowest free one), maybe read-only."""

    model_config = ConfigDict(extra="forbid", strict=True)
    host: str
    vdisk: str
    lun: int | None = None
    read_only: bool = False


def create_app(service: Service) -> FastAPI:
    """The FastAPI application serving one Service."""
    controller = service.controller
    app = FastAPI(title="san management API", version=san.__version__)
    started = time.time()

    @app.middleware("http")
    async def frontend_follows(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """A change is answered once the frontend shows it (LIO is reconfigured in the background)."""
        response = await call_next(request)
        if request.method != "GET":
            await service.settled()
        return response

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
        return JSONResponse({"error": "; ".join(problems)}, status_code=400)

    def pool_json(pool: Pool) -> dict[str, Any]:
        usage = controller.usage(pool)
        return {
            **pool.to_dict(),
            "capacity_bytes": usage.capacity_bytes,
            "used_bytes": usage.used_bytes,
            "free_bytes": usage.free_bytes,
            "provisioned_bytes": usage.provisioned_bytes,
            "used_percent": usage.used_percent,
            "vdisks": sum(1 for v in controller.vdisks.values() if v.pool_id == pool.id),
            "containers": [c.to_dict() for c in controller.pool_containers(pool)],
        }

    def vdisk_json(vdisk: VDisk) -> dict[str, Any]:
        return {
            **vdisk.to_dict(),
            "pool": controller.pools[vdisk.pool_id].name,
            "allocated_bytes": controller.allocated_bytes(vdisk),
            "progress": controller.progress.get(vdisk.id, 1.0),
        }

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {
            "version": san.__version__,
            "data_dir": service.data_dir,
            "uptime_seconds": round(time.time() - started, 1),
            "pools": len(controller.pools),
            "vdisks": len(controller.vdisks),
            "agents": len(controller.agents),
        }

    @app.get("/pools")
    async def list_pools() -> list[dict[str, Any]]:
        return [pool_json(p) for p in sorted(controller.pools.values(), key=lambda p: p.name)]

    @app.post("/pools", status_code=201)
    async def create_pool(body: PoolCreate) -> dict[str, Any]:
        segment_size = _size(body.segment_size)
        assert segment_size is not None
        pool = await controller.create_pool(
            body.name, _size(body.size), body.path, segment_size, body.warn_percent, body.allocate_ahead
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
        return [vdisk_json(v) for v in sorted(controller.vdisks.values(), key=lambda v: v.name)]

    @app.post("/vdisks", status_code=201)
    async def create_vdisk(body: VDiskCreate) -> JSONResponse:
        size = _size(body.size)
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
        size = _size(body.size)
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
        sessions = sum(1 for s in service.target.sessions.values() if s.initiator == host.iqn)
        return {**host.to_dict(), "zones": zones, "sessions": sessions}

    @app.get("/hosts")
    async def list_hosts() -> list[dict[str, Any]]:
        return [host_json(h) for h in sorted(zoning.hosts.values(), key=lambda h: h.name)]

    @app.post("/hosts", status_code=201)
    async def create_host(body: HostCreate) -> dict[str, Any]:
        chap, mutual = (body.chap_user, body.chap_secret), (body.mutual_user, body.mutual_secret)
        return host_json(zoning.create_host(body.name, body.iqn, chap, mutual))

    @app.get("/hosts/{name}")
    async def show_host(name: str) -> dict[str, Any]:
        return host_json(zoning.host(name))

    @app.delete("/hosts/{name}", status_code=204)
    async def delete_host(name: str) -> None:
        zoning.delete_host(name)

    @app.get("/zones")
    async def list_zones() -> list[dict[str, Any]]:
        return sorted((zone_json(z) for z in zoning.zones), key=lambda z: (z["host"], z["lun"]))

    @app.post("/zones", status_code=201)
    async def add_zone(body: ZoneCreate) -> dict[str, Any]:
        return zone_json(zoning.add(body.host, controller.vdisk(body.vdisk), body.lun, body.read_only))

    @app.delete("/zones/{host}/{vdisk}", status_code=204)
    async def remove_zone(host: str, vdisk: str) -> None:
        zoning.remove(host, controller.vdisk(vdisk))

    return app
