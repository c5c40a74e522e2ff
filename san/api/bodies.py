"""The bodies the management API accepts: strict pydantic models, unknown fields refused, strings bounded.

Sizes are bytes or a size string like 100G (parsed by san.units); secrets never appear in an answer or a log."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from san.errors import InvalidRequest
from san.model import DEFAULT_ALLOCATE_AHEAD, DEFAULT_BLOCK_SIZE, DEFAULT_SEGMENT_SIZE, DEFAULT_WARN_PERCENT
from san.units import MAX_SIZE, parse_size

Name = Annotated[str, Field(max_length=255)]
Secret = Annotated[str, Field(max_length=255)]
Size = Annotated[int, Field(ge=0, le=MAX_SIZE)] | Annotated[str, Field(max_length=64)]


def size_of(value: int | str | None) -> int | None:
    """Bytes in a size field; InvalidRequest (400) for anything parse_size refuses."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


class PoolCreate(BaseModel):
    """POST /pools: a pool on a new sparse file (size), an unused block device, or an existing file (existing)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name
    size: Size | None = Field(None, description="bytes, or a size like 100G")
    path: Annotated[str, Field(max_length=4096)] | None = Field(
        None, description="new file, block device, or (with existing) a file under an --allow-path directory"
    )
    existing: bool = Field(False, description="take over an existing regular file (its contents are overwritten)")
    segment_size: Size = Field(DEFAULT_SEGMENT_SIZE, description="power of two from 64K to 1G")
    warn_percent: int = DEFAULT_WARN_PERCENT
    allocate_ahead: int = DEFAULT_ALLOCATE_AHEAD


class VDiskCreate(BaseModel):
    """POST /vdisks: thin by default; thick allocates every segment (answer 202 while that runs)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name
    pool: Name
    size: Size
    thick: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in (512, 4096):
            raise ValueError("must be 512 or 4096")
        return value


class SnapshotCreate(BaseModel):
    """POST /vdisks/{name}/snapshots: the snapshot's name (it is {name}@{snapshot name} from then on)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name


class VDiskGrow(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    size: Size


class HostCreate(BaseModel):
    """POST /hosts: an initiator by iSCSI name; CHAP credentials make it prove who it is."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name
    iqn: Annotated[str, Field(max_length=223)]
    chap_user: Secret = ""
    chap_secret: Secret = ""
    mutual_user: Secret = ""
    mutual_secret: Secret = ""


class ZoneCreate(BaseModel):
    """POST /zones: let a host see a vdisk, at a LUN (default the lowest free one), maybe read-only."""

    model_config = ConfigDict(extra="forbid", strict=True)
    host: Name
    vdisk: Name
    lun: Annotated[int, Field(ge=0, le=16383)] | None = None
    read_only: bool = False


class VDiskRename(BaseModel):
    """POST /vdisks/{name}/rename."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name


class HostModify(BaseModel):
    """PATCH /hosts/{name}: a new iSCSI name or CHAP credentials; a field left out keeps its value, chap_user ""
    removes CHAP (and mutual CHAP with it)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    iqn: Annotated[str, Field(max_length=223)] | None = None
    chap_user: Secret | None = None
    chap_secret: Secret | None = None
    mutual_user: Secret | None = None
    mutual_secret: Secret | None = None


class ZoneModify(BaseModel):
    """PATCH /zones/{host}/{vdisk}: another LUN, or read-only on or off; a field left out keeps its value."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lun: Annotated[int, Field(ge=0, le=16383)] | None = None
    read_only: bool | None = None
