"""The controller's listener for gateways, and a gateway's connection to it: TCP with mutual TLS from the cluster's CA.

A peer is checked in the handshake (a certificate from this cluster's CA, TLS 1.3) and by name (a node of the
cluster) before a byte is read from it; anything else is closed with one log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from san.cluster.pki import Cluster, ClusterError

log = logging.getLogger("san.link")
HANDSHAKE_TIMEOUT = 10.0
MAX_PEERS = 256
MAX_HANDSHAKES = 64
LINK_BUFFER = 1 << 16  # the stream's read buffer (asyncio's default)

Connected = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class PeerRefused(Exception):
    """The other end is not a node of this cluster (or could not be reached)."""


class Listener:
    """A listening socket and its accept loop (what listen() returns): sockets, close(), wait_closed()."""

    def __init__(
        self, sock: socket.socket, accepting: asyncio.Task[None], handshaking: dict[asyncio.Task[None], socket.socket]
    ) -> None:
        self.sockets = [sock]
        self.accepting = accepting
        self.handshaking = handshaking

    def close(self) -> None:
        """Stop accepting, close the listening socket and end the handshakes under way (connections made stay)."""
        self.accepting.cancel()
        self.sockets[0].close()
        for task in list(self.handshaking):
            task.cancel()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.accepting


async def listen(
    cluster: Cluster,
    name: str,
    host: str,
    port: int,
    connected: Connected,
    max_peers: int = MAX_PEERS,
    max_handshakes: int = MAX_HANDSHAKES,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Listener:
    """Accept gateways on host:port; connected(peer name, reader, writer) runs for each verified one, at most
    max_peers at once (more are closed at once). A connection counts from its accept: at most max_handshakes are in
    their TLS handshake at once (the oldest is closed for a new one), each for at most handshake_timeout seconds;
    TLS is the first thing on every accepted socket, so nothing is read from it in the clear."""
    context = cluster.context(name, server=True)
    loop = asyncio.get_running_loop()
    peers: set[asyncio.Task[None]] = set()
    handshaking: dict[asyncio.Task[None], socket.socket] = {}  # in the order accepted
    tasks: set[asyncio.Task[None]] = set()
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=512)
    sock.setblocking(False)

    async def accept() -> None:
        while True:
            try:
                client, address = await loop.sock_accept(sock)
            except OSError as exc:  # out of fds, or the like: a short pause, not a busy loop
                log.error("cannot accept a gateway connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(handshaking) >= max_handshakes:
                oldest = next(iter(handshaking))
                log.warning("closing the oldest of %d connections still in their TLS handshake", max_handshakes)
                del handshaking[oldest]
                oldest.cancel()
            task = loop.create_task(serve(client, address))
            handshaking[task] = client
            tasks.add(task)  # a reference until it ends
            task.add_done_callback(tasks.discard)

    async def serve(client: socket.socket, address: object) -> None:
        task = cast(asyncio.Task[None], asyncio.current_task())
        reader = asyncio.StreamReader(limit=LINK_BUFFER)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, client, ssl=context, ssl_handshake_timeout=handshake_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError) as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("refused a peer from %s: %s", address, exc or type(exc).__name__)
            client.close()
            return
        finally:
            handshaking.pop(task, None)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
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
        peers.add(task)
        try:
            await connected(peer, reader, writer)
        finally:
            peers.discard(task)
            writer.close()

    return Listener(sock, loop.create_task(accept()), handshaking)


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
