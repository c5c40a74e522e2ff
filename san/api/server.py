"""Running the management API: uvicorn with san's connection limits, no proxy headers, TLS when given, until SIGTERM
or SIGINT; the token is published for local `san` commands while it listens.

tls_context() checks the certificate and key before anything starts; check_listen() refuses a non-loopback address
without TLS."""

from __future__ import annotations

import logging
import signal
import socket
import ssl

import uvicorn
from fastapi import FastAPI

from san.api.auth import AuthSetupError, publish, unpublish
from san.api.limits import GuardedH11Protocol

log = logging.getLogger("san")


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The API's TLS context, or None without TLS; AuthSetupError if only one of cert and key is given or they fail."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise AuthSetupError("TLS for the API needs both --api-cert and --api-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise AuthSetupError(f"cannot load the API certificate {cert} and key {key}: {exc}") from None
    return context


def check_free(host: str, port: int, what: str = "the management API") -> None:
    """Raise AuthSetupError with one line when host:port cannot be listened on (in use, no such address): checked
    before anything starts, so that nothing is made for a service that cannot serve."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        raise AuthSetupError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from None


def http_config(app: FastAPI, host: str, port: int, cert: str | None, key: str | None) -> uvicorn.Config:
    """uvicorn's settings for one of san's HTTP listeners (the API, a gateway's metrics)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        http=GuardedH11Protocol,
        proxy_headers=False,  # no X-Forwarded-For: the peer address is the socket's, for logs and limits
        ssl_certfile=cert,
        ssl_keyfile=key,
        ssl_version=ssl.PROTOCOL_TLS_SERVER,
    )


async def run_api(app: FastAPI, host: str, port: int, cert: str | None, key: str | None, token: str, what: str) -> bool:
    """Serve app until a signal; False if it could not listen. what names the service in the log."""
    server = uvicorn.Server(http_config(app, host, port, cert, key))
    for signum in (signal.SIGTERM, signal.SIGINT):
        # uvicorn restores these after serving and re-raises the signal it caught: it must land here, not kill us.
        signal.signal(signum, lambda *_: setattr(server, "should_exit", True))
    published = publish(token, host, port)
    scheme = "https" if cert is not None else "http"
    log.info("%s, management API on %s://%s:%d", what, scheme, host, port)
    try:
        await server.serve()
    except SystemExit:
        pass
    finally:
        unpublish(published, token)
    if not server.started:
        log.error("management API could not listen on %s:%d", host, port)
        return False
    return True
