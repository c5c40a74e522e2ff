"""A deliberately small iSCSI initiator for tests that need PDUs no real initiator sends (bad ones included).

Login without authentication, SCSI commands with immediate data, raw PDUs; blocking sockets with timeouts."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import struct
from dataclasses import dataclass

from san.iscsi.keys import encode_text, parse_text

BHS = 48
_ISIDS = itertools.count(1)


@dataclass
class Response:
    opcode: int
    bhs: bytes
    data: bytes
    sense: bytes = b""

    @property
    def status(self) -> int:
        return self.bhs[3]

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.bhs[offset : offset + 4], "big")


class RawInitiator:
    """One connection to a target portal."""

    def __init__(
        self, port: int, initiator: str, host: str = "127.0.0.1", timeout: float = 10.0, source: str | None = None
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.initiator = initiator
        self.cmd_sn = 1
        self.itt = 1
        self.isid = b"\x40\x00\x01\x37" + next(_ISIDS).to_bytes(2, "big")  # a new I_T nexus per connection

    def close(self) -> None:
        self.sock.close()

    def send(self, bhs: bytes, data: bytes = b"") -> None:
        pad = -len(data) % 4
        self.sock.sendall(bhs + data + bytes(pad))

    def _recv_exact(self, count: int) -> bytes:
        chunks = b""
        while len(chunks) < count:
            piece = self.sock.recv(count - len(chunks))
            if not piece:
                raise ConnectionError("the target closed the connection")
            chunks += piece
        return chunks

    def receive(self) -> Response:
        bhs = self._recv_exact(BHS)
        length = int.from_bytes(bhs[5:8], "big")
        data = self._recv_exact(length + (-length % 4))[:length] if length else b""
        return Response(bhs[0] & 0x3F, bhs, data)

    def login(self, target: str, extra: list[tuple[str, str]] | None = None) -> Response:
        """One-step login straight to full feature phase (operational stage, no authentication)."""
        keys = [("InitiatorName", self.initiator), ("TargetName", target), ("SessionType", "Normal"), *(extra or [])]
        return self._login_step(0x80 | (1 << 2) | 3, keys)

    def login_chap(self, target: str, user: str, secret: str, mutual_secret: str = "") -> dict[str, str]:
        """Log in through the security stage with CHAP (mutual when mutual_secret is given); returns the keys of
        the target's last security answer (its CHAP_N and CHAP_R for mutual CHAP). Raises on a failed login."""
        first = [("InitiatorName", self.initiator), ("TargetName", target), ("SessionType", "Normal")]
        answer = self._login_step(0x01, [*first, ("AuthMethod", "CHAP")])
        self._check(answer)
        challenge = self.keys(self._login_step(0x01, [("CHAP_A", "5")]))
        identifier, data = int(challenge["CHAP_I"]), bytes.fromhex(challenge["CHAP_C"][2:])
        reply = [("CHAP_N", user), ("CHAP_R", "0x" + hashlib.md5(bytes([identifier]) + secret.encode() + data).hexdigest())]
        mine = os.urandom(16)
        if mutual_secret:
            reply += [("CHAP_I", "77"), ("CHAP_C", "0x" + mine.hex())]
        answer = self._login_step(0x80 | 0x01, reply)
        self._check(answer)
        keys = self.keys(answer)
        if mutual_secret:
            expected = hashlib.md5(bytes([77]) + mutual_secret.encode() + mine).hexdigest()
            if keys.get("CHAP_R", "").lower() != "0x" + expected:
                raise ConnectionError("the target failed mutual CHAP")
        self._check(self._login_step(0x80 | (1 << 2) | 3, []))
        return keys

    def _check(self, response: Response) -> None:
        if response.opcode != 0x23 or response.bhs[36:38] != b"\0\0":
            raise ConnectionError(f"login failed with status {response.bhs[36:38].hex()}")

    def _login_step(self, flags: int, keys: list[tuple[str, str]]) -> Response:
        data = encode_text(keys)
        bhs = struct.pack(">BBBBI6sHIHHII16x", 0x43, flags, 0, 0, len(data), self.isid, 0, self.itt, 1, 0, self.cmd_sn, 0)
        self.send(bhs, data)
        return self.receive()

    def keys(self, response: Response) -> dict[str, str]:
        return dict(parse_text(response.data))

    def command(self, lun: int, cdb: bytes, data_out: bytes = b"", read_length: int = 0) -> Response:
        """A SCSI command with its data as immediate data; returns the SCSI Response (Data-In data collected)."""
        flags = 0x80 | (0x40 if read_length else 0) | (0x20 if data_out else 0) | 0x01
        length = read_length or len(data_out)
        bhs = struct.pack(
            ">BBH I 2s6x I I I I 16s",
            0x01,
            flags,
            0,
            len(data_out),
            bytes([0, lun]),
            self.itt,
            length,
            self.cmd_sn,
            0,
            cdb.ljust(16, b"\0"),
        )
        self.itt += 1
        self.cmd_sn += 1
        self.send(bhs, data_out)
        collected = b""
        while True:
            response = self.receive()
            if response.opcode == 0x25:
                collected += response.data
                if response.bhs[1] & 0x01:
                    return Response(0x21, response.bhs, collected)
                continue
            if response.opcode == 0x21:
                sense = response.data[2 : 2 + int.from_bytes(response.data[:2], "big")] if response.data else b""
                return Response(0x21, response.bhs, collected, sense)
            return response
