"""The controller's listener for gateways, and a gateway's connection to it: TCP with mutual TLS from the cluster's CA.

A peer is checked in the handshake (a certificate from this cluster's CA, TLS 1.3) and by name (a node of the
cluster) before a byte is read from it; anything else is closed with one log line."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from san.cluster.pki import Cluster, ClusterError

log = logging.getLogger("san.link")
HANDSHAKE_TIMEOUT = 10.0
MAX_PEERS = 256

Connected = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class PeerRefused(Exception):
    """The other end is not a node of this cluster (or could not be reached)."""


async def listen(
    cluster: Cluster, name: str, host: str, port: int, connected: Connected, max_peers: int = MAX_PEERS
) -> asyncio.Server:
    """Accept gateways on host:port; connected(peer name, reader, writer) runs for each verified one, at most
    max_peers at once (more are closed at once)."""
    context = cluster.context(name, server=True)
    peers: set[asyncio.Task[object]] = set()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        try:
            peer = cluster.peer_name(writer.get_extra_info("peercert"))
        except ClusterError as exc:
            log.warning("refused a peer from %s: %s", address, exc)
            writer.close()
            return
        if len(peers) >= max_peers:
            log.warning("refused node %s from %s: %d peers already connected", peer, address, max_peers)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        peers.add(task)
        try:
            await connected(peer, reader, writer)
        finally:
            peers.discard(task)
            writer.close()

    return await asyncio.start_server(accepted, host, port, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)


async def connect(
    cluster: Cluster, name: str, host: str, port: int, timeout: float = HANDSHAKE_TIMEOUT
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a node at host:port as node `name`; the peer's node name and the stream. PeerRefused when the
    connection, the handshake or the peer's name fails."""
    context = cluster.context(name, server=False)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host, ssl_handshake_timeout=timeout), timeout
        )
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise PeerRefused(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from None
    try:
        peer = cluster.peer_name(writer.get_extra_info("peercert"))
    except ClusterError as exc:
        writer.close()
        raise PeerRefused(f"{host}:{port}: {exc}") from None
    return peer, reader, writer
