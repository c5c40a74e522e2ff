# cython: language_level=3, boundscheck=False, wraparound=False
"""A TCMU device's command ring, walked in C: commands are copied out as fetched (or plain READ/WRITE done here, straight
between containers and the data area), and answers go, in any order, into the entry at cmd_tail as TCMU asks."""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from san._fastmap cimport (
    IO_READ, IO_WRITE, MapTable, extent_t, fault_t, io_account, mark_written, san_now_ns, translate_fast)
from san.agent._blockio cimport DIRECT_FD, read_nowait, transfer

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint32_t san_load_acquire(const volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void san_store_release(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    uint32_t san_load_acquire(const uint32_t *p) nogil
    void san_store_release(uint32_t *p, uint32_t v) nogil

cdef extern from *:
    """
    /* The TCMU mailbox and ring entries (include/uapi/linux/target_core_user.h, mailbox version 2), written out
       here because that header's <linux/uio.h> clashes with glibc's <sys/uio.h>; the offsets are checked. */
    #include <stddef.h>
    #include <sys/uio.h>
    struct san_tcmu_mailbox {
        uint16_t version; uint16_t flags; uint32_t cmdr_off; uint32_t cmdr_size; uint32_t cmd_head;
        uint32_t cmd_tail __attribute__((__aligned__(64)));
    } __attribute__((packed));
    struct san_tcmu_hdr { uint32_t len_op; uint16_t cmd_id; uint8_t kflags; uint8_t uflags; } __attribute__((packed));
    struct san_tcmu_req {
        uint32_t iov_cnt; uint32_t iov_bidi_cnt; uint32_t iov_dif_cnt; uint64_t cdb_off; uint64_t pad1; uint64_t pad2;
        struct iovec iov[0];
    };
    struct san_tcmu_rsp { uint8_t scsi_status; uint8_t pad1; uint16_t pad2; uint32_t read_len; char sense_buffer[96]; };
    struct san_tcmu_entry {
        struct san_tcmu_hdr hdr;
        union { struct san_tcmu_req req; struct san_tcmu_rsp rsp; };
    } __attribute__((packed));
    _Static_assert(offsetof(struct san_tcmu_mailbox, cmd_head) == 12, "cmd_head");
    _Static_assert(offsetof(struct san_tcmu_mailbox, cmd_tail) == 64, "cmd_tail");
    _Static_assert(offsetof(struct san_tcmu_entry, req.cdb_off) == 24, "cdb_off");
    _Static_assert(offsetof(struct san_tcmu_entry, req.iov) == 48, "iov");
    _Static_assert(offsetof(struct san_tcmu_entry, rsp.read_len) == 12, "read_len");
    _Static_assert(offsetof(struct san_tcmu_entry, rsp.sense_buffer) == 16, "sense_buffer");
    _Static_assert(sizeof(struct san_tcmu_entry) == 112, "entry size");
    enum {
        TCMU_MAILBOX_VERSION = 2, TCMU_MAILBOX_FLAG_CAP_OOOC = 1, TCMU_MAILBOX_FLAG_CAP_READ_LEN = 2,
        TCMU_OP_PAD = 0, TCMU_OP_CMD = 1, TCMU_OP_TMR = 2, TCMU_OP_MASK = 7,
        TCMU_UFLAG_READ_LEN = 2, TCMU_SENSE_BUFFERSIZE = 96
    };
    """
    enum:
        TCMU_MAILBOX_VERSION
        TCMU_MAILBOX_FLAG_CAP_OOOC
        TCMU_MAILBOX_FLAG_CAP_READ_LEN
        TCMU_OP_PAD
        TCMU_OP_CMD
        TCMU_OP_TMR
        TCMU_UFLAG_READ_LEN
        TCMU_SENSE_BUFFERSIZE
        TCMU_OP_MASK

    ctypedef struct tcmu_mailbox "struct san_tcmu_mailbox":
        uint16_t version
        uint16_t flags
        uint32_t cmdr_off
        uint32_t cmdr_size
        uint32_t cmd_head
        uint32_t cmd_tail

    ctypedef struct tcmu_cmd_entry_hdr "struct san_tcmu_hdr":
        uint32_t len_op
        uint16_t cmd_id
        uint8_t kflags
        uint8_t uflags

    ctypedef struct tcmu_iovec "struct iovec":
        void *iov_base
        size_t iov_len

    ctypedef struct tcmu_req "struct san_tcmu_req":
        uint32_t iov_cnt
        uint32_t iov_bidi_cnt
        uint32_t iov_dif_cnt
        uint64_t cdb_off
        tcmu_iovec iov[1]

    ctypedef struct tcmu_rsp "struct san_tcmu_rsp":
        uint8_t scsi_status
        uint32_t read_len
        char sense_buffer[96]

    ctypedef struct tcmu_cmd_entry "struct san_tcmu_entry":
        tcmu_cmd_entry_hdr hdr
        tcmu_req req
        tcmu_rsp rsp


cdef enum:
    MAX_EXTENTS = 64
    READ_10 = 0x28
    READ_16 = 0x88
    WRITE_10 = 0x2A
    WRITE_16 = 0x8A
    SLOW_FLAGS = 0xE8  # RDPROTECT/WRPROTECT and FUA: the SCSI layer handles those (DPO is only a hint)

PAD = TCMU_OP_PAD
CMD = TCMU_OP_CMD
TMR = TCMU_OP_TMR


cdef inline uint32_t _cdb_length(const uint8_t *cdb) noexcept nogil:
    """The length of a CDB from its operation code's group (SPC-4 4.2.5), variable-length CDBs by their byte 7."""
    cdef uint8_t group = cdb[0] >> 5
    if group == 0:
        return 6
    if group == 1 or group == 2:
        return 10
    if group == 4:
        return 16
    if group == 5:
        return 12
    if cdb[0] == 0x7F:
        return 8 + cdb[7]
    return 16


cdef inline uint64_t _be(const uint8_t *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef int _blocks(MapTable table, const int[:] fds, uint64_t lba, uint64_t nblocks, uint8_t *buf, bint write,
                 set written) except -1:
    """Move whole blocks between the containers and buf when the map table has every one of them at hand: 0 done,
    1 not done here (a fault, data not in the page cache, an I/O error: the SCSI layer redoes it and reports)."""
    cdef extent_t ext[MAX_EXTENTS]
    cdef fault_t fault
    cdef int n = translate_fast(table, lba, nblocks, write, ext, MAX_EXTENTS, &fault)
    cdef int i, err = 0, done = 0
    cdef uint64_t at = 0
    if n < 0:
        return 1
    for i in range(n):
        if ext[i].container >= fds.shape[0] or (ext[i].container >= 0 and fds[ext[i].container] < 0):
            return 1
        if write and (ext[i].container < 0 or fds[ext[i].container] & DIRECT_FD):
            return 1  # an O_DIRECT write waits for the device: not on the event loop
    cdef int slot = table.io_start_c()
    with nogil:
        for i in range(n):
            if ext[i].container < 0:
                memset(buf + at, 0, ext[i].length)
            elif write:
                err = transfer(fds[ext[i].container], buf + at, ext[i].length, ext[i].offset, True)
            else:
                err = read_nowait(fds[ext[i].container], buf + at, ext[i].length, ext[i].offset)
            if err:
                break
            done += 1
            at += ext[i].length
    if write and not err:  # before the I/O counts as ended: a barrier waiting for it sees its bits set
        mark_written(table, lba, nblocks)
    table.io_end_c(slot)
    if write:
        for i in range(done + (1 if err else 0)):
            written.add(ext[i].container)
    return 1 if err else 0


class RingError(Exception):
    """The mapped area is not a TCMU mailbox this handler understands."""


cdef class Ring:
    """One UIO device's mapped area: the mailbox, the command ring and the data area behind it."""

    cdef Py_buffer buffer
    cdef bint held
    cdef uint8_t *base
    cdef tcmu_mailbox *mailbox
    cdef uint32_t next
    cdef public object memory

    def __cinit__(self, area):
        PyObject_GetBuffer(area, &self.buffer, PyBUF_WRITABLE)
        self.held = True
        self.base = <uint8_t *>self.buffer.buf
        self.mailbox = <tcmu_mailbox *>self.base

    def __init__(self, area):
        if self.buffer.len < 128 or self.mailbox.version != TCMU_MAILBOX_VERSION:
            self.release()
            raise RingError(f"unknown TCMU mailbox version {self.mailbox.version if self.buffer.len >= 2 else None}")
        if (self.mailbox.cmdr_off < sizeof(tcmu_mailbox) or self.mailbox.cmdr_size < sizeof(tcmu_cmd_entry)
                or <uint64_t>self.mailbox.cmdr_off + <uint64_t>self.mailbox.cmdr_size > <uint64_t>self.buffer.len):
            self.release()
            raise RingError("the command ring lies outside the mapped area")
        if not self.mailbox.flags & TCMU_MAILBOX_FLAG_CAP_OOOC:
            self.release()
            raise RingError("the kernel does not accept out-of-order completions")
        self.memory = memoryview(area)
        self.next = self.mailbox.cmd_tail

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.buffer)

    def release(self):
        """Let go of the mapped area (after which the ring must not be used)."""
        self.memory = None
        if self.held:
            PyBuffer_Release(&self.buffer)
            self.held = False

    def fetch(self):
        """The commands queued since the last fetch: (cmd_id, cdb, iovecs as ((offset, length), ...), bidi count).
        PAD and TMR entries are passed over (TMRs are the kernel's notice of aborts it handles itself)."""
        return self._walk(None, None, 0, False, None)[0]

    def serve(self, MapTable table, const int[:] fds, uint64_t nblocks, bint writes, set written, bint count=True):
        """fetch(), but plain READ/WRITE 10/16 (no FUA, DPO or protection; writes only when `writes`) whose blocks
        the map table has at hand are carried out here and answered GOOD, and counted in the table's I/O statistics
        when `count`. Returns (the other commands, as fetch() gives them, and how many were answered). Written
        containers are added to `written` (they need a flush)."""
        return self._walk(table, fds, nblocks, writes, written, count)

    cdef tuple _walk(self, MapTable table, const int[:] fds, uint64_t nblocks, bint writes, set written,
                     bint counting=False):
        if not self.held:
            return [], 0
        cdef list found = []
        cdef int answered = 0
        cdef uint32_t head = san_load_acquire(&self.mailbox.cmd_head)
        cdef uint32_t size = self.mailbox.cmdr_size
        cdef uint8_t *ring = self.base + self.mailbox.cmdr_off
        cdef tcmu_cmd_entry *entry
        cdef uint32_t length, i, cdb_len
        cdef uint16_t cmd_id
        cdef uint64_t offset, count, limit = <uint64_t>self.buffer.len
        cdef const uint8_t *cdb
        cdef uint64_t arrived = 0, moved
        cdef bint write
        if head >= size or head % 8:
            raise RingError(f"cmd_head {head} is not a place in a {size}-byte ring")
        while self.next != head:
            entry = <tcmu_cmd_entry *>(ring + self.next)
            length = entry.hdr.len_op & ~(<uint32_t>TCMU_OP_MASK)
            if length == 0 or length > size - self.next:
                raise RingError(f"corrupt ring entry at {self.next}")
            if entry.hdr.len_op & TCMU_OP_MASK != TCMU_OP_CMD:
                self.next = (self.next + length) % size
                continue
            if length < sizeof(tcmu_cmd_entry):
                raise RingError(f"command entry at {self.next} too short for its answer")
            count = <uint64_t>entry.req.iov_cnt + <uint64_t>entry.req.iov_bidi_cnt
            if count > (length - 48) // 16:
                raise RingError(f"more iovecs than entry {self.next} holds")
            offset = entry.req.cdb_off
            if offset > limit - 16:
                raise RingError(f"CDB outside the mapped area at entry {self.next}")
            cdb = self.base + offset
            for i in range(count):
                offset = <uint64_t>entry.req.iov[i].iov_base
                if offset > limit or <uint64_t>entry.req.iov[i].iov_len > limit - offset:
                    raise RingError(f"data buffer outside the mapped area at entry {self.next}")
            cmd_id = entry.hdr.cmd_id
            self.next = (self.next + length) % size  # this entry's slot may take an answer from here on
            if counting:
                arrived = san_now_ns()
            if table is not None and self._fast(entry, cdb, table, fds, nblocks, writes, written):
                write = cdb[0] == WRITE_10 or cdb[0] == WRITE_16
                moved = self._data_length(entry)
                self.complete(cmd_id, 0, b"", -1 if write else <long>moved)
                if counting:
                    io_account(table, IO_WRITE if write else IO_READ, moved, arrived)
                answered += 1
                continue
            cdb_len = _cdb_length(cdb)
            offset = entry.req.cdb_off
            if cdb_len > limit - offset:
                cdb_len = <uint32_t>(limit - offset)
            iovs = []
            for i in range(count):
                iovs.append((<uint64_t>entry.req.iov[i].iov_base, entry.req.iov[i].iov_len))
            found.append((cmd_id, PyBytes_FromStringAndSize(<char *>cdb, cdb_len), tuple(iovs), entry.req.iov_bidi_cnt))
        return found, answered

    cdef uint64_t _data_length(self, tcmu_cmd_entry *entry):
        cdef uint64_t total = 0
        cdef uint32_t i
        for i in range(entry.req.iov_cnt):
            total += entry.req.iov[i].iov_len
        return total

    cdef bint _fast(self, tcmu_cmd_entry *entry, const uint8_t *cdb, MapTable table, const int[:] fds,
                    uint64_t nblocks, bint writes, set written) except -1:
        """Carry out a plain READ/WRITE 10/16 entirely here; False leaves it (untouched, or to be redone whole) to
        the SCSI layer."""
        cdef uint8_t opcode = cdb[0]
        cdef uint64_t lba, count, at, piece
        cdef uint32_t i
        cdef uint32_t block_size = table.block_size
        cdef bint write = opcode == WRITE_10 or opcode == WRITE_16
        if opcode == READ_10 or opcode == WRITE_10:
            lba, count = _be(cdb + 2, 4), _be(cdb + 7, 2)
        elif opcode == READ_16 or opcode == WRITE_16:
            lba, count = _be(cdb + 2, 8), _be(cdb + 10, 4)
        else:
            return False
        if cdb[1] & SLOW_FLAGS or count == 0 or (write and not writes) or entry.req.iov_bidi_cnt:
            return False
        if lba >= nblocks or count > nblocks - lba or count * block_size != self._data_length(entry):
            return False  # out of range, or an expected length that differs from the CDB's: the SCSI layer says so
        at = lba
        for i in range(entry.req.iov_cnt):
            piece = entry.req.iov[i].iov_len
            if piece % block_size:
                return False
            if _blocks(table, fds, at, piece // block_size, self.base + <uint64_t>entry.req.iov[i].iov_base, write,
                       written):
                return False
            at += piece // block_size
        return True

    def complete(self, uint16_t cmd_id, uint8_t status, const uint8_t[:] sense, long read_len=-1):
        """Answer one command: status, sense (for CHECK CONDITION) and, when read_len >= 0, how many bytes of data-in
        are valid. Written into the next entry at cmd_tail (the kernel finds the command by its id); cmd_tail moves
        on. The caller then notifies the kernel (one notification may cover many completions)."""
        if not self.held:
            return
        cdef uint32_t size = self.mailbox.cmdr_size
        cdef uint32_t tail = self._first_unanswered()
        if tail == self.next:
            raise RingError(f"completion of command {cmd_id} with none outstanding")
        cdef tcmu_cmd_entry *entry = <tcmu_cmd_entry *>(self.base + self.mailbox.cmdr_off + tail)
        entry.hdr.cmd_id = cmd_id
        entry.hdr.uflags = 0
        entry.rsp.scsi_status = status
        if read_len >= 0 and self.mailbox.flags & TCMU_MAILBOX_FLAG_CAP_READ_LEN:
            entry.hdr.uflags = TCMU_UFLAG_READ_LEN
            entry.rsp.read_len = <uint32_t>read_len
        cdef Py_ssize_t n = min(sense.shape[0], TCMU_SENSE_BUFFERSIZE)
        memset(entry.rsp.sense_buffer, 0, TCMU_SENSE_BUFFERSIZE)
        if n:
            memcpy(entry.rsp.sense_buffer, &sense[0], n)
        tail = (tail + (entry.hdr.len_op & ~(<uint32_t>TCMU_OP_MASK))) % size
        san_store_release(&self.mailbox.cmd_tail, tail)

    def skip_idle(self):
        """Move cmd_tail over PAD and TMR entries that lie before the first unanswered command (their ring space
        comes back without waiting for the next answer)."""
        if not self.held:
            return
        cdef uint32_t tail = self._first_unanswered()
        if tail != self.mailbox.cmd_tail:
            san_store_release(&self.mailbox.cmd_tail, tail)

    cdef uint32_t _first_unanswered(self) except? 0xFFFFFFFF:
        """Where the first command entry at or after cmd_tail lies (passing PAD and TMR entries): the slot the next
        answer goes into; self.next when no command is outstanding."""
        cdef uint32_t size = self.mailbox.cmdr_size
        cdef uint8_t *ring = self.base + self.mailbox.cmdr_off
        cdef uint32_t tail = self.mailbox.cmd_tail
        cdef tcmu_cmd_entry *entry
        if tail >= size:
            raise RingError(f"cmd_tail {tail} is not a place in a {size}-byte ring")
        while tail != self.next:
            entry = <tcmu_cmd_entry *>(ring + tail)
            if entry.hdr.len_op & TCMU_OP_MASK == TCMU_OP_CMD:
                break
            tail = (tail + (entry.hdr.len_op & ~(<uint32_t>TCMU_OP_MASK))) % size
        return tail

    def gather(self, iovs, Py_ssize_t limit) -> bytearray:
        """Copy up to limit bytes of data-out from the iovecs into one buffer (for commands split across blocks)."""
        if not self.held:
            raise RingError("the ring was released")
        cdef Py_ssize_t total = 0, n
        for offset, length in iovs:
            total += length
        total = min(total, limit)
        out = bytearray(total)
        cdef uint8_t *dst = <uint8_t *><char *>out
        cdef Py_ssize_t at = 0
        for offset, length in iovs:
            if at >= total:
                break
            n = min(<Py_ssize_t>length, total - at)
            memcpy(dst + at, self.base + <Py_ssize_t>offset, n)
            at += n
        return out

    def scatter(self, iovs, const uint8_t[:] data) -> int:
        """Copy data-in into the iovecs; returns the bytes placed."""
        if not self.held:
            return 0
        cdef Py_ssize_t at = 0, n
        cdef Py_ssize_t total = data.shape[0]
        for offset, length in iovs:
            if at >= total:
                break
            n = min(<Py_ssize_t>length, total - at)
            memcpy(self.base + <Py_ssize_t>offset, &data[at], n)
            at += n
        return at
