"""Frames on the wire between the controller and its gateways: a 4-byte length, a version byte, then one JSON object
that is a request ({"id": N, "msg": ...}) or the answer to one ({"re": N, "msg": ...}).

Sans-I/O: FrameDecoder is fed bytes and gives back envelopes; frame() makes the bytes. Anything malformed (a length
of 0 or over the limit, another version, bad UTF-8 or JSON, an unknown message or field, a value of the wrong type)
raises ProtocolError, and the link closes that connection only."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from san.protocol.messages import Message, decode, encode

HEADER = struct.Struct(">IB")  # the length of what follows the length field (version byte included), the version
VERSION = 1
MAX_FRAME = 4 << 20


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


@dataclass(frozen=True)
class Envelope:
    """One frame: a request (number is its id) or an answer (number is the id of the request it answers)."""

    answer: bool
    number: int
    message: Message


def frame(envelope: Envelope) -> bytes:
    body = {"re" if envelope.answer else "id": envelope.number, "msg": encode(envelope.message)}
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) + 1 > MAX_FRAME:
        raise ProtocolError(f"a {type(envelope.message).__name__} of {len(data)} bytes is over the frame limit")
    return HEADER.pack(len(data) + 1, VERSION) + data


class FrameDecoder:
    """Bytes in, envelopes out; a frame is decoded only once all of it is here, and never buffered past the limit."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Envelope]:
        self.buffer += data
        found: list[Envelope] = []
        while len(self.buffer) >= HEADER.size:
            length, version = HEADER.unpack_from(self.buffer)
            if not 1 < length <= self.max_frame:
                raise ProtocolError(f"a frame of {length} bytes (the limit is {self.max_frame})")
            if version != VERSION:
                raise ProtocolError(f"protocol version {version}; this san speaks {VERSION}")
            if len(self.buffer) < 4 + length:
                break
            body = bytes(self.buffer[HEADER.size : 4 + length])
            del self.buffer[: 4 + length]
            found.append(_envelope(body))
        return found


def _envelope(body: bytes) -> Envelope:
    try:
        data = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"a frame that is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or len(data) != 2 or "msg" not in data or not ({"id", "re"} & set(data)):
        raise ProtocolError("a frame must be {'id' or 're': N, 'msg': {...}}")
    answer = "re" in data
    number = data["re" if answer else "id"]
    if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 2**63:
        raise ProtocolError(f"a frame number must be a positive 64-bit integer, not {str(number)[:20]}")
    try:
        message = decode(data["msg"])
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(str(exc)[:200]) from None
    return Envelope(answer, number, message)
