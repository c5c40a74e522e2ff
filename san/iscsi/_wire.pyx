# cython: language_level=3, boundscheck=False, wraparound=False
"""The per-PDU byte work of the iSCSI target in C: building a 48-byte basic header segment in one call, and reading
the fields of a SCSI Command header at once. Profiling showed these struct calls among the hottest lines per command."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset

from san._fastmap cimport IO_READ, MapTable, io_account_reply

from san.scsi.sense import Status

GOOD = Status.GOOD


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


def header(int opcode, int flags, Py_ssize_t data_length, int lun, uint32_t itt, uint32_t w20=0, uint32_t w24=0,
           uint32_t w28=0, uint32_t w32=0, uint32_t w36=0, uint32_t w40=0, uint32_t w44=0, int byte2=0,
           int byte3=0) -> bytes:
    """A basic header segment: opcode, flags, bytes 2-3, the data segment length, the LUN (-1: all zeros), the
    initiator task tag and the seven 32-bit fields of bytes 20-47."""
    if not 0 <= data_length < (1 << 24):
        raise ValueError(f"data segment of {data_length} bytes")
    out = PyBytes_FromStringAndSize(NULL, 48)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    memset(p, 0, 48)
    p[0] = opcode
    p[1] = flags
    p[2] = byte2
    p[3] = byte3
    p[5] = (data_length >> 16) & 0xFF
    p[6] = (data_length >> 8) & 0xFF
    p[7] = data_length & 0xFF
    if lun >= 256:
        p[8] = 0x40 | ((lun >> 8) & 0x3F)
        p[9] = lun & 0xFF
    elif lun >= 0:
        p[9] = lun
    put32(p + 16, itt)
    put32(p + 20, w20)
    put32(p + 24, w24)
    put32(p + 28, w28)
    put32(p + 32, w32)
    put32(p + 36, w36)
    put32(p + 40, w40)
    put32(p + 44, w44)
    return out


def command_fields(const uint8_t[:] bhs) -> tuple:
    """(flags, lun, itt, expected data transfer length, CmdSN) of a SCSI Command basic header segment."""
    if bhs.shape[0] < 48:
        raise ValueError("short header")
    cdef const uint8_t *p = &bhs[0]
    cdef int method = p[8] >> 6
    cdef int lun = (((p[8] & 0x3F) << 8) | p[9]) if method < 2 else 0xFFFF
    return p[1], lun, get32(p + 16), get32(p + 20), get32(p + 24)


def account(object luns, object task, object reply) -> None:
    """Count a completed task in its vdisk's I/O statistics, when the fast path did not (reads and writes done
    there are counted in C as they complete): luns is the session's LUN view, a read counts the Data-In bytes sent,
    so for a fast read that sent fewer than its blocks (an overflow) the rest is taken back. A unit that is
    retired, or whose vdisk has no table here, counts nothing."""
    zoned = luns.get(task.lun)
    if zoned is None:
        return
    disk = zoned.disk
    if disk.retired:
        return
    volume = disk.agent.volumes.get(disk.vdisk)
    if volume is None:
        return
    cdef MapTable table = volume.table
    cdef Py_ssize_t sent = 0
    if task.read:
        sent = min(len(reply.data), <Py_ssize_t>task.edtl)
    if reply.counted:
        table.stats[IO_READ].bytes -= <Py_ssize_t>len(reply.data) - sent
        return
    status = reply.status
    cdef int code = 0 if status is GOOD else <int>status  # an IntEnum's conversion to int is the slow part
    io_account_reply(table, task.cdb[0], code, sent, reply.moved, reply.unmapped, task.arrived)
