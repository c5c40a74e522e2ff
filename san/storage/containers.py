"""Container files and block devices: create, open, size, read/write extents, zero ranges, flush.

Zeroing uses fallocate(PUNCH_HOLE), then ZERO_RANGE, then plain zero writes, whichever the container supports."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


class ContainerError(Exception):
    """A container cannot be created, opened or used; the message says which and why."""


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def device_size(path: str) -> int:
    """Size in bytes of a file or block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_unused_device(path: str) -> None:
    """Refuse a block device that is mounted or held by another user (an exclusive open fails with EBUSY)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ContainerError(f"{path} is in use (mounted, or held by another program)") from None
        raise ContainerError(f"cannot open {path}: {exc.strerror}") from None
    os.close(fd)


def create_sparse_file(path: str, size: int) -> None:
    """Create a new sparse file of the given size; refuse to overwrite an existing one."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ContainerError(f"{path} already exists") from None
    except OSError as exc:
        raise ContainerError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise ContainerError(f"cannot size {path} to {size} bytes: {exc.strerror}") from None
    os.close(fd)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def open_container(path: str) -> int:
    """Open a container for reading and writing."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ContainerError(f"cannot open container {path}: {exc.strerror}") from None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2); 0 on success, else the errno."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros, freeing the space where the container can."""
    for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
        error = _fallocate(fd, mode, offset, length)
        if error == 0:
            return
        if error not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
            raise OSError(error, os.strerror(error))
    zeros = bytes(min(length, ZERO_CHUNK))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)


MAX_CONTAINER_ID = 0xFFFF


@dataclass
class ContainerSet:
    """Open containers by id, with the set written since the last flush."""

    fds: dict[int, int] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    # The same fds as a C array indexed by container id (-1: not attached), for the agent's Cython I/O path.
    fd_table: array[int] = field(default_factory=lambda: array("i", [-1]) * (MAX_CONTAINER_ID + 1))

    def attach(self, container_id: int, path: str) -> None:
        if self.paths.get(container_id) == path:
            return
        if not 0 <= container_id <= MAX_CONTAINER_ID:
            raise ContainerError(f"container id {container_id} is out of range")
        self.detach(container_id)
        self.fds[container_id] = self.fd_table[container_id] = open_container(path)
        self.paths[container_id] = path

    def detach(self, container_id: int) -> None:
        fd = self.fds.pop(container_id, None)
        self.paths.pop(container_id, None)
        if 0 <= container_id <= MAX_CONTAINER_ID:
            self.fd_table[container_id] = -1
        self.dirty.discard(container_id)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for container_id in list(self.fds):
            self.detach(container_id)

    def fd(self, container_id: int) -> int:
        try:
            return self.fds[container_id]
        except KeyError:
            raise ContainerError(f"container {container_id} is not attached") from None

    def read_into(self, container_id: int, offset: int, buffer: memoryview) -> None:
        """Fill buffer from the container at offset; past the end of the container reads as an error."""
        fd = self.fd(container_id)
        done = 0
        while done < len(buffer):
            count = os.preadv(fd, [buffer[done:]], offset + done)
            if count == 0:
                raise ContainerError(f"container {container_id} ends before byte {offset + done}")
            done += count

    def write_from(self, container_id: int, offset: int, buffer: memoryview) -> None:
        fd = self.fd(container_id)
        done = 0
        while done < len(buffer):
            done += os.pwritev(fd, [buffer[done:]], offset + done)
        self.dirty.add(container_id)

    def zero(self, container_id: int, runs: Iterable[tuple[int, int]]) -> None:
        """Zero byte runs (offset, length) of a container; flush() makes it durable."""
        fd = self.fd(container_id)
        for offset, length in runs:
            zero_range(fd, offset, length)
        self.dirty.add(container_id)

    def flush(self, container_ids: Iterable[int] | None = None) -> None:
        """fdatasync the named containers, or, with none named, those written or zeroed since their last flush."""
        targets = set(self.dirty) if container_ids is None else set(container_ids)
        for container_id in sorted(targets):
            self.dirty.discard(container_id)
            try:
                os.fdatasync(self.fd(container_id))
            except OSError:
                self.dirty.add(container_id)
                raise
