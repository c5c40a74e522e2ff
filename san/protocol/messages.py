"""The messages between agents and the controller: Fault, Allocated, Release and Flush up, Command down, Response back.

All are frozen dataclasses of plain values; encode()/decode() turn them into JSON-ready dicts and back. An agent's
messages carry a request id that the response echoes; each is idempotent, so a repeat after a lost answer is safe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

Entry = tuple[int, int, int]


class Op(StrEnum):
    """What a Command asks an agent to do (the seed's command set, plus container attachment)."""

    CREATE_TABLE = "create_table"
    DELETE_TABLE = "delete_table"
    GROW_TABLE = "grow_table"
    GET_ENTRIES = "get_entries"
    SET_ENTRIES = "set_entries"
    SET_STATE = "set_state"
    CLEAR_STATE = "clear_state"
    ATTACH_CONTAINER = "attach_container"
    DETACH_CONTAINER = "detach_container"


class Action(StrEnum):
    """How a Response resolves its request."""

    OK = "ok"
    RETRY = "retry"
    COMPLETE = "complete"
    FAIL = "fail"


class Reason(StrEnum):
    """Why a request failed; the SCSI layer maps each to sense data."""

    NONE = ""
    NO_SPACE = "no_space"
    IO_ERROR = "io_error"
    WRITE_PROTECTED = "write_protected"
    NO_VDISK = "no_vdisk"
    OUT_OF_RANGE = "out_of_range"
    BAD_COMMAND = "bad_command"


@dataclass(frozen=True)
class Fault:
    """Agent -> controller: I/O on this vdisk segment cannot proceed in its current state."""

    vdisk: int
    segment: int
    state: int
    write: bool
    zero_data: bool = False
    request: int = 0


@dataclass(frozen=True)
class Allocated:
    """Agent -> controller: segments of a grant now hold these vdisk segments, as (vdisk segment, container, segment)."""

    vdisk: int
    entries: tuple[Entry, ...]
    request: int = 0


@dataclass(frozen=True)
class Release:
    """Agent -> controller: vdisk segments [start, start+count) were unmapped whole; their physical segments may go
    back to the pool (the agent has already set them ZERO and waited for the I/O that used them)."""

    vdisk: int
    start: int
    count: int
    request: int = 0


@dataclass(frozen=True)
class Flush:
    """Agent -> controller: make every metadata change so far durable before answering."""

    request: int = 0


@dataclass(frozen=True)
class Command:
    """Controller -> agent: change or read a map table; with blocking, answer once prior I/O has ended."""

    op: Op
    vdisk: int = 0
    start: int = 0
    count: int = 0
    entries: tuple[Entry, ...] = ()
    bits: int = 0
    blocking: bool = False
    nsegments: int = 0
    segment_blocks: int = 0
    block_size: int = 0
    nblocks: int = 0
    container: int = 0
    path: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class Response:
    """The answer to a message: the outcome, entries to install from start, and maybe a grant of zeroed segments
    (container, segment) the agent may map for this vdisk's first writes on its own, reporting them in Allocated."""

    action: Action = Action.OK
    start: int = 0
    entries: tuple[Entry, ...] = ()
    reason: Reason = Reason.NONE
    message: str = ""
    grant: tuple[tuple[int, int], ...] = ()
    request: int = 0

    def answering(self, request: int) -> Response:
        """This answer, for the request with that id (spelled out: dataclasses.replace costs more per fault)."""
        return Response(self.action, self.start, self.entries, self.reason, self.message, self.grant, request)


Message = Fault | Allocated | Release | Flush | Command | Response
_TYPES: dict[str, type[Message]] = {cls.__name__: cls for cls in (Fault, Allocated, Release, Flush, Command, Response)}


def encode(message: Message) -> dict[str, Any]:
    """A JSON-ready dict for a message."""
    body = asdict(message)
    for key in ("entries", "grant"):
        if key in body:
            body[key] = [list(entry) for entry in body[key]]
    return {"type": type(message).__name__, **body}


def decode(data: dict[str, Any]) -> Message:
    """The message a dict from encode() describes; ValueError on anything else."""
    try:
        cls = _TYPES[data["type"]]
    except (KeyError, TypeError):
        raise ValueError(f"not a message: {data!r}") from None
    names = {f.name for f in fields(cls)}
    body = {key: value for key, value in data.items() if key != "type"}
    if set(body) - names:
        raise ValueError(f"unknown fields for {cls.__name__}: {sorted(set(body) - names)}")
    for key in ("entries", "grant"):
        if key in body:
            body[key] = tuple(tuple(int(v) for v in entry) for entry in body[key])
    for key, enum in (("op", Op), ("action", Action), ("reason", Reason)):
        if key in body:
            body[key] = enum(body[key])
    return cls(**body)
