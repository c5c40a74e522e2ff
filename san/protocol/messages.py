"""The messages between agents and the controller: Register, Heartbeat, Fault, Allocated, Release and Flush up;
Command and Config down; Response (or Registered) back.

All are frozen dataclasses of plain values; encode()/decode() turn them into JSON-ready dicts and back, decode()
checking every field's type and range (a peer's message is never trusted). An agent's messages carry a request id
that the response echoes; each is idempotent, so a repeat after a lost answer is safe."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from enum import Enum, StrEnum
from functools import cache
from typing import Any, get_args, get_origin, get_type_hints

from san.model import Host, VDisk, Zone

Entry = tuple[int, int, int]
PROTOCOL_VERSION = 4  # 2: heartbeats carry the session census; 3: each session, as `san session list` shows it;
# 4: alternate locations (copy-on-write) in reports, answers and commands
MAX_TEXT = 1 << 16
MAX_ITEMS = 1 << 16
LOAD_CHUNK = 1024  # a fault on an INVALID entry is answered with the aligned chunk of this many segments around it


class Op(StrEnum):
    """What a Command asks an agent to do (the seed's command set, plus container attachment)."""

    CREATE_TABLE = "create_table"
    DELETE_TABLE = "delete_table"
    GROW_TABLE = "grow_table"
    GET_ENTRIES = "get_entries"
    SET_ENTRIES = "set_entries"
    SET_STATE = "set_state"
    CLEAR_STATE = "clear_state"
    SET_ALTERNATES = "set_alternates"
    MARK_ALTERNATES = "mark_alternates"
    ATTACH_CONTAINER = "attach_container"
    DETACH_CONTAINER = "detach_container"
    REVOKE_GRANT = "revoke_grant"


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
    FENCED = "fenced"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Register:
    """Agent -> controller, first on every connection: who it is and the protocol it speaks. Answered by Registered
    (a new epoch and the lease) or a FAIL Response."""

    name: str
    version: int = PROTOCOL_VERSION
    request: int = 0


@dataclass(frozen=True)
class Registered:
    """The answer to Register: this registration's epoch and the lease (seconds) a heartbeat renews."""

    epoch: int
    lease: float
    request: int = 0


@dataclass(frozen=True)
class SessionInfo:
    """One iSCSI session on a gateway: who, from where, its digests and the LUNs it sees."""

    initiator: str
    address: str
    isid: str
    tsih: int
    header_digest: bool
    data_digest: bool
    luns: tuple[int, ...] = ()


@dataclass(frozen=True)
class Heartbeat:
    """Agent -> controller: renew the lease of this epoch (FAIL with FENCED: the epoch is over, register again), with
    the iSCSI sessions the gateway has now."""

    epoch: int
    request: int = 0
    sessions: tuple[SessionInfo, ...] = ()


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
class Alternate:
    """An entry's alternate location: vdisk segment vseg's blocks in `runs` ((first block, count) pairs) live at
    (container, segment). In a report or a MARK_ALTERNATES command the runs are added to those already there (a
    bitmap too fragmented for one message goes in several); in an answer or SET_ALTERNATES they are all of them.
    writable: the agent may write there itself (copy on write; it reports the blocks it writes)."""

    vseg: int
    container: int
    segment: int
    runs: tuple[tuple[int, int], ...] = ()
    writable: bool = False


@dataclass(frozen=True)
class Allocated:
    """Agent -> controller: segments of a grant now hold these vdisk segments, as (vdisk segment, container, segment),
    or are alternate locations (copy on write) of these entries, holding these blocks."""

    vdisk: int
    entries: tuple[Entry, ...]
    request: int = 0
    alternates: tuple[Alternate, ...] = ()


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
    alternates: tuple[Alternate, ...] = ()
    bits: int = 0
    blocking: bool = False
    nsegments: int = 0
    segment_blocks: int = 0
    block_size: int = 0
    nblocks: int = 0
    container: int = 0
    path: str = ""
    uuid: str = ""
    store: str = ""
    request: int = 0


@dataclass(frozen=True)
class Config:
    """Controller -> agent: everything its gateway serves, whole, after registration and after every change: the
    ready vdisks, the hosts (with their CHAP credentials: the link is mutual TLS) and zones, and the pools above
    their space threshold. version grows with every change; an older one than the gateway holds is ignored."""

    version: int
    vdisks: tuple[VDisk, ...] = ()
    hosts: tuple[Host, ...] = ()
    zones: tuple[Zone, ...] = ()
    above_threshold: tuple[int, ...] = ()
    request: int = 0


@dataclass(frozen=True)
class Response:
    """The answer to a message: the outcome, entries to install from start (with the alternate locations of some),
    and maybe a grant of zeroed segments (container, segment) the agent may map for this vdisk's first writes on its
    own, or take as alternate locations for copy on write, reporting them in Allocated."""

    action: Action = Action.OK
    start: int = 0
    entries: tuple[Entry, ...] = ()
    reason: Reason = Reason.NONE
    message: str = ""
    grant: tuple[tuple[int, int], ...] = ()
    request: int = 0
    alternates: tuple[Alternate, ...] = ()

    def answering(self, request: int) -> Response:
        """This answer, for the request with that id (spelled out: dataclasses.replace costs more per fault)."""
        return Response(self.action, self.start, self.entries, self.reason, self.message, self.grant, request, self.alternates)


Message = Register | Registered | Heartbeat | Fault | Allocated | Release | Flush | Command | Config | Response
_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls for cls in (Register, Registered, Heartbeat, Fault, Allocated, Release, Flush, Command, Config, Response)
}


def encode(message: Message) -> dict[str, Any]:
    """A JSON-ready dict for a message (tuples stay tuples: json writes them as arrays; the model objects of a
    Config become dicts). Not dataclasses.asdict(), which deep-copies every entry: that was most of a fault's cost."""
    body: dict[str, Any] = {"type": type(message).__name__}
    for name in _NAMES[type(message).__name__]:
        value = getattr(message, name)
        if value and name in _OBJECTS:
            value = [asdict(item) for item in value]
        body[name] = value
    return body


def decode(data: dict[str, Any]) -> Message:
    """The message a dict from encode() describes; ValueError on anything else (an unknown type or field, a missing
    field, a value of the wrong type or out of range)."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str) or data["type"] not in _TYPES:
        raise ValueError(f"not a message: {_short(data)}")
    body = {key: value for key, value in data.items() if key != "type"}
    message = _build(_TYPES[data["type"]], body, data["type"])
    assert isinstance(message, (Register, Registered, Heartbeat, Fault, Allocated, Release, Flush, Command, Config, Response))
    return message


_OBJECTS = frozenset({"vdisks", "hosts", "zones", "sessions", "alternates"})
_NAMES = {name: tuple(f.name for f in fields(cls)) for name, cls in _TYPES.items()}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _build(cls: type, body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise ValueError(f"{where}: an object expected")
    names = {f.name for f in fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(map(str, unknown))[:5]}")
    hints = _hints(cls)
    values = {key: _value(hints[key], value, f"{where}.{key}") for key, value in body.items()}
    try:
        return cls(**values)
    except TypeError:
        missing = sorted(f.name for f in fields(cls) if f.name not in body)
        raise ValueError(f"{where}: missing fields {missing}") from None


def _value(kind: Any, value: Any, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: true or false expected")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
            raise ValueError(f"{where}: a 64-bit integer expected")
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: a number expected")
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{where}: a number expected, not one of {len(str(value))} digits") from None
        if not math.isfinite(number):
            raise ValueError(f"{where}: a number expected")
        return number
    if kind is str:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ValueError(f"{where}: a string of at most {MAX_TEXT} characters expected")
        return value
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{where}: not one of {[e.value for e in kind]}") from None
    if get_origin(kind) is tuple:
        args = get_args(kind)
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            raise ValueError(f"{where}: a list of at most {MAX_ITEMS} items expected")
        if len(args) == 2 and args[1] is Ellipsis:
            row = get_args(args[0])
            if row and all(arg is int for arg in row):
                return _int_rows(value, len(row), where)
            return tuple(_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: {len(args)} items expected")
        return tuple(_value(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True)))
    if isinstance(kind, type) and is_dataclass(kind):
        return _build(kind, value, where)
    raise TypeError(f"{where}: no decoder for {kind!r}")


def _int_rows(value: list[Any], width: int, where: str) -> tuple[tuple[int, ...], ...]:
    """A list of rows of `width` 64-bit integers (map entries, grants): checked in one tight loop."""
    rows = []
    for i, item in enumerate(value):
        if type(item) is not list or len(item) != width:
            raise ValueError(f"{where}[{i}]: {width} items expected")
        for number in item:
            if type(number) is not int or not -(2**63) <= number < 2**63:
                raise ValueError(f"{where}[{i}]: a 64-bit integer expected")
        rows.append(tuple(item))
    return tuple(rows)


def _short(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 80 else text[:77] + "..."
