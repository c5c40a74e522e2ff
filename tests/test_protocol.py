"""Messages cross the agent-controller boundary as plain data: every kind survives JSON both ways.

Malformed dicts are refused with ValueError, never half-decoded."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from san.protocol.messages import Action, Allocated, Alternate, Command, Fault, Flush, Op, Reason, Response, decode, encode

entries = st.lists(st.tuples(st.integers(0, 65534), st.integers(0, 2**32 - 2), st.integers(0, 15)), max_size=5).map(tuple)
runs = st.lists(st.tuples(st.integers(0, 2**21), st.integers(1, 2**21)), max_size=4).map(tuple)
alternates = st.lists(
    st.builds(Alternate, st.integers(0, 2**32), st.integers(0, 65534), st.integers(0, 2**32 - 2), runs, st.booleans()),
    max_size=3,
).map(tuple)
messages = st.one_of(
    st.builds(Fault, st.integers(1, 99), st.integers(0, 2**32), st.integers(0, 15), st.booleans(), st.booleans()),
    st.just(Flush()),
    st.builds(Allocated, st.integers(1, 99), entries, alternates=alternates),
    st.builds(
        Command,
        st.sampled_from(list(Op)),
        vdisk=st.integers(0, 99),
        start=st.integers(0, 2**32),
        count=st.integers(0, 2**20),
        entries=entries,
        alternates=alternates,
        bits=st.integers(0, 31),
        blocking=st.booleans(),
        path=st.text(max_size=20),
    ),
    st.builds(
        Response,
        st.sampled_from(list(Action)),
        st.integers(0, 2**32),
        entries,
        st.sampled_from(list(Reason)),
        st.text(max_size=20),
        alternates=alternates,
    ),
)


@given(messages)
def test_every_message_round_trips_through_json(message: Fault | Allocated | Flush | Command | Response) -> None:
    assert decode(json.loads(json.dumps(encode(message)))) == message


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"type": "Nope"},
        {"type": "Fault", "vdisk": 1, "bogus": 2},
        {"type": "Command", "op": "explode"},
        [],
        {
            "type": "Allocated",
            "vdisk": 1,
            "entries": [],
            "alternates": [{"vseg": 0, "container": 1, "segment": 2, "runs": [[1]]}],
        },
        {"type": "Allocated", "vdisk": 1, "entries": [], "alternates": [{"vseg": 0, "container": 1}]},
        {"type": "Response", "alternates": [{"vseg": 0, "container": 1, "segment": 2, "writable": 1}]},
    ],
)
def test_malformed_messages_are_refused(data: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode(data)  # type: ignore[arg-type]
