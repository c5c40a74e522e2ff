"""The typed client against a real `san serve`: every model round-trips the API's JSON unchanged, and each refusal
comes back as its own exception class carrying the server's message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, serving

from san.client import ApiError, BadRequest, Conflict, Host, NotFound, Pool, SanClient, Status, Unauthorized, VDisk, Zone


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("client")) as san:
        yield san


@pytest.fixture
def client(server: SanServer) -> SanClient:
    token = Path(server.data) / "api-token"
    return SanClient(server.api, str(token))


def test_objects_made_through_the_client_come_back_typed_and_round_trip(server: SanServer, client: SanClient) -> None:
    pool = client.create_pool("p", "256M", segment_size="64K", warn_percent=70)
    assert isinstance(pool, Pool) and pool.capacity_bytes == 256 << 20 and pool.warn_percent == 70
    assert pool.containers and pool.containers[0].owned
    vdisk = client.create_vdisk("v", "p", 8 << 20, block_size=4096)
    assert isinstance(vdisk, VDisk) and (vdisk.size_bytes, vdisk.block_size, vdisk.thin) == (8 << 20, 4096, True)
    assert vdisk.data_percent == 0.0
    host = client.create_host("h", "iqn.2024-01.org.example:h")
    assert isinstance(host, Host) and host.warnings and "no CHAP" in host.warnings[0]
    zone = client.add_zone("h", "v", read_only=True)
    assert zone == Zone(host="h", vdisk="v", lun=0, read_only=True)
    assert client.grow_vdisk("v", "16M").size_bytes == 16 << 20
    for path, kind in (("/pools", Pool), ("/vdisks", VDisk), ("/hosts", Host), ("/zones", Zone)):
        answer = server.get(path)
        assert answer and [kind.from_json(item).to_json() for item in answer] == answer, path
    status = server.get("/status")
    assert Status.from_json(status).to_json() == status and client.status().vdisks == 1
    assert [h.zones for h in client.hosts()] == [[zone]]


def test_fields_a_newer_server_adds_are_kept(client: SanClient) -> None:
    answer = {"host": "h", "vdisk": "v", "lun": 3, "read_only": False, "added_later": {"x": 1}}
    assert Zone.from_json(answer).to_json() == answer
    with pytest.raises(ValueError, match="lacks lun"):
        Zone.from_json({"host": "h", "vdisk": "v", "read_only": False})


def test_refusals_are_typed_and_carry_the_servers_message(server: SanServer, client: SanClient, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no vdisk named 'nope'") as missing:
        client.vdisk("nope")
    assert missing.value.status == 404
    client.create_pool("q", "64M")
    with pytest.raises(Conflict) as taken:
        client.create_pool("q", "64M")
    assert taken.value.status == 409 and "q" in str(taken.value)
    with pytest.raises(BadRequest, match="size"):
        client.create_vdisk("w", "q", "ten gigs")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("x" * 43 + "\n")
    wrong.chmod(0o600)
    with pytest.raises(Unauthorized):
        SanClient(server.api, str(wrong)).pools()
    with pytest.raises(ApiError, match="cannot reach the san API") as unreachable:
        SanClient("http://127.0.0.1:9", str(wrong)).pools()
    assert type(unreachable.value) is ApiError and unreachable.value.status == 0
    assert json.loads(json.dumps(client.pool("q").to_json())) == server.get("/pools/q")
