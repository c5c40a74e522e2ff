"""The wire codec as a peer meets it: every message survives a frame both ways, frames split or joined anyhow decode
the same, and every malformed frame (length, version, JSON, envelope, message, field type or range) is refused
with ProtocolError, never half-decoded and never buffered past the limit."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from san.model import Host, VDisk, Zone
from san.protocol.codec import MAX_FRAME, VERSION, Envelope, FrameDecoder, ProtocolError, frame
from san.protocol.messages import (
    Action,
    Allocated,
    Command,
    Config,
    Fault,
    Flush,
    Heartbeat,
    Op,
    Reason,
    Register,
    Registered,
    Release,
    Response,
)

u63 = st.integers(0, 2**63 - 1)
entries = st.lists(st.tuples(u63, u63, st.integers(0, 15)), max_size=4).map(tuple)
text = st.text(max_size=30)
vdisks = st.builds(VDisk, u63, text, u63, u63, st.sampled_from([512, 4096]), st.booleans(), text, st.just("ready"))
hosts = st.builds(Host, u63, text, text, text, text, text, text)
zones = st.builds(Zone, u63, u63, st.integers(0, 255), st.booleans())
messages = st.one_of(
    st.builds(Register, text, st.integers(0, 9), u63),
    st.builds(Registered, u63, st.floats(0, 1e6), u63),
    st.builds(Heartbeat, u63, u63),
    st.builds(Fault, u63, u63, st.integers(0, 15), st.booleans(), st.booleans(), u63),
    st.builds(Allocated, u63, entries, u63),
    st.builds(Release, u63, u63, u63, u63),
    st.builds(Flush, u63),
    st.builds(Command, st.sampled_from(list(Op)), vdisk=u63, entries=entries, blocking=st.booleans(), path=text, request=u63),
    st.builds(
        Config,
        u63,
        st.lists(vdisks, max_size=3).map(tuple),
        st.lists(hosts, max_size=3).map(tuple),
        st.lists(zones, max_size=3).map(tuple),
        st.lists(u63, max_size=3).map(tuple),
    ),
    st.builds(Response, st.sampled_from(list(Action)), u63, entries, st.sampled_from(list(Reason)), text),
)
envelopes = st.builds(Envelope, st.booleans(), st.integers(1, 2**63 - 1), messages)


@given(st.lists(envelopes, min_size=1, max_size=5), st.integers(1, 64))
@settings(max_examples=200)
def test_frames_decode_whole_however_the_bytes_arrive(sent: list[Envelope], chunk: int) -> None:
    data = b"".join(frame(envelope) for envelope in sent)
    decoder = FrameDecoder()
    got: list[Envelope] = []
    for at in range(0, len(data), chunk):
        got += decoder.feed(data[at : at + chunk])
    assert got == sent and not decoder.buffer


def raw(body: object, version: int = VERSION) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack(">IB", len(data) + 1, version) + data


FAULT = {"type": "Fault", "vdisk": 1, "segment": 2, "state": 1, "write": True}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (struct.pack(">IB", MAX_FRAME + 1, VERSION), "limit"),
        (struct.pack(">IB", 1, VERSION), "limit"),
        (raw({"id": 1, "msg": FAULT}, version=2), "version"),
        (raw(b"\xff\xfe"), "JSON"),
        (raw(b"[" * 100_000 + b"]" * 100_000), "JSON"),
        (raw([1, 2]), "frame must be"),
        (raw({"id": 1, "re": 2, "msg": FAULT}), "frame must be"),
        (raw({"id": 0, "msg": FAULT}), "positive"),
        (raw({"id": True, "msg": FAULT}), "positive"),
        (raw({"id": 1, "msg": {"type": "Explode"}}), "not a message"),
        (raw({"id": 1, "msg": {**FAULT, "bogus": 1}}), "unknown fields"),
        (raw({"id": 1, "msg": {"type": "Fault", "vdisk": 1}}), "missing"),
        (raw({"id": 1, "msg": {**FAULT, "segment": "2"}}), "integer"),
        (raw({"id": 1, "msg": {**FAULT, "segment": 2**64}}), "integer"),
        (raw({"id": 1, "msg": {**FAULT, "write": 1}}), "true or false"),
        (raw({"id": 1, "msg": {"type": "Allocated", "vdisk": 1, "entries": [[1, 2]]}}), "3 items"),
        (raw({"id": 1, "msg": {"type": "Allocated", "vdisk": 1, "entries": [[1, 2, None]]}}), "integer"),
        (raw({"id": 1, "msg": {"type": "Command", "op": "format_disk"}}), "not one of"),
        (raw({"id": 1, "msg": {"type": "Registered", "epoch": 1, "lease": float("nan")}}), "number"),
        (raw({"id": 1, "msg": {"type": "Registered", "epoch": 1, "lease": 10**400}}), "number"),
        (raw({"id": 1, "msg": {"type": "Config", "version": 1, "hosts": [{"id": 1}]}}), "missing"),
        (raw({"id": 1, "msg": {"type": "Register", "name": "x" * 70_000}}), "string"),
    ],
)
def test_malformed_frames_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        FrameDecoder().feed(data)


def test_a_length_over_the_limit_is_refused_before_its_bytes_arrive() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">IB", 2048, VERSION) + b"x" * 10)
    assert len(decoder.buffer) < 64, "nothing of an oversized frame is kept"


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        FrameDecoder().feed(data)
