"""Bad input from the network: malformed PDUs against a real target, and fuzzing of the PDU and CDB parsers.

The target answers with Reject or CHECK CONDITION, or drops that one connection; it never crashes, and other
sessions keep working."""

from __future__ import annotations

import asyncio
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawiscsi import RawInitiator

from san.iscsi.connection import Connection
from san.iscsi.keys import encode_text
from san.iscsi.pdu import digest
from san.iscsi.target import Access, Target
from san.scsi.disk import Disk, Nexus
from san.scsi.luns import LunView
from san.service import Service

TARGET = "iqn.2003-01.org.san:input"
INITIATOR = "iqn.2024-01.org.example:fuzzer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("input"), "--iqn", TARGET, "--open-access") as san:
        san.ok("pool", "create", "p", "--size", "256M")
        san.ok("vdisk", "create", "v", "--pool", "p", "--size", "32M")
        yield san


def still_serving(server: SanServer) -> None:
    result = subprocess.run(
        ["iscsi-inq", f"iscsi://127.0.0.1:{server.iscsi_port}/{TARGET}/0"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "Vendor:SAN" in result.stdout, (result, server.log_text())


def logged_in(server: SanServer) -> RawInitiator:
    initiator = RawInitiator(server.iscsi_port, INITIATOR)
    response = initiator.login(TARGET)
    assert response.opcode == 0x23 and response.bhs[36:38] == b"\0\0", response
    return initiator


def read_until_closed(initiator: RawInitiator) -> list[int]:
    """Opcodes the target sends until it closes the connection (or goes quiet)."""
    opcodes = []
    try:
        while True:
            opcodes.append(initiator.receive().opcode)
    except (ConnectionError, TimeoutError, OSError):
        pass
    return opcodes


def test_bad_opcode_and_bad_fields_get_reject_and_the_session_goes_on(server: SanServer) -> None:
    initiator = logged_in(server)
    initiator.sock.settimeout(5)
    try:
        initiator.send(bytes([0x1C]) + bytes(47))  # no such initiator opcode
        assert initiator.receive().opcode == 0x3F
        initiator.send(bytes([0x05, 0x80]) + bytes(14) + struct.pack(">I", 0x7777) + bytes(28))  # Data-Out for no task
        assert initiator.receive().opcode == 0x3F
        inquiry = struct.pack(">BBBHB", 0x12, 0, 0, 96, 0)
        response = initiator.command(0, inquiry, read_length=96)
        assert response.status == 0 and response.data[8:11] == b"SAN"
        response = initiator.command(0, bytes([0xEE]) + bytes(9))  # an opcode SCSI does not know
        assert response.status == 0x02 and response.sense[2] & 0x0F == 0x5 and response.sense[12] == 0x20
        response = initiator.command(7, inquiry, read_length=96)  # a LUN nothing is at
        assert response.data[0] == 0x7F
    finally:
        initiator.close()
    still_serving(server)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(bytes([0x01, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF]) + bytes(40), id="data-segment-past-MaxRecvDataSegmentLength"),
        pytest.param(bytes([0x41, 0x80]) + bytes(20), id="truncated-header"),
        pytest.param(bytes([0x43, 0x87]) + bytes(46), id="login-after-login"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(48), id="not-iscsi"),
    ],
)
def test_malformed_pdus_never_crash_the_target(server: SanServer, garbage: bytes) -> None:
    bystander = logged_in(server)
    initiator = logged_in(server)
    initiator.sock.settimeout(3)
    try:
        initiator.sock.sendall(garbage)
        initiator.sock.shutdown(1)
        read_until_closed(initiator)
    finally:
        initiator.close()
    try:
        response = bystander.command(0, bytes(6))  # TEST UNIT READY on the other session
        assert response.opcode == 0x21 and response.status == 0
    finally:
        bystander.close()
    still_serving(server)


def test_garbage_login_text_and_wrong_target_fail_the_login(server: SanServer) -> None:
    for target, extra in ((TARGET, [("MaxBurstLength", "lots")]), ("iqn.2003-01.org.san:nonesuch", [])):
        initiator = RawInitiator(server.iscsi_port, INITIATOR)
        try:
            response = initiator.login(target, extra)
            assert response.opcode == 0x23 and response.bhs[36] == 0x02, response.bhs[36:38]
        finally:
            initiator.close()
    initiator = RawInitiator(server.iscsi_port, INITIATOR)
    try:
        junk = b"\xff\xfe=\x00junk"
        initiator.send(struct.pack(">BBBBI", 0x43, 0x87, 0, 0, len(junk)) + bytes(40), junk)
        response = initiator.receive()
        assert response.opcode == 0x23 and response.bhs[36] == 0x02
    finally:
        initiator.close()
    still_serving(server)


def test_out_of_window_cmdsn_is_ignored(server: SanServer) -> None:
    initiator = logged_in(server)
    initiator.sock.settimeout(1.5)
    try:
        initiator.cmd_sn += 1000
        with pytest.raises(TimeoutError):
            initiator.command(0, bytes(6))
        initiator.cmd_sn -= 1001
        initiator.sock.settimeout(10)
        assert initiator.command(0, bytes(6)).status == 0, "the session goes on at the expected CmdSN"
    finally:
        initiator.close()


def test_wrong_header_digest_drops_only_that_connection(server: SanServer) -> None:
    initiator = RawInitiator(server.iscsi_port, INITIATOR)
    initiator.sock.settimeout(3)
    try:
        response = initiator.login(TARGET, [("HeaderDigest", "CRC32C"), ("DataDigest", "None")])
        assert initiator.keys(response)["HeaderDigest"] == "CRC32C"
        tur = struct.pack(">BBHI8sIIII16s", 0x01, 0x80, 0, 0, bytes(8), 9, 0, initiator.cmd_sn, 0, bytes(16))
        initiator.sock.sendall(tur + digest(tur))
        assert initiator._recv_exact(48)[0] & 0x3F == 0x21
        initiator.sock.sendall(tur + b"\0\0\0\0")  # a wrong digest
        assert read_until_closed(initiator) == []
    finally:
        initiator.close()
    still_serving(server)


# -- fuzzing the parsers without a network -------------------------------------------------------------------


def _login_pdu() -> bytes:
    data = encode_text([("InitiatorName", INITIATOR), ("TargetName", TARGET)])
    header = struct.pack(">BBBBI6sHIHHII16x", 0x43, 0x87, 0, 0, len(data), b"\x40" + bytes(5), 0, 1, 1, 0, 1, 0)
    return header + data + bytes(-len(data) % 4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=0, max_size=120), max_size=6), st.integers(0, 47), st.integers(0, 255))
def test_the_connection_state_machine_survives_any_bytes(tmp_path: Path, chunks: list[bytes], at: int, value: int) -> None:
    target = Target(TARGET, [("127.0.0.1", 3260)], lambda name: Access({}))
    connection = Connection(target)
    login = bytearray(_login_pdu())
    login[at] = value
    for chunk in [bytes(login), *chunks]:
        tasks = connection.receive(chunk)
        assert all(task.itt >= 0 for task in tasks)
        assert all(isinstance(item, bytes | bytearray | memoryview) for item in connection.outbox)
        if connection.closing:
            break


Unit = tuple[asyncio.AbstractEventLoop, Disk]


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unit]:
    """One vdisk's SCSI unit on a real service, driven from one event loop for every fuzzed CDB."""
    loop = asyncio.new_event_loop()
    service = Service(str(tmp_path_factory.mktemp("cdb")))

    async def setup() -> Disk:
        await service.start()
        await service.controller.create_pool("p", 64 << 20)
        return service.disk(await service.controller.create_vdisk("v", "p", 8 << 20))

    disk = loop.run_until_complete(setup())
    try:
        yield loop, disk
    finally:
        loop.run_until_complete(service.stop())
        loop.close()


OPCODES = [
    0x00,
    0x03,
    0x08,
    0x0A,
    0x12,
    0x15,
    0x16,
    0x17,
    0x1A,
    0x1B,
    0x25,
    0x28,
    0x2A,
    0x2E,
    0x2F,
    0x34,
    0x35,
    0x41,
    0x42,
    0x55,
    0x5A,
    0x5E,
    0x5F,
    0x88,
    0x89,
    0x8A,
    0x8F,
    0x90,
    0x91,
    0x93,
    0x9E,
    0xA0,
    0xA3,
    0xA8,
    0xAA,
    0xEE,
]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(OPCODES), st.binary(min_size=0, max_size=15), st.binary(max_size=1100))
def test_the_scsi_layer_answers_any_cdb(
    unit: tuple[asyncio.AbstractEventLoop, Disk], opcode: int, rest: bytes, data: bytes
) -> None:
    loop, disk = unit
    cdb = bytes([opcode]) + rest
    reply = loop.run_until_complete(disk.execute(Nexus("fuzz"), cdb, data))
    assert reply.status in (0x00, 0x02, 0x04, 0x18), reply
    assert reply.status != 0x02 or len(reply.sense) == 18
    view = LunView("fuzz", {})
    assert loop.run_until_complete(view.execute(3, cdb, data)).status in (0x00, 0x02)


def test_a_huge_expected_length_is_refused_without_allocating_it(server: SanServer) -> None:
    initiator = logged_in(server)
    initiator.sock.settimeout(10)
    try:
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
        bhs = struct.pack(
            ">BBHI2s6xIIII16s", 0x01, 0xA0, 0, 0, b"\0\0", 77, 0xFFFFFFF0, initiator.cmd_sn, 0, cdb.ljust(16, b"\0")
        )
        initiator.cmd_sn += 1
        initiator.send(bhs)
        response = initiator.receive()
        assert response.opcode == 0x21 and response.status == 0x02
        assert initiator.command(0, bytes(6)).status == 0, "the session goes on"
    finally:
        initiator.close()


def test_a_data_out_that_ends_its_burst_early_fails_the_command(server: SanServer) -> None:
    initiator = logged_in(server)
    initiator.sock.settimeout(10)
    try:
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0)
        bhs = struct.pack(">BBHI8sIIII16s", 0x01, 0xA0, 0, 0, bytes(8), 88, 4096, initiator.cmd_sn, 0, cdb.ljust(16, b"\0"))
        initiator.cmd_sn += 1
        initiator.send(bhs)
        r2t = initiator.receive()
        assert r2t.opcode == 0x31
        ttt = r2t.u32(20)
        data_out = struct.pack(">BBHI8s8I", 0x05, 0x80, 0, 512, bytes(8), 88, ttt, 0, 0, 0, 0, 0, 0)
        initiator.send(data_out, b"x" * 512)  # F set after 512 of the 4096 bytes asked for
        reject, response = initiator.receive(), initiator.receive()
        assert reject.opcode == 0x3F and response.opcode == 0x21 and response.status == 0x02
        assert response.data[2 + 2] & 0x0F == 0x0B, "ABORTED COMMAND (sense after its 2-byte length)"
        assert initiator.command(0, bytes(6)).status == 0, "the session goes on"
    finally:
        initiator.close()
