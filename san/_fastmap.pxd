# cython: language_level=3
# The C-level interface of the agent's map table, for other Cython modules (cimport san._fastmap).
# translate_c() and the I/O gate take no Python objects; io_start_c()/io_end_c() need the GIL held.
# Entries live in pages of PAGE_ENTRIES behind a directory; a page that is all INVALID or all ZERO is one shared,
# read-only page, so a table costs memory for the segments it maps, not for the size of its vdisk.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    ST_INVALID = 1
    ST_NOWRITE = 2
    ST_ZERO = 4
    ST_ERROR = 8
    ST_SHARED = 16  # with NOWRITE: the primary is shared with a snapshot or clone, so a write copies on write

cdef enum:
    ALT_WRITABLE = 1  # writes to the entry land here, every block of them; their bits are set once written
    ALT_DIRTY = 2     # bits were set here since they were last taken for a report to the controller
    ALT_FROZEN = 4    # was writable until a snapshot: no write goes here any more, those in flight still set bits

cdef enum:
    PAGE_SHIFT = 10
    PAGE_ENTRIES = 1024

ctypedef struct entry_t:
    uint32_t segment      # physical segment in the container
    uint32_t alt          # index into the alternate-location array, or NO_ALT
    uint16_t container
    uint8_t state
    uint8_t pad

ctypedef struct alt_t:
    uint32_t segment
    uint32_t owner        # the entry it belongs to
    uint16_t container
    uint8_t used
    uint8_t flags         # ALT_WRITABLE, ALT_DIRTY
    uint64_t *bitmap      # one bit per block of the segment: set = block lives here

ctypedef struct extent_t:
    int64_t container     # -1: zeros, no I/O
    uint64_t offset       # byte offset in the container
    uint64_t length       # bytes

ctypedef struct fault_t:
    uint64_t segment
    uint32_t state

# Per-vdisk I/O statistics, one set per kind of command, counted in C by the frontends and read at scrape time.
cdef enum:
    IO_READ = 0
    IO_WRITE = 1
    IO_UNMAP = 2
    IO_FLUSH = 3
    IO_KINDS = 4
    LATENCY_BUCKETS = 20  # the bounds below, then +Inf

cdef extern from *:
    """
    #include <time.h>
    /* Upper bounds (ns) of the latency histogram's buckets: 10 us to 10 s, roughly 1-2.5-5 per decade. */
    static const unsigned long long san_latency_bounds[19] = {
        10000ULL, 25000ULL, 50000ULL, 100000ULL, 250000ULL, 500000ULL, 1000000ULL, 2500000ULL, 5000000ULL,
        10000000ULL, 25000000ULL, 50000000ULL, 100000000ULL, 250000000ULL, 500000000ULL, 1000000000ULL,
        2500000000ULL, 5000000000ULL, 10000000000ULL};
    static inline unsigned long long san_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
    }
    """
    const unsigned long long san_latency_bounds[19]
    unsigned long long san_now_ns() nogil

ctypedef struct iostat_t:
    uint64_t commands     # completed GOOD
    uint64_t bytes        # moved by them (read, written, unmapped)
    uint64_t errors       # completed with any other status
    uint64_t latency_ns   # sum over the GOOD ones, arrival to response
    uint64_t buckets[LATENCY_BUCKETS]  # per bucket, not cumulative


cdef class MapTable:
    cdef entry_t **pages
    cdef uint64_t npages
    cdef uint64_t private_pages
    cdef alt_t *alts
    cdef uint32_t nalts
    cdef uint32_t alts_cap
    cdef uint32_t free_alt
    cdef readonly uint32_t dirty
    cdef readonly uint64_t nsegments
    cdef readonly uint32_t block_size
    cdef readonly uint32_t segment_blocks
    cdef uint32_t block_shift
    cdef uint32_t seg_shift
    cdef uint32_t bitmap_words
    cdef uint64_t io_count[2]
    cdef int cur_slot
    cdef bint draining
    cdef bint firing
    cdef list waiters
    cdef list next_waiters
    cdef iostat_t stats[IO_KINDS]

    cdef int translate_c(self, uint64_t lba, uint64_t nblocks, bint is_write,
                         extent_t *out, int max_out, fault_t *fault) noexcept nogil
    cdef int io_start_c(self) noexcept
    cdef void io_end_c(self, int slot)
    cdef void _start_drain(self)
    cdef entry_t *_writable(self, uint64_t segment) except NULL
    cdef void _share_uniform(self, uint64_t start, uint64_t stop) noexcept
    cdef uint32_t _new_alt(self) except? 0xFFFFFFFF
    cdef void _drop_alt(self, uint64_t segment) noexcept


cdef inline entry_t *entry_at(MapTable table, uint64_t segment) noexcept nogil:
    """The entry of a segment inside the table (for reading: a shared page must never be written)."""
    return &table.pages[segment >> PAGE_SHIFT][segment & (PAGE_ENTRIES - 1)]


cdef inline int translate_fast(MapTable table, uint64_t lba, uint64_t nblocks, bint is_write,
                               extent_t *out, int max_out, fault_t *fault) noexcept nogil:
    """translate_c() with the common case inlined into the caller: a request inside one plain, usable entry."""
    cdef uint64_t off = lba & (table.segment_blocks - 1)
    cdef entry_t *entry = entry_at(table, lba >> table.seg_shift)
    cdef uint8_t state = entry.state
    if off + nblocks <= table.segment_blocks and entry.alt == <uint32_t>-1 and max_out > 0:
        if state == 0 or ((state & ~ST_SHARED) == ST_NOWRITE and not is_write):
            out[0].container = entry.container
            out[0].offset = ((<uint64_t>entry.segment << table.seg_shift) + off) << table.block_shift
            out[0].length = nblocks << table.block_shift
            return 1
        if state == ST_ZERO and not is_write:
            out[0].container = -1
            out[0].offset = 0
            out[0].length = nblocks << table.block_shift
            return 1
    return table.translate_c(lba, nblocks, is_write, out, max_out, fault)


cdef inline void mark_written(MapTable table, uint64_t lba, uint64_t nblocks) noexcept nogil:
    """After a write of blocks [lba, lba+nblocks) (in range) has completed: set their bits in the writable
    alternate locations it went to, so that reads find them there; an alternate with new bits becomes dirty."""
    cdef uint64_t seg = lba >> table.seg_shift
    cdef uint64_t off = lba & (table.segment_blocks - 1)
    cdef uint64_t stop, b, bit
    cdef entry_t *entry
    cdef alt_t *alt
    cdef bint changed
    while nblocks:
        stop = off + nblocks if off + nblocks < table.segment_blocks else table.segment_blocks
        entry = entry_at(table, seg)
        if entry.alt != <uint32_t>-1:
            alt = &table.alts[entry.alt]
            if alt.flags & (ALT_WRITABLE | ALT_FROZEN):
                changed = False
                for b in range(off, stop):
                    bit = 1ULL << (b & 63)
                    if not alt.bitmap[b >> 6] & bit:
                        alt.bitmap[b >> 6] |= bit
                        changed = True
                if changed and not alt.flags & ALT_DIRTY:
                    alt.flags |= ALT_DIRTY
                    table.dirty += 1
        nblocks -= stop - off
        off = 0
        seg += 1


cdef extern from *:
    void __builtin_prefetch(const void *addr) nogil


cdef inline void prefetch_entry(MapTable table, uint64_t lba) noexcept nogil:
    """Start loading lba's entry into cache; a frontend holding a batch of commands calls it ahead of translate_fast()."""
    if lba < (table.nsegments << table.seg_shift):
        __builtin_prefetch(entry_at(table, lba >> table.seg_shift))


cdef inline void io_account(MapTable table, int kind, uint64_t nbytes, uint64_t arrived_ns) noexcept nogil:
    """Count one command of `kind` that completed GOOD, moved nbytes and arrived at arrived_ns (san_now_ns())."""
    cdef iostat_t *stat = &table.stats[kind]
    cdef unsigned long long now = san_now_ns()
    cdef uint64_t took = now - arrived_ns if now > arrived_ns else 0
    cdef int bucket = 0
    stat.commands += 1
    stat.bytes += nbytes
    stat.latency_ns += took
    while bucket < LATENCY_BUCKETS - 1 and took > san_latency_bounds[bucket]:
        bucket += 1
    stat.buckets[bucket] += 1


cdef inline int io_kind(int opcode) noexcept nogil:
    """The I/O kind of a SCSI operation code (SBC-3), -1 for commands that are not counted."""
    if opcode == 0x28 or opcode == 0x88 or opcode == 0x08 or opcode == 0xA8:  # READ 10, 16, 6, 12
        return IO_READ
    if (opcode == 0x2A or opcode == 0x8A or opcode == 0x0A or opcode == 0xAA  # WRITE 10, 16, 6, 12
            or opcode == 0x2E or opcode == 0x8E or opcode == 0xAE  # WRITE AND VERIFY 10, 16, 12
            or opcode == 0x89 or opcode == 0x41 or opcode == 0x93):  # COMPARE AND WRITE, WRITE SAME 10, 16
        return IO_WRITE
    if opcode == 0x42:  # UNMAP
        return IO_UNMAP
    if opcode == 0x35 or opcode == 0x91:  # SYNCHRONIZE CACHE 10, 16
        return IO_FLUSH
    return -1


cdef inline void io_account_reply(MapTable table, int opcode, int status, uint64_t sent, uint64_t moved, bint unmapped,
                                  uint64_t arrived_ns) noexcept nogil:
    """Count one answered command by its operation code (see MapTable.account_reply)."""
    cdef int kind = io_kind(opcode)
    if kind < 0:
        return
    if status != 0:
        table.stats[kind].errors += 1
    elif kind == IO_READ:
        io_account(table, kind, sent, arrived_ns)
    else:
        io_account(table, IO_UNMAP if unmapped else kind, moved, arrived_ns)
