"""The label san writes into the first segment of every container: which store, pool and container it belongs to.

Checked on every open, so a container is known by its label, never by its path; a CRC32C guards it against damage."""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass

import crc32c

MAGIC = b"SANLABEL"
VERSION = 1
LABEL_BYTES = 4096
# magic, version, crc, store id, container uuid, epoch, container id, pool id, segment size, segments, pool name
_FORMAT = ">8sII16s16s16sIIQQ64s"
_CRC_AT = 12


class LabelError(Exception):
    """A container holds no san label, a damaged one, or one that belongs elsewhere; the message says which."""


@dataclass(frozen=True)
class Label:
    """Who a container belongs to. epoch changes each time a store takes the container over, so a stale copy of
    the store (a copied data directory, a restored backup) can tell that someone else has used it since."""

    store_id: str
    container_uuid: str
    epoch: str
    container_id: int
    pool_id: int
    segment_size: int
    nsegments: int
    pool_name: str

    def encode(self) -> bytes:
        body = struct.pack(
            _FORMAT,
            MAGIC,
            VERSION,
            0,
            uuid.UUID(self.store_id).bytes,
            uuid.UUID(self.container_uuid).bytes,
            uuid.UUID(self.epoch).bytes,
            self.container_id,
            self.pool_id,
            self.segment_size,
            self.nsegments,
            self.pool_name.encode(),
        ).ljust(LABEL_BYTES, b"\0")
        crc = crc32c.crc32c(body)
        return body[:_CRC_AT] + crc.to_bytes(4, "big") + body[_CRC_AT + 4 :]

    def with_epoch(self, epoch: str) -> Label:
        return Label(
            self.store_id,
            self.container_uuid,
            epoch,
            self.container_id,
            self.pool_id,
            self.segment_size,
            self.nsegments,
            self.pool_name,
        )


def decode(data: bytes) -> Label | None:
    """The label in a container's first bytes; None when there is none (no magic); LabelError when it is damaged."""
    if len(data) < LABEL_BYTES or data[:8] != MAGIC:
        return None
    block = data[:LABEL_BYTES]
    stored = int.from_bytes(block[_CRC_AT : _CRC_AT + 4], "big")
    if crc32c.crc32c(block[:_CRC_AT] + bytes(4) + block[_CRC_AT + 4 :]) != stored:
        raise LabelError("its san label is damaged (checksum mismatch)")
    fields = struct.unpack_from(_FORMAT, block)
    if fields[1] != VERSION:
        raise LabelError(f"its san label has version {fields[1]}; this san reads version {VERSION}")
    return Label(
        str(uuid.UUID(bytes=fields[3])),
        str(uuid.UUID(bytes=fields[4])),
        str(uuid.UUID(bytes=fields[5])),
        fields[6],
        fields[7],
        fields[8],
        fields[9],
        fields[10].rstrip(b"\0").decode(errors="replace"),
    )


def read_label(fd: int) -> Label | None:
    """The label of an open container (None if it has none)."""
    return decode(os.pread(fd, LABEL_BYTES, 0))


def write_label(fd: int, label: Label) -> None:
    """Write a label and make it durable before returning."""
    data = label.encode()
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)
    os.fdatasync(fd)


def new_id() -> str:
    return str(uuid.uuid4())
