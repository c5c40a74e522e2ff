"""The API's objects as the typed client returns them: Pool (with its Containers), VDisk, Host (with its Zones),
Zone and Status. from_json(answer).to_json() gives the answer back unchanged, fields added by a newer server too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Model")


@dataclass
class Model:
    """A JSON object of the API: its known keys as typed fields, the rest kept in extra."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset()  # keys the API leaves out at times: absent when None
    NESTED: ClassVar[dict[str, type[Model]]] = {}  # keys holding lists of other models
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls: type[M], data: dict[str, Any]) -> M:
        """The object from an API answer; a missing required key is a ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        missing = sorted(known - cls.OPTIONAL - set(data))
        if missing:
            raise ValueError(f"a {cls.__name__} from the API lacks {', '.join(missing)}")
        values: dict[str, Any] = {}
        for key in known & set(data):
            nested = cls.NESTED.get(key)
            values[key] = [nested.from_json(item) for item in data[key]] if nested is not None else data[key]
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """The object as the API gives it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            out[f.name] = [item.to_json() for item in value] if f.name in self.NESTED else value
        return {**out, **self.extra}


@dataclass
class Container(Model):
    id: int = 0
    pool_id: int = 0
    path: str = ""
    kind: str = ""
    size_bytes: int = 0
    nsegments: int = 0
    owned: bool = True
    uuid: str = ""


@dataclass
class Pool(Model):
    NESTED: ClassVar[dict[str, type[Model]]] = {"containers": Container}

    name: str = ""
    id: int = 0
    segment_size: int = 0
    warn_percent: int = 0
    allocate_ahead: int = 0
    state: str = "online"
    problem: str = ""
    capacity_bytes: int = 0
    used_bytes: int = 0
    free_bytes: int = 0
    provisioned_bytes: int = 0
    used_percent: float = 0.0
    vdisks: int = 0
    containers: list[Container] = field(default_factory=list)


@dataclass
class VDisk(Model):
    name: str = ""
    id: int = 0
    pool_id: int = 0
    pool: str = ""
    size_bytes: int = 0
    block_size: int = 512
    thin: bool = True
    serial: str = ""
    state: str = "ready"
    allocated_bytes: int = 0
    progress: float = 1.0
    origin: int = 0
    generation: int = 0
    created: str = ""
    snapshot_of: str | None = None
    snapshots: list[str] = field(default_factory=list)

    @property
    def data_percent(self) -> float:
        """Allocated over size, as lvs shows Data%."""
        return 100 * self.allocated_bytes / self.size_bytes if self.size_bytes else 0.0


@dataclass
class Zone(Model):
    host: str = ""
    vdisk: str = ""
    lun: int = 0
    read_only: bool = False


@dataclass
class Host(Model):
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"chap_secret", "mutual_secret", "warnings"})
    NESTED: ClassVar[dict[str, type[Model]]] = {"zones": Zone}

    name: str = ""
    id: int = 0
    iqn: str = ""
    chap_user: str = ""
    mutual_user: str = ""
    zones: list[Zone] = field(default_factory=list)
    sessions: int | None = None
    chap_secret: str | None = None  # only from hosts(secrets=True)
    mutual_secret: str | None = None
    warnings: list[str] | None = None  # only from create_host()


@dataclass
class Gateway(Model):
    name: str = ""
    epoch: int = 0
    state: str = ""  # joining, serving or fenced
    lease_seconds: float | None = None  # None: inside `san serve`, no lease
    registrations: int = 0
    sessions: dict[str, int] = field(default_factory=dict)  # initiator -> iSCSI sessions there


@dataclass
class Status(Model):
    version: str = ""
    data_dir: str = ""
    uptime_seconds: float = 0.0
    pools: int = 0
    pools_offline: int = 0
    vdisks: int = 0
    agents: int = 0
    hosts: int = 0
    zones: int = 0
    gateways: list[str] = field(default_factory=list)
    sessions: int = 0
    target: str | None = None  # the iSCSI target name (None on a controller: its gateways serve)
    portals: list[str] = field(default_factory=list)
    frontend: str | None = None  # iscsi (built-in) or lio


@dataclass
class Session(Model):
    """One iSCSI session on a gateway."""

    gateway: str = ""
    host: str | None = None  # the host whose iSCSI name it logged in with (None: not a known host, open access)
    initiator: str = ""
    address: str = ""
    isid: str = ""
    tsih: int = 0
    header_digest: bool = False
    data_digest: bool = False
    luns: list[int] = field(default_factory=list)
