"""The link between controller and gateways, against a peer on 127.0.0.1: requests both ways at once, answers out
of order, timeouts, a peer that goes away, malformed frames and floods (that connection only is closed), and the
mutual TLS of the cluster (no certificate, another cluster's CA, a name that is not a node, plain TCP: refused
before anything is read)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from san.cluster.pki import Cluster, ClusterError
from san.protocol.codec import VERSION, Envelope, frame
from san.protocol.link import Link, LinkClosed
from san.protocol.messages import Action, Fault, Flush, Heartbeat, Message, Response
from san.protocol.network import Listener, PeerRefused, connect, listen

RUNNING: set[asyncio.Future[None]] = set()  # link tasks, referenced until their test ends


async def echo(message: Message) -> Message:
    if isinstance(message, Fault) and message.segment:
        await asyncio.sleep(message.segment / 100)  # later segments answer later: out of order
    return Response(Action.OK, start=getattr(message, "segment", 0))


async def linked(
    server_handler: Callable[[Message], Awaitable[Message]] = echo, max_inflight: int = 1024
) -> tuple[Link, Link, asyncio.Server]:
    ready: asyncio.Future[Link] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(reader, writer, server_handler, "client", max_inflight)
        if not ready.done():
            ready.set_result(link)
        await link.run()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Link(reader, writer, echo, "server")
    RUNNING.add(asyncio.ensure_future(client.run()))
    return client, await ready, server


def test_requests_go_both_ways_and_answers_may_come_out_of_order() -> None:
    async def body() -> None:
        client, server_side, server = await linked()
        answers = await asyncio.gather(*(client.send(Fault(1, s, 1, True), 5) for s in (30, 1, 10, 0)))
        assert [a.start for a in answers] == [30, 1, 10, 0]  # type: ignore[union-attr]
        assert (await server_side.send(Flush(), 5)) == Response(Action.OK)
        client.close()
        server.close()

    asyncio.run(body())


def test_a_request_that_is_not_answered_in_time_fails_and_its_late_answer_is_dropped() -> None:
    async def slow(message: Message) -> Message:
        await asyncio.sleep(0.5 if isinstance(message, Flush) else 0)
        return Response()

    async def body() -> None:
        client, _, server = await linked(slow)
        with pytest.raises(LinkClosed, match="within"):
            await client.send(Flush(), 0.1)
        await asyncio.sleep(0.6)  # the late answer arrives for a request nobody waits for any more: dropped
        assert not client.closed.is_set(), client.why
        assert (await client.send(Heartbeat(1), 5)).action is Action.OK  # type: ignore[union-attr]
        client.close()
        server.close()

    asyncio.run(body())


def test_an_answer_to_a_request_never_sent_closes_the_link() -> None:
    async def body() -> None:
        client, server_side, server = await linked()
        server_side._write(Envelope(True, 999, Response()))
        await asyncio.wait_for(client.closed.wait(), 5)
        assert "never sent" in client.why
        server.close()

    asyncio.run(body())


def test_a_peer_that_goes_away_fails_the_waiting_requests() -> None:
    async def never(message: Message) -> Message:
        await asyncio.sleep(60)
        return Response()

    async def body() -> None:
        client, server_side, server = await linked(never)
        waiting = asyncio.ensure_future(client.send(Heartbeat(1), 30))
        await asyncio.sleep(0.1)
        server_side.close()
        with pytest.raises(LinkClosed):
            await waiting
        with pytest.raises(LinkClosed):
            await client.send(Heartbeat(1), 1)
        server.close()

    asyncio.run(body())


def test_a_malformed_frame_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        good, _, server = await linked()
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack(">IB", 9, VERSION) + b'{"id":1,}')
        await writer.drain()
        await asyncio.sleep(0.2)
        assert (await good.send(Fault(1, 0, 1, True), 5)).action is Action.OK  # type: ignore[union-attr]
        writer.close()
        good.close()
        server.close()

    with caplog.at_level(logging.ERROR, "san.link"):
        asyncio.run(body())
    assert len([r for r in caplog.records if "closing the link" in r.message]) == 1


def test_a_flood_of_requests_is_cut_off() -> None:
    async def never(message: Message) -> Message:
        await asyncio.sleep(60)
        return Response()

    async def body() -> None:
        client, _, server = await linked(never, max_inflight=16)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(frame(Envelope(False, n, Flush())) for n in range(1, 40)))
        await writer.drain()
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", "the server closed the connection"
        client.close()
        server.close()

    asyncio.run(body())


# -- mutual TLS ----------------------------------------------------------------------------------------------


@pytest.fixture
def clusters(tmp_path: Path) -> tuple[Cluster, Cluster]:
    nodes = ["controller", "gw1"]
    return Cluster.init(str(tmp_path / "ours"), nodes), Cluster.init(str(tmp_path / "theirs"), nodes)


def test_cluster_files_are_private(clusters: tuple[Cluster, Cluster]) -> None:
    ours, _ = clusters
    assert os.stat(ours.path).st_mode & 0o777 == 0o700
    for entry in ours.path.iterdir():
        assert entry.stat().st_mode & 0o777 == 0o600, entry
    with pytest.raises(ClusterError):
        Cluster.init(str(ours.path), ["x"])
    with pytest.raises(ClusterError):
        ours.add("gw1")


async def tls_server(cluster: Cluster, seen: list[str]) -> tuple[Listener, int]:
    async def connected(peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer)
        link = Link(reader, writer, echo, peer)
        await link.run()

    server = await listen(cluster, "controller", "127.0.0.1", 0, connected)
    return server, server.sockets[0].getsockname()[1]


def test_nodes_of_the_cluster_connect_and_talk(clusters: tuple[Cluster, Cluster]) -> None:
    ours, _ = clusters

    async def body() -> None:
        seen: list[str] = []
        server, port = await tls_server(ours, seen)
        peer, reader, writer = await connect(ours, "gw1", "127.0.0.1", port)
        assert peer == "controller"
        link = Link(reader, writer, echo, peer)
        RUNNING.add(asyncio.ensure_future(link.run()))
        assert (await link.send(Fault(1, 0, 1, True), 5)).action is Action.OK  # type: ignore[union-attr]
        assert seen == ["gw1"]
        link.close()
        server.close()

    asyncio.run(body())


def test_strangers_are_refused_before_anything_is_read(clusters: tuple[Cluster, Cluster], tmp_path: Path) -> None:
    ours, theirs = clusters

    async def body() -> None:
        seen: list[str] = []
        server, port = await tls_server(ours, seen)
        # Another cluster's node, both ways.
        with pytest.raises(PeerRefused):
            await connect(theirs, "gw1", "127.0.0.1", port)
        # A TLS client with no certificate.
        anonymous = ssl.create_default_context(cafile=str(ours.path / "ca.pem"))
        anonymous.check_hostname = False
        refused = False
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=anonymous)
            writer.write(frame(Envelope(False, 1, Flush())))
            await writer.drain()
            refused = await asyncio.wait_for(reader.read(), 5) == b""
        except (ssl.SSLError, ConnectionError):
            refused = True
        assert refused

        # A plain TCP client sending a well-formed frame.
        def plain_client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
                plain.sendall(frame(Envelope(False, 1, Flush())))
                try:
                    return plain.recv(100)
                except (ConnectionResetError, TimeoutError):
                    return b""

        assert b"msg" not in await asyncio.to_thread(plain_client), "no frame is answered before the handshake"
        assert seen == [], "no stranger reached the protocol"
        server.close()

    asyncio.run(body())


def test_a_certificate_for_a_name_that_is_not_a_node_is_refused(clusters: tuple[Cluster, Cluster]) -> None:
    ours, _ = clusters
    ours.add("gw9")
    manifest = ours.path / "cluster.json"
    manifest.write_text('{"nodes": ["controller", "gw1"]}')  # gw9 removed from the cluster; its certificate remains

    async def body() -> None:
        seen: list[str] = []
        server, port = await tls_server(ours, seen)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(str(ours.path / "ca.pem"))
        context.load_cert_chain(str(ours.path / "gw9.pem"), str(ours.path / "gw9.key"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(frame(Envelope(False, 1, Flush())))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert seen == []
        server.close()

    asyncio.run(body())


def test_connections_that_never_finish_their_handshake_keep_no_gateway_out(clusters: tuple[Cluster, Cluster]) -> None:
    """300 TCP connections that send nothing: at most max_handshakes of them are held (the oldest are closed as new
    ones come), and a node of the cluster still connects at once."""
    ours, _ = clusters

    async def body() -> None:
        seen: list[str] = []

        async def connected(peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(peer)
            await reader.read()

        server = await listen(ours, "controller", "127.0.0.1", 0, connected, max_handshakes=16)
        port = server.sockets[0].getsockname()[1]
        stale = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        await asyncio.sleep(0.5)
        peer, _, writer = await connect(ours, "gw1", "127.0.0.1", port, timeout=5)
        assert peer == "controller"
        await asyncio.sleep(0.2)
        assert seen == ["gw1"]

        def closed(sock: socket.socket) -> bool:
            sock.settimeout(0.01)
            try:
                return sock.recv(1) == b""
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False

        held = sum(not closed(sock) for sock in stale)
        assert held <= 16, f"{held} connections still in their handshake"
        for sock in stale:
            sock.close()
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(body())
