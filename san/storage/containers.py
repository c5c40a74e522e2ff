"""Container files and block devices: create, claim (open exclusively), size, read/write extents, zero, flush.

Zeroing uses fallocate(PUNCH_HOLE), then ZERO_RANGE, then plain zero writes, whichever the container supports. A
gateway opens shared containers with direct I/O (set_direct), so its reads never come from a stale page cache."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

from san.agent._blockio import DIRECT, read_at, write_at
from san.storage.label import LABEL_BYTES, Label, LabelError, read_label
from san.storage.label import decode as decode_label
from san.storage.paths import identity, open_nofollow, unlink_nofollow

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


def inspect(path: str) -> tuple[os.stat_result, int]:
    """(stat, size in bytes) of an existing file or block device, opened without following links or blocking (a
    FIFO put in its place cannot hang san)."""
    try:
        fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ContainerError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        return os.fstat(fd), os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_unused_device(path: str) -> None:
    """Refuse a block device that is mounted or held by another user (an exclusive open fails with EBUSY)."""
    try:
        fd = open_nofollow(path, os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ContainerError(f"{path} is in use (mounted, or held by another program)") from None
        raise ContainerError(f"cannot open {path}: {exc.strerror or exc}") from None
    os.close(fd)


def create_sparse_file(path: str, size: int) -> tuple[int, int]:
    """Create a new sparse file of the given size, mode 0600; refuse to overwrite an existing one or to follow a
    link. Its (st_dev, st_ino), so that the caller can tell it is still the same file when it opens it again."""
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ContainerError(f"{path} already exists") from None
    except OSError as exc:
        raise ContainerError(f"cannot create {path}: {exc.strerror or exc}") from None
    made = identity(fd)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        unlink_nofollow(path, made)
        raise ContainerError(f"cannot size {path} to {size} bytes: {exc.strerror}") from None
    os.close(fd)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return made


def open_container(path: str, claim: bool = False) -> int:
    """Open a container (a regular file or a block device) for reading and writing, following no link. With
    claim, hold it exclusively for as long as it stays open: a block device with O_EXCL (mkfs, mount and other
    claimants get EBUSY), a file with an exclusive lock."""
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_NONBLOCK | (os.O_EXCL if claim else 0))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ContainerError(f"{path} is in use (mounted, or held by another program)") from None
        raise ContainerError(f"cannot open container {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise ContainerError(f"{path} is neither a regular file nor a block device")
    os.set_blocking(fd, True)
    if claim and stat.S_ISREG(mode):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ContainerError(f"{path} is in use by another program (it holds a lock on it)") from None
    return fd


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2); 0 on success, else the errno."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV)


def zero_range(fd: int, offset: int, length: int, keep_allocated: bool = False) -> None:
    """Make [offset, offset+length) read as zeros, freeing the space where the container can; with keep_allocated
    the blocks stay allocated in the file system (a thick vdisk's space must exist, not merely be promised)."""
    if keep_allocated:
        error = _fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)
        if error in UNSUPPORTED:  # tmpfs and others: punch, then allocate again
            zero_range(fd, offset, length)
            allocate_range(fd, offset, length)
        elif error:
            raise OSError(error, os.strerror(error))
        return
    for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
        error = _fallocate(fd, mode, offset, length)
        if error == 0:
            return
        if error not in UNSUPPORTED:
            raise OSError(error, os.strerror(error))
    _write_zeros(fd, offset, length)


def allocate_range(fd: int, offset: int, length: int) -> None:
    """Make the file system allocate [offset, offset+length) of a file now; OSError(ENOSPC) when it has no room.
    Contents stay, except on a file system without fallocate, where the range is written with zeros. Block devices
    have all their blocks already."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return
    error = _fallocate(fd, 0, offset, length)
    if error == 0:
        return
    if error not in UNSUPPORTED:
        raise OSError(error, os.strerror(error))
    _write_zeros(fd, offset, length)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, ZERO_CHUNK))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)


def wipe_label(fd: int) -> None:
    """Zero a container's label (the storage is no longer a container of any store) and make that durable."""
    os.pwrite(fd, bytes(LABEL_BYTES), 0)
    os.fdatasync(fd)


def find_labeled_devices(container_uuid: str, store_id: str) -> list[str]:
    """The block devices whose label names this container of this store (containers are known by label, so a
    device that moved, such as a loop device attached again under another number, is found where it is now; more
    than one means a clone or snapshot, and the caller takes none)."""
    try:
        names = sorted(os.listdir("/sys/class/block"))
    except OSError:
        return []
    found = [path for path in (os.path.join("/dev", n) for n in names) if carries_label(path, container_uuid, store_id)]
    return _outermost(found)


def carries_label(path: str, container_uuid: str, store_id: str, follow: bool = True) -> bool:
    """Whether the device or file at path carries the label of this container of this store (unreadable: no)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        label = read_label(fd)
    except (OSError, LabelError):
        return False
    finally:
        os.close(fd)
    return label is not None and label.container_uuid == container_uuid and label.store_id == store_id


def _outermost(devices: list[str]) -> list[str]:
    """Of devices showing the same bytes, those no other one of them is built on: a multipath map over its paths,
    an md mirror over its disks show the label on each; only the device on top is the container."""
    names = {os.path.basename(d) for d in devices}

    def held(device: str) -> bool:
        try:
            holders = os.listdir(os.path.join("/sys/class/block", os.path.basename(device), "holders"))
        except OSError:
            return False
        return any(holder in names for holder in holders)

    return [d for d in devices if not held(d)]


MAX_CONTAINER_ID = 0xFFFF


@dataclass
class ContainerSet:
    """Open containers by id, with the set written since the last flush."""

    fds: dict[int, int] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    direct: dict[int, int] = field(default_factory=dict)  # containers open with O_DIRECT -> their I/O alignment
    # The same fds as a C array indexed by container id (-1: not attached), for the agent's Cython I/O path.
    fd_table: array[int] = field(default_factory=lambda: array("i", [-1]) * (MAX_CONTAINER_ID + 1))

    def attach(self, container_id: int, path: str, claim: bool = False) -> int:
        """Open a container under its id (claim: exclusively, see open_container); its fd."""
        if self.paths.get(container_id) == path:
            return self.fds[container_id]
        if not 0 <= container_id <= MAX_CONTAINER_ID:
            raise ContainerError(f"container id {container_id} is out of range")
        fd = open_container(path, claim)
        self.detach(container_id)
        self.fds[container_id] = self.fd_table[container_id] = fd
        self.paths[container_id] = path
        return fd

    def detach(self, container_id: int) -> None:
        fd = self.fds.pop(container_id, None)
        self.paths.pop(container_id, None)
        if 0 <= container_id <= MAX_CONTAINER_ID:
            self.fd_table[container_id] = -1
        self.dirty.discard(container_id)
        self.direct.pop(container_id, None)
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

    def set_direct(self, container_id: int) -> int:
        """Bypass the page cache for an attached container from now on (O_DIRECT): what another host wrote to shared
        storage is read from the storage. Returns the alignment its offsets and lengths need (512 or 4096 bytes);
        ContainerError when the file system cannot do direct I/O."""
        fd = self.fd(container_id)
        path = self.paths[container_id]
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as exc:
            raise ContainerError(f"{path} cannot be opened with direct I/O: {exc.strerror or exc}") from None
        with mmap.mmap(-1, mmap.PAGESIZE) as page:  # page-aligned memory, as O_DIRECT wants
            for alignment in (512, 4096):
                try:
                    os.preadv(fd, [memoryview(page)[:alignment]], 0)
                    break
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise ContainerError(f"cannot read {path} with direct I/O: {exc.strerror or exc}") from None
            else:
                raise ContainerError(f"{path} takes no direct I/O of 512 or 4096 bytes")
        self.direct[container_id] = alignment
        self.fd_table[container_id] = fd | DIRECT
        return alignment

    def label(self, container_id: int) -> Label | None:
        """The label of an attached container, read through its fd table entry (so also with O_DIRECT)."""
        self.fd(container_id)
        buffer = bytearray(LABEL_BYTES)
        try:
            read_at(self.fd_table[container_id], buffer, 0)
        except EOFError:
            raise LabelError(f"container {container_id} is too small to hold a label") from None
        return decode_label(bytes(buffer))

    def read_into(self, container_id: int, offset: int, buffer: memoryview) -> None:
        """Fill buffer from the container at offset; past the end of the container reads as an error."""
        self.fd(container_id)
        try:
            read_at(self.fd_table[container_id], buffer, offset)
        except EOFError:
            raise ContainerError(f"container {container_id} ends before byte {offset + len(buffer)}") from None

    def write_from(self, container_id: int, offset: int, buffer: memoryview) -> None:
        self.fd(container_id)
        try:
            write_at(self.fd_table[container_id], buffer, offset)
        except EOFError:
            raise ContainerError(f"container {container_id} ends before byte {offset + len(buffer)}") from None
        self.dirty.add(container_id)

    def zero(self, container_id: int, runs: Iterable[tuple[int, int]], keep_allocated: bool = False) -> None:
        """Zero byte runs (offset, length) of a container (see zero_range); flush() makes it durable."""
        fd = self.fd(container_id)
        for offset, length in runs:
            zero_range(fd, offset, length, keep_allocated)
        self.dirty.add(container_id)

    def allocate(self, container_id: int, runs: Iterable[tuple[int, int]]) -> None:
        """Have the file system allocate byte runs (offset, length) of a container now (see allocate_range)."""
        fd = self.fd(container_id)
        for offset, length in runs:
            allocate_range(fd, offset, length)
        self.dirty.add(container_id)

    def flush(self, container_ids: Iterable[int] | None = None) -> None:
        """fdatasync the named containers, or, with none named, those written or zeroed since their last flush."""
        taken = self.take_dirty(container_ids)
        try:
            self.sync(taken)
        except OSError:
            self.dirty.update(container_id for container_id, _ in taken)
            raise

    def take_dirty(self, container_ids: Iterable[int] | None = None) -> list[tuple[int, int]]:
        """(container id, fd) of the named containers, or of those written since their last flush, which count as
        clean from now on: sync() them (in any thread), and mark them dirty again if that fails."""
        targets = set(self.dirty) if container_ids is None else set(container_ids)
        self.dirty.difference_update(targets)
        return [(container_id, self.fd(container_id)) for container_id in sorted(targets)]

    @staticmethod
    def sync(taken: list[tuple[int, int]]) -> None:
        for _, fd in taken:
            os.fdatasync(fd)
