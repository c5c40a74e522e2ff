# cython: language_level=3, boundscheck=False, wraparound=False
"""The agent's hot path in C: translate a request through the map table and pread/pwrite its extents with the GIL
released, straight into or out of the caller's buffer. A fault is reported back, not resolved: the caller does that."""

from libc.errno cimport EAGAIN
from libc.stdint cimport uint64_t
from libc.string cimport memset

from san._fastmap cimport IO_READ, IO_WRITE, MapTable, extent_t, fault_t, io_account, mark_written, translate_fast

DIRECT = DIRECT_FD  # or-ed into a container's fd table entry when it is open with O_DIRECT

cdef enum:
    MAX_EXTENTS = 64

FAULT = 1
DONE = 0
AGAIN = 2  # with nowait: the data is not in the page cache, so reading it would block


def read_blocks(MapTable table, const int[:] fds, uint64_t lba, uint64_t nblocks, unsigned char[:] out,
                bint nowait=False, uint64_t arrived_ns=0) -> int:
    """Read blocks [lba, lba+nblocks), already checked to be in range, into out. DONE, or FAULT with nothing read,
    or with nowait AGAIN when some of the data is not in the page cache (the caller reads it in a thread instead);
    OSError on an I/O error. Zero extents are filled without I/O. With arrived_ns (san_now_ns() when the command came
    in), a read that is DONE is counted in the table's I/O statistics here, with no Python."""
    cdef extent_t ext[MAX_EXTENTS]
    cdef fault_t fault
    cdef int n = translate_fast(table, lba, nblocks, False, ext, MAX_EXTENTS, &fault)
    cdef int i, err = 0, failed = -1
    cdef uint64_t at = 0
    cdef int fd
    if n < 0:
        return FAULT
    if <uint64_t>out.shape[0] < nblocks * table.block_size:
        raise ValueError("buffer too small")
    cdef unsigned char *base = &out[0] if out.shape[0] else NULL
    for i in range(n):
        if ext[i].container >= 0 and (ext[i].container >= fds.shape[0] or fds[ext[i].container] < 0):
            raise OSError(f"container {ext[i].container} is not attached")
    cdef int slot = table.io_start_c()
    with nogil:
        for i in range(n):
            if ext[i].container < 0:
                memset(base + at, 0, ext[i].length)
            else:
                fd = fds[ext[i].container]
                if nowait:
                    err = read_nowait(fd, base + at, ext[i].length, ext[i].offset)
                else:
                    err = transfer(fd, base + at, ext[i].length, ext[i].offset, False)
                if err:
                    failed = i
                    break
            at += ext[i].length
    table.io_end_c(slot)
    if err == EAGAIN and nowait:
        return AGAIN
    if err:
        raise OSError(err if err > 0 else 5, f"reading container {ext[failed].container} at byte {ext[failed].offset}")
    if arrived_ns:
        io_account(table, IO_READ, nblocks * table.block_size, arrived_ns)
    return DONE


def write_blocks(MapTable table, const int[:] fds, uint64_t lba, const unsigned char[:] data, set written,
                 bint nowait=False, uint64_t arrived_ns=0) -> int:
    """Write data (whole blocks) at lba when every block is mapped for writing: DONE, or FAULT with nothing written,
    or with nowait AGAIN with nothing written when a container is open with O_DIRECT (the write waits for the device:
    the caller does it in a thread). The containers written are added to `written` (they need a flush before the
    data is durable). A write into a writable alternate location sets its bits there once it is done. With
    arrived_ns, a write that is DONE is counted as read_blocks() counts a read."""
    cdef extent_t ext[MAX_EXTENTS]
    cdef fault_t fault
    cdef uint64_t nblocks = data.shape[0] // table.block_size
    cdef int n = translate_fast(table, lba, nblocks, True, ext, MAX_EXTENTS, &fault)
    cdef int i, err = 0, failed = -1
    cdef uint64_t at = 0
    if n < 0:
        return FAULT
    for i in range(n):
        if ext[i].container < 0 or ext[i].container >= fds.shape[0] or fds[ext[i].container] < 0:
            raise OSError(f"container {ext[i].container} is not attached")
        if nowait and fds[ext[i].container] & DIRECT_FD:
            return AGAIN
    cdef const unsigned char *base = &data[0] if data.shape[0] else NULL
    cdef int slot = table.io_start_c()
    with nogil:
        for i in range(n):
            err = transfer(fds[ext[i].container], <unsigned char *>base + at, ext[i].length, ext[i].offset, True)
            if err:
                failed = i
                break
            at += ext[i].length
    if not err:  # before the I/O counts as ended: a barrier waiting for it sees its bits set
        mark_written(table, lba, nblocks)
    table.io_end_c(slot)
    for i in range(n if not err else failed + 1):
        written.add(ext[i].container)
    if err:
        raise OSError(err if err > 0 else 5, f"writing container {ext[failed].container} at byte {ext[failed].offset}")
    if arrived_ns:
        io_account(table, IO_WRITE, data.shape[0], arrived_ns)
    return DONE


def read_at(int fdv, unsigned char[:] out, uint64_t offset) -> None:
    """Fill out from a container's fd table entry at offset (GIL released; an O_DIRECT one through a bounce buffer
    when out is not aligned). OSError on an I/O error, EOFError when the container ends first."""
    cdef int err
    if out.shape[0] == 0:
        return
    with nogil:
        err = transfer(fdv, &out[0], out.shape[0], offset, False)
    if err < 0:
        raise EOFError(f"the container ends before byte {offset + out.shape[0]}")
    if err:
        raise OSError(err, f"reading at byte {offset}")


def write_at(int fdv, const unsigned char[:] data, uint64_t offset) -> None:
    """Write data to a container's fd table entry at offset (as read_at)."""
    cdef int err
    if data.shape[0] == 0:
        return
    with nogil:
        err = transfer(fdv, <unsigned char *>&data[0], data.shape[0], offset, True)
    if err < 0:
        raise EOFError(f"the container ends before byte {offset + data.shape[0]}")
    if err:
        raise OSError(err, f"writing at byte {offset}")
