"""The controller's listener for gateways, and a gateway's connection to it: TCP with mutual TLS from the cluster's CA.

A peer is checked in the handshake (a certificate from this cluster's CA, TLS 1.3) and by name (a node of the
cluster) before a byte is read from it; anything else is closed with one log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import Counter
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

    def __init__(self, sock: socket.socket, accepting: asyncio.Task[None], handshaking: dict[socket.socket, str]) -> None:
        self.sockets = [sock]
        self.accepting = accepting
        self.handshaking = handshaking

    def close(self) -> None:
        """Stop accepting, close the listening socket and end the handshakes under way (connections made stay)."""
        self.accepting.cancel()
        self.sockets[0].close()
        for client in list(self.handshaking):
            _end(client)

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.accepting


def _end(client: socket.socket) -> None:
    """End a connection still in its handshake without closing its fd under a transport that may own it."""
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_RDWR)


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
    their TLS handshake at once (for a new one, the oldest of the address that has the most is ended), each for at
    most handshake_timeout seconds; TLS is the first thing on every accepted socket, nothing is read in the clear."""
    context = cluster.context(name, server=True)
    loop = asyncio.get_running_loop()
    peers: set[asyncio.Task[None]] = set()
    handshaking: dict[socket.socket, str] = {}  # -> its peer's address, in the order accepted
    ended: set[socket.socket] = set()  # handshakes ended here for newer ones (not logged one by one)
    tasks: set[asyncio.Task[None]] = set()
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=512)
    sock.setblocking(False)

    async def accept() -> None:
        complained = evicted = 0.0
        while True:
            try:
                client, address = await loop.sock_accept(sock)
            except OSError as exc:  # out of fds, or the like: a short pause, not a busy loop (and one line in 10 s)
                if loop.time() - complained > 10:
                    complained = loop.time()
                    log.error("cannot accept a gateway connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(handshaking) >= max_handshakes:
                busiest = Counter(handshaking.values()).most_common(1)[0][0]
                oldest = next(c for c, host in handshaking.items() if host == busiest)
                if loop.time() - evicted > 10:
                    evicted = loop.time()
                    log.warning("ending TLS handshakes from %s: %d connections are in theirs", busiest, max_handshakes)
                del handshaking[oldest]
                ended.add(oldest)
                _end(oldest)  # its handshake fails, and its task cleans up
            handshaking[client] = str(address[0])
            task = loop.create_task(serve(client, address))
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
        except asyncio.CancelledError:
            client.close()
            raise
        except Exception as exc:  # whatever ends a handshake ends only that connection
            if client not in ended:
                log.warning("refused a peer from %s: %s", address, exc or type(exc).__name__)
            client.close()
            return
        finally:
            handshaking.pop(client, None)
            ended.discard(client)
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
