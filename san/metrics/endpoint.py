"""Serving metrics: the Prometheus text (or OpenMetrics, when the scraper asks) of a registry of san's collectors,
as a route of the API and as a gateway's own listener (`san gateway --metrics HOST:PORT`, behind a bearer token)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from san.api.auth import BearerAuth, publish, unpublish
from san.api.limits import BodyLimit
from san.api.server import http_config

log = logging.getLogger("san")


def registry_of(*collectors: Collector) -> CollectorRegistry:
    """A registry holding exactly these collectors (not prometheus_client's global one, nor its process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def metrics_response(registry: CollectorRegistry, request: Request) -> Response:
    """The exposition of registry in the format the scraper's Accept header asks for."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(registry), media_type=content_type)


def metrics_app(registry: CollectorRegistry, token: str) -> FastAPI:
    """An application serving only GET /metrics, to holders of the token."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return metrics_response(registry, request)

    app.add_middleware(BodyLimit)
    app.add_middleware(BearerAuth, token=token)
    return app


class _Server(uvicorn.Server):
    """uvicorn inside a process that handles its own signals: it must not take SIGTERM and SIGINT over."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class MetricsServer:
    """A gateway's metrics listener, run as a task of its event loop; start() raises OSError if it cannot listen
    (port 0: any free port, then in .port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, token: str,
                 cert: str | None = None, key: str | None = None) -> None:  # fmt: skip
        self.server = _Server(http_config(metrics_app(registry, token), host, port, cert, key))
        self.host, self.port, self.token = host, port, token
        self.task: asyncio.Task[None] | None = None
        self.published: list[str] = []

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listening = socket.create_server((self.host, self.port), family=family)  # raises OSError (in use, no address)
        self.port = listening.getsockname()[1]
        self.task = asyncio.ensure_future(self._serve(listening))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if not self.server.started:
            with contextlib.suppress(Exception):
                await self.task  # its failure is the one raised here
            raise OSError(f"cannot serve metrics on {self.host}:{self.port}")
        self.published = publish(self.token, self.host, self.port)
        scheme = "https" if self.server.config.ssl_certfile else "http"
        log.info("metrics on %s://%s:%d/metrics", scheme, self.host, self.port)

    async def _serve(self, listening: socket.socket) -> None:
        try:
            await self.server.serve(sockets=[listening])
        except SystemExit:  # uvicorn's way of saying it could not start (a bad certificate): logged by it
            pass
        finally:
            listening.close()

    async def stop(self) -> None:
        unpublish(self.published, self.token)
        if self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await self.task
