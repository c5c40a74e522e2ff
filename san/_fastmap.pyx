# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The agent's map table: 12-byte entries in pages of 1024 behind a directory, translation of I/O into extents.

Entries carry a container id, a physical segment, state bits and an optional alternate location with a block bitmap.
A page whose entries are all INVALID or all ZERO is one shared read-only page, copied when first written."""

from collections import namedtuple

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

INVALID = ST_INVALID
NOWRITE = ST_NOWRITE
ZERO = ST_ZERO
ERROR = ST_ERROR
SHARED = ST_SHARED
ALL_STATES = ST_INVALID | ST_NOWRITE | ST_ZERO | ST_ERROR | ST_SHARED
ZEROS = -1
MAX_CONTAINER = 0xFFFE
MAX_SEGMENT = 0xFFFFFFFE
MAX_ENTRIES = 1 << 32
IO_KIND_NAMES = ("read", "write", "unmap", "flush")  # index: IO_READ, IO_WRITE, IO_UNMAP, IO_FLUSH
READ_IO, WRITE_IO, UNMAP_IO, FLUSH_IO = IO_READ, IO_WRITE, IO_UNMAP, IO_FLUSH
LATENCY_BOUNDS = tuple(san_latency_bounds[i] / 1e9 for i in range(LATENCY_BUCKETS - 1))  # seconds; then +Inf
IOStat = namedtuple("IOStat", "commands bytes errors latency_seconds buckets")

cdef uint32_t NO_ALT = 0xFFFFFFFF
cdef size_t PAGE_BYTES = PAGE_ENTRIES * sizeof(entry_t)
cdef entry_t _invalid_page[PAGE_ENTRIES]
cdef entry_t _zero_page[PAGE_ENTRIES]


cdef void _fill_page(entry_t *page, uint8_t state) noexcept:
    cdef int i
    memset(page, 0, PAGE_BYTES)
    for i in range(PAGE_ENTRIES):
        page[i].alt = NO_ALT
        page[i].state = state


_fill_page(_invalid_page, ST_INVALID)
_fill_page(_zero_page, ST_ZERO)


cdef inline bint _shared(const entry_t *page) noexcept nogil:
    return page == _invalid_page or page == _zero_page

MapFault = namedtuple("MapFault", "segment state")
MapFault.__doc__ = "The first segment that stops a translation, and the state bits that stop it."


cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil


cdef inline int _emit(extent_t *out, int n, int max_out, int64_t container,
                      uint64_t offset, uint64_t length) noexcept nogil:
    """Append an extent, merging it into the previous one when contiguous; -2 when out is full."""
    cdef extent_t *prev
    if n > 0:
        prev = &out[n - 1]
        if prev.container == container and (container < 0 or prev.offset + prev.length == offset):
            prev.length += length
            return n
    if n >= max_out:
        return -2
    out[n].container = container
    out[n].offset = offset if container >= 0 else 0
    out[n].length = length
    return n + 1


cdef inline uint64_t _run_end(const uint64_t *bitmap, uint64_t pos, uint64_t limit, bint bit) noexcept nogil:
    """First block in [pos, limit) whose bitmap bit differs from `bit`, or limit."""
    cdef uint64_t word_index = pos >> 6
    cdef uint64_t word = bitmap[word_index] if not bit else ~bitmap[word_index]
    word &= ~0ULL << (pos & 63)
    while True:
        if word:
            pos = (word_index << 6) + <uint64_t>__builtin_ctzll(word)
            return pos if pos < limit else limit
        word_index += 1
        if (word_index << 6) >= limit:
            return limit
        word = bitmap[word_index] if not bit else ~bitmap[word_index]




def bitmap_runs(const unsigned char[:] bitmap, uint64_t nbits):
    """The runs of set bits of a block bitmap (LSB first, bits past nbits ignored) as [(first, count)]."""
    cdef uint64_t words = (nbits + 63) // 64
    cdef uint64_t *copy
    cdef uint64_t pos = 0, end
    cdef uint64_t nbytes = min(<uint64_t>bitmap.shape[0], (nbits + 7) // 8)
    runs = []
    if nbits == 0:
        return runs
    copy = <uint64_t *>calloc(words, 8)
    if copy == NULL:
        raise MemoryError()
    try:
        if nbytes:
            memcpy(copy, &bitmap[0], nbytes)
        if nbits & 63:
            copy[words - 1] &= (1ULL << (nbits & 63)) - 1
        while pos < nbits:
            pos = _run_end(copy, pos, nbits, False)
            if pos >= nbits:
                break
            end = _run_end(copy, pos, nbits, True)
            runs.append((pos, end - pos))
            pos = end
    finally:
        free(copy)
    return runs


def runs_bitmap(runs, uint64_t nbits, bytes base=b""):
    """A bitmap of nbits bits (bytes, LSB first): base's bits (if given) with those of runs [(first, count)] set;
    ValueError for a run outside [0, nbits)."""
    cdef bytearray out = bytearray((nbits + 7) // 8)
    cdef unsigned char[:] view
    cdef uint64_t b, first, count
    if len(base) > len(out):
        raise ValueError(f"bitmap longer than {len(out)} bytes")
    out[:len(base)] = base
    view = out if len(out) else None
    for run in runs:
        first, count = run
        if count == 0 or first + count > nbits or first + count < first:
            raise ValueError(f"blocks {first}+{count} are outside a segment of {nbits} blocks")
        for b in range(first, first + count):
            view[b >> 3] |= 1 << (b & 7)
    return bytes(out)


cdef class MapTable:
    """A vdisk's volatile map table: every entry starts INVALID, the controller fills it in.

    translate() turns (lba, nblocks, is_write) into extents or a MapFault; io_start()/io_end()
    bracket each I/O so that barrier() can report when every I/O begun before it has ended."""

    def __cinit__(self, uint64_t nsegments, uint32_t segment_blocks, uint32_t block_size=512):
        if segment_blocks == 0 or segment_blocks & (segment_blocks - 1):
            raise ValueError("segment_blocks must be a power of two")
        if block_size == 0 or block_size & (block_size - 1):
            raise ValueError("block_size must be a power of two")
        self.pages = NULL
        self.npages = 0
        self.private_pages = 0
        self.alts = NULL
        self.nsegments = 0
        self.block_size = block_size
        self.segment_blocks = segment_blocks
        self.block_shift = __builtin_ctzll(block_size)
        self.seg_shift = __builtin_ctzll(segment_blocks)
        self.bitmap_words = (segment_blocks + 63) // 64
        self.nalts = 0
        self.alts_cap = 0
        self.free_alt = NO_ALT
        self.dirty = 0
        self.io_count[0] = 0
        self.io_count[1] = 0
        memset(self.stats, 0, sizeof(self.stats))
        self.cur_slot = 0
        self.draining = False
        self.firing = False
        self.waiters = []
        self.next_waiters = []
        self.grow(nsegments)

    def __dealloc__(self):
        cdef uint32_t i
        cdef uint64_t p
        if self.alts != NULL:
            for i in range(self.nalts):
                free(self.alts[i].bitmap)
            free(self.alts)
        if self.pages != NULL:
            for p in range(self.npages):
                if not _shared(self.pages[p]):
                    free(self.pages[p])
            free(self.pages)

    @property
    def segment_bytes(self) -> int:
        return <uint64_t>self.segment_blocks << self.block_shift

    @property
    def nblocks(self) -> int:
        return self.nsegments << self.seg_shift

    @property
    def memory_bytes(self) -> int:
        """What the table holds in memory: its directory, its own (unshared) pages and its alternate locations."""
        return (self.npages * sizeof(entry_t *) + self.private_pages * PAGE_BYTES
                + self.alts_cap * sizeof(alt_t) + self.nalts * self.bitmap_words * 8)

    def grow(self, uint64_t nsegments):
        """Extend the table to nsegments entries; the new entries are INVALID."""
        cdef uint64_t p
        cdef uint64_t npages = (max(nsegments, 1) + PAGE_ENTRIES - 1) >> PAGE_SHIFT
        cdef entry_t **grown
        if nsegments < self.nsegments:
            raise ValueError("a map table cannot shrink")
        if nsegments > MAX_ENTRIES:
            raise ValueError(f"a map table holds at most {MAX_ENTRIES} entries")
        if npages > self.npages:
            grown = <entry_t **>realloc(self.pages, npages * sizeof(entry_t *))
            if grown == NULL:
                raise MemoryError()
            for p in range(self.npages, npages):
                grown[p] = _invalid_page
            self.pages = grown
            self.npages = npages
        self.nsegments = nsegments

    cdef int translate_c(self, uint64_t lba, uint64_t nblocks, bint is_write,
                         extent_t *out, int max_out, fault_t *fault) noexcept nogil:
        """Fill out[] with the extents of an in-range request; return their count, -1 on a fault, -2 if out is full."""
        cdef uint64_t seg = lba >> self.seg_shift
        cdef uint64_t off = lba & (self.segment_blocks - 1)
        cdef uint64_t remaining = nblocks
        cdef uint64_t count, pos, stop, run
        cdef uint32_t bshift = self.block_shift
        cdef uint32_t sshift = self.seg_shift + self.block_shift
        cdef uint8_t state
        cdef entry_t *entry
        cdef alt_t *alt
        cdef bint in_alt
        cdef int n = 0
        while remaining:
            entry = entry_at(self, seg)
            count = self.segment_blocks - off
            if count > remaining:
                count = remaining
            state = entry.state
            if state & (ST_INVALID | ST_ERROR):
                fault.segment = seg
                fault.state = state
                return -1
            alt = &self.alts[entry.alt] if entry.alt != NO_ALT else NULL
            if is_write and state & ST_SHARED and (alt == NULL or not alt.flags & ALT_WRITABLE):
                fault.segment = seg  # shared, and no location of its own to write to yet: copy on write
                fault.state = state
                return -1
            pos = off
            stop = off + count
            while pos < stop:
                if alt != NULL and is_write and alt.flags & ALT_WRITABLE:
                    in_alt = True  # copy on write: the whole write goes there (mark_written() sets its bits)
                    run = stop - pos
                elif alt != NULL:
                    in_alt = (alt.bitmap[pos >> 6] >> (pos & 63)) & 1
                    run = _run_end(alt.bitmap, pos, stop, in_alt) - pos
                else:
                    in_alt = False
                    run = stop - pos
                if in_alt:
                    n = _emit(out, n, max_out, alt.container,
                              (<uint64_t>alt.segment << sshift) + (pos << bshift), run << bshift)
                elif is_write and state & (ST_NOWRITE | ST_ZERO):
                    fault.segment = seg
                    fault.state = state
                    return -1
                elif state & ST_ZERO:
                    n = _emit(out, n, max_out, -1, 0, run << bshift)
                else:
                    n = _emit(out, n, max_out, entry.container,
                              (<uint64_t>entry.segment << sshift) + (pos << bshift), run << bshift)
                if n < 0:
                    return n
                pos += run
            remaining -= count
            off = 0
            seg += 1
        return n

    def translate(self, uint64_t lba, uint64_t nblocks, bint is_write=False):
        """Extents [(container, byte offset, length)] covering the request (container -1: zeros), or a MapFault."""
        cdef extent_t local[16]
        cdef extent_t *out = local
        cdef int max_out = 16
        cdef fault_t fault
        cdef int n, i
        if nblocks == 0 or lba + nblocks > (self.nsegments << self.seg_shift) or lba + nblocks < lba:
            raise ValueError(f"blocks {lba}+{nblocks} are outside the table ({self.nsegments << self.seg_shift} blocks)")
        n = self.translate_c(lba, nblocks, is_write, out, max_out, &fault)
        if n == -2:
            max_out = <int>min(nblocks + 1, 1 << 30)
            out = <extent_t *>malloc(max_out * sizeof(extent_t))
            if out == NULL:
                raise MemoryError()
            n = self.translate_c(lba, nblocks, is_write, out, max_out, &fault)
            if n == -2:
                free(out)
                raise MemoryError("too many extents for one request")
        try:
            if n == -1:
                return MapFault(fault.segment, fault.state)
            return [(out[i].container, out[i].offset, out[i].length) for i in range(n)]
        finally:
            if out != local:
                free(out)

    def get_entries(self, uint64_t start, uint64_t count):
        """Entries [start, start+count) as (container, segment, state, alternate), alternate None or (container,
        segment, bitmap bytes, writable)."""
        cdef uint64_t i
        cdef entry_t *entry
        cdef alt_t *alt
        self._check_range(start, count)
        result = []
        for i in range(start, start + count):
            entry = entry_at(self, i)
            if entry.alt == NO_ALT:
                alternate = None
            else:
                alt = &self.alts[entry.alt]
                alternate = (alt.container, alt.segment,
                             (<char *>alt.bitmap)[:self._bitmap_bytes()], bool(alt.flags & ALT_WRITABLE))
            result.append((entry.container, entry.segment, entry.state, alternate))
        return result

    def set_entries(self, uint64_t start, entries):
        """Replace entries from start with (container, segment, state) triples; their alternate locations are dropped."""
        cdef uint64_t i = start
        cdef uint64_t count = len(entries)
        cdef long container, segment, state
        cdef entry_t *entry
        self._check_range(start, count)
        for triple in entries:
            container, segment, state = triple
            if not 0 <= container <= MAX_CONTAINER or not 0 <= segment <= MAX_SEGMENT or state & ~ALL_STATES:
                raise ValueError(f"bad entry {triple!r}")
        for container, segment, state in entries:
            self._drop_alt(i)
            entry = self._writable(i)
            entry.container = <uint16_t>container
            entry.segment = <uint32_t>segment
            entry.state = <uint8_t>state
            i += 1
        self._share_uniform(start, start + count)

    def fill_invalid(self, uint64_t start, entries):
        """Like set_entries(), but only entries still INVALID are replaced: a reload never undoes a newer change."""
        cdef uint64_t i = start
        cdef long container, segment, state
        cdef entry_t *entry
        self._check_range(start, len(entries))
        for triple in entries:
            container, segment, state = triple
            if not 0 <= container <= MAX_CONTAINER or not 0 <= segment <= MAX_SEGMENT or state & ~ALL_STATES:
                raise ValueError(f"bad entry {triple!r}")
        for container, segment, state in entries:
            if entry_at(self, i).state & ST_INVALID:
                self._drop_alt(i)
                entry = self._writable(i)
                entry.container = <uint16_t>container
                entry.segment = <uint32_t>segment
                entry.state = <uint8_t>state
            i += 1
        self._share_uniform(start, i)

    def invalidate_all(self):
        """Every entry INVALID again (the agent lost its lease): the table costs its directory only, and every
        I/O faults until the controller fills it in anew."""
        cdef uint64_t p, i
        cdef entry_t *page
        for p in range(self.npages):
            page = self.pages[p]
            if _shared(page):
                self.pages[p] = _invalid_page
                continue
            for i in range(PAGE_ENTRIES):
                if page[i].alt != NO_ALT:
                    self._drop_alt((p << PAGE_SHIFT) + i)
            free(page)
            self.pages[p] = _invalid_page
            self.private_pages -= 1

    def set_state(self, uint64_t start, uint64_t count, uint32_t bits):
        """Turn the given state bits on for entries [start, start+count)."""
        cdef uint64_t i
        if bits & ~ALL_STATES or not bits:
            raise ValueError(f"bad state bits {bits:#x}")
        self._check_range(start, count)
        for i in range(start, start + count):
            self._writable(i).state |= <uint8_t>bits

    def share(self, uint64_t start, uint64_t count):
        """Entries [start, start+count) become NOWRITE | SHARED (a snapshot shares them: writes copy on write), but
        those NOWRITE already stay only that: read-only for good, not to be copied on write either."""
        cdef uint64_t i
        cdef uint8_t state
        self._check_range(start, count)
        for i in range(start, start + count):
            state = entry_at(self, i).state
            if state & ST_NOWRITE and not state & ST_SHARED:
                continue
            if state != ST_NOWRITE | ST_SHARED:
                self._writable(i).state = state | ST_NOWRITE | ST_SHARED

    def clear_state(self, uint64_t start, uint64_t count, uint32_t bits):
        """Turn NOWRITE and/or SHARED off for entries [start, start+count); INVALID, ZERO and ERROR void the entry
        and need set_entries()."""
        cdef uint64_t i
        if not bits or bits & ~(ST_NOWRITE | ST_SHARED):
            raise ValueError("only NOWRITE and SHARED can be cleared; INVALID, ZERO and ERROR need a new entry")
        self._check_range(start, count)
        for i in range(start, start + count):
            if entry_at(self, i).state & bits:
                self._writable(i).state &= <uint8_t>~bits

    def set_alternate(self, uint64_t segment, uint32_t container, uint32_t alt_segment, bitmap=None, bint writable=False):
        """Give entry `segment` an alternate location; blocks whose bit is set in bitmap (bytes, LSB first) live there.
        A writable one takes every write to the entry (copy on write), its bits set as writes complete
        (mark_written()); it starts clean: what it holds is known to the controller, or nothing yet."""
        cdef uint32_t index
        cdef entry_t *entry
        cdef const unsigned char[:] view
        self._check_range(segment, 1)
        if container > MAX_CONTAINER or alt_segment > MAX_SEGMENT:
            raise ValueError("bad alternate location")
        if bitmap is not None and len(bitmap) > self._bitmap_bytes():
            raise ValueError(f"bitmap longer than {self._bitmap_bytes()} bytes")
        index = entry_at(self, segment).alt
        if index == NO_ALT:
            entry = self._writable(segment)
            index = self._new_alt()
            entry.alt = index
        elif self.alts[index].flags & ALT_DIRTY:
            self.dirty -= 1
        memset(self.alts[index].bitmap, 0, self.bitmap_words * 8)
        self.alts[index].container = <uint16_t>container
        self.alts[index].segment = alt_segment
        self.alts[index].owner = <uint32_t>segment
        self.alts[index].flags = ALT_WRITABLE if writable else 0
        if bitmap is not None and len(bitmap):
            view = bitmap
            memcpy(self.alts[index].bitmap, &view[0], len(bitmap))
        self._mask_tail(index)

    def mark_alternate(self, uint64_t segment, uint32_t first_block, uint32_t nblocks, bint in_alt=True):
        """Set (or clear) the bitmap bits of blocks [first_block, first_block+nblocks) of entry `segment`."""
        cdef uint32_t b
        cdef alt_t *alt
        self._check_range(segment, 1)
        if entry_at(self, segment).alt == NO_ALT:
            raise ValueError(f"segment {segment} has no alternate location")
        if first_block + nblocks > self.segment_blocks or first_block + nblocks < first_block:
            raise ValueError("blocks outside the segment")
        alt = &self.alts[entry_at(self, segment).alt]
        for b in range(first_block, first_block + nblocks):
            if in_alt:
                alt.bitmap[b >> 6] |= 1ULL << (b & 63)
            else:
                alt.bitmap[b >> 6] &= ~(1ULL << (b & 63))

    def clear_alternate(self, uint64_t segment):
        """Drop entry `segment`'s alternate location: every block reads from the primary again."""
        self._check_range(segment, 1)
        self._drop_alt(segment)

    def mark_written(self, uint64_t lba, uint64_t nblocks):
        """A write of blocks [lba, lba+nblocks) done outside the C path has completed: set its bits in the writable
        alternate locations it went to (as the C path does by itself)."""
        if lba + nblocks > (self.nsegments << self.seg_shift) or lba + nblocks < lba:
            raise ValueError(f"blocks {lba}+{nblocks} are outside the table ({self.nsegments << self.seg_shift} blocks)")
        mark_written(self, lba, nblocks)

    def freeze_alternates(self, uint64_t start, uint64_t count):
        """Entries [start, start+count) are becoming shared (a snapshot): their writable alternate locations take no
        more writes, while those already on their way still set their bits. The entries frozen, for thaw()."""
        cdef uint64_t i
        cdef alt_t *alt
        self._check_range(start, count)
        frozen = []
        for i in range(start, start + count):
            if entry_at(self, i).alt != NO_ALT:
                alt = &self.alts[entry_at(self, i).alt]
                if alt.flags & ALT_WRITABLE:
                    alt.flags = (alt.flags & ~ALT_WRITABLE) | ALT_FROZEN
                    frozen.append(i)
        return frozen

    def thaw(self, segments):
        """The writes that were on their way to these entries' frozen alternate locations have ended (the blocking
        flag): the locations are plain shared ones now."""
        cdef uint64_t segment
        for segment in segments:
            self._check_range(segment, 1)
            if entry_at(self, segment).alt != NO_ALT:
                self.alts[entry_at(self, segment).alt].flags &= ~ALT_FROZEN

    def take_dirty(self):
        """The alternate locations with bits set since they were last taken, as (entry, container, segment,
        bitmap bytes) in entry order; they are clean afterwards (mark_dirty() again if the report fails)."""
        cdef uint32_t i
        cdef alt_t *alt
        found = []
        if not self.dirty:
            return found
        for i in range(self.nalts):
            alt = &self.alts[i]
            if alt.used and alt.flags & ALT_DIRTY:
                alt.flags &= ~ALT_DIRTY
                found.append((alt.owner, alt.container, alt.segment, (<char *>alt.bitmap)[:self._bitmap_bytes()]))
        self.dirty = 0
        found.sort()
        return found

    def mark_dirty(self, uint64_t segment):
        """Entry `segment`'s alternate location is to be reported again (a report of it failed); no-op without one."""
        cdef alt_t *alt
        self._check_range(segment, 1)
        if entry_at(self, segment).alt == NO_ALT:
            return
        alt = &self.alts[entry_at(self, segment).alt]
        if not alt.flags & ALT_DIRTY:
            alt.flags |= ALT_DIRTY
            self.dirty += 1

    def io_start(self) -> int:
        """Mark the start of an I/O; pass the returned slot to io_end()."""
        return self.io_start_c()

    def io_end(self, int slot):
        """Mark the end of an I/O started with io_start()."""
        if slot not in (0, 1) or self.io_count[slot] == 0:
            raise ValueError("io_end without a matching io_start")
        self.io_end_c(slot)

    def barrier(self, callback):
        """Call callback() once every I/O begun before this call has ended (at once if there is none)."""
        if self.draining and not self.firing:
            self.next_waiters.append(callback)
            return
        self.waiters.append(callback)
        if not self.firing:
            self._start_drain()

    def account(self, int kind, uint64_t nbytes, uint64_t arrived_ns):
        """Count a command of kind (READ_IO, WRITE_IO, UNMAP_IO, FLUSH_IO) that completed GOOD having moved nbytes;
        arrived_ns is when it arrived, from time.monotonic_ns()."""
        if not 0 <= kind < IO_KINDS:
            raise ValueError(f"no I/O kind {kind}")
        io_account(self, kind, nbytes, arrived_ns)

    def account_reply(self, int opcode, int status, uint64_t sent, uint64_t moved, bint unmapped, uint64_t arrived_ns):
        """Count one answered SCSI command by its operation code (commands that are not I/O are not counted): a
        GOOD one with the bytes it moved (a read's: sent, the data-in given; the rest: moved; a WRITE SAME that
        unmapped counts as an unmap), any other status as an error. The frontends' per-command call."""
        io_account_reply(self, opcode, status, sent, moved, unmapped, arrived_ns)

    def account_error(self, int kind):
        """Count a command of kind that completed with a status other than GOOD."""
        if not 0 <= kind < IO_KINDS:
            raise ValueError(f"no I/O kind {kind}")
        self.stats[kind].errors += 1

    def io_stats(self):
        """The I/O statistics so far, an IOStat per kind (in IO_KIND_NAMES order); buckets are per bucket of
        LATENCY_BOUNDS and +Inf, not cumulative."""
        cdef int kind
        cdef iostat_t *stat
        found = []
        for kind in range(IO_KINDS):
            stat = &self.stats[kind]
            found.append(IOStat(stat.commands, stat.bytes, stat.errors, stat.latency_ns / 1e9,
                                tuple(stat.buckets[i] for i in range(LATENCY_BUCKETS))))
        return found

    @property
    def inflight(self) -> int:
        return self.io_count[0] + self.io_count[1]

    cdef int io_start_c(self) noexcept:
        cdef int slot = self.cur_slot
        self.io_count[slot] += 1
        return slot

    cdef void io_end_c(self, int slot):
        self.io_count[slot] -= 1
        if self.draining and slot != self.cur_slot and self.io_count[slot] == 0:
            self._start_drain()

    cdef void _start_drain(self):
        """Flip the I/O slot; each time the old slot is empty, fire its waiters and start on the next batch.

        Barriers registered by a firing callback join the batch that drains next."""
        cdef int old
        while True:
            if self.draining:
                callbacks = self.waiters
                self.waiters = self.next_waiters
                self.next_waiters = []
                self.draining = False
                self.firing = True
                try:
                    for callback in callbacks:
                        callback()
                finally:
                    self.firing = False
                if not self.waiters:
                    return
            old = self.cur_slot
            self.cur_slot ^= 1
            self.draining = True
            if self.io_count[old] != 0:
                return

    def _check_range(self, uint64_t start, uint64_t count):
        if start + count > self.nsegments or start + count < start:
            raise ValueError(f"entries {start}+{count} are outside the table ({self.nsegments} entries)")

    def _bitmap_bytes(self) -> int:
        return (self.segment_blocks + 7) // 8

    def _mask_tail(self, uint32_t index):
        cdef uint32_t tail = self.segment_blocks & 63
        if tail:
            self.alts[index].bitmap[self.bitmap_words - 1] &= (1ULL << tail) - 1

    cdef uint32_t _new_alt(self) except? 0xFFFFFFFF:
        cdef uint32_t index
        cdef alt_t *grown
        cdef uint64_t *bitmap
        if self.free_alt != NO_ALT:
            index = self.free_alt
            self.free_alt = self.alts[index].segment
            self.alts[index].used = 1
            self.alts[index].flags = 0
            return index
        if self.nalts == self.alts_cap:
            grown = <alt_t *>realloc(self.alts, (self.alts_cap * 2 + 4) * sizeof(alt_t))
            if grown == NULL:
                raise MemoryError()
            self.alts = grown
            self.alts_cap = self.alts_cap * 2 + 4
        bitmap = <uint64_t *>calloc(self.bitmap_words, 8)
        if bitmap == NULL:
            raise MemoryError()
        index = self.nalts
        self.alts[index].bitmap = bitmap
        self.alts[index].used = 1
        self.alts[index].flags = 0
        self.nalts += 1
        return index

    cdef entry_t *_writable(self, uint64_t segment) except NULL:
        """The entry of a segment, for writing: a shared page is copied into one of the table's own first."""
        cdef uint64_t index = segment >> PAGE_SHIFT
        cdef entry_t *page = self.pages[index]
        cdef entry_t *copy
        if _shared(page):
            copy = <entry_t *>malloc(PAGE_BYTES)
            if copy == NULL:
                raise MemoryError()
            memcpy(copy, page, PAGE_BYTES)
            self.pages[index] = copy
            self.private_pages += 1
            page = copy
        return &page[segment & (PAGE_ENTRIES - 1)]

    cdef void _share_uniform(self, uint64_t start, uint64_t stop) noexcept:
        """Pages wholly inside [start, stop) that became all ZERO or all INVALID go back to the shared page."""
        cdef uint64_t p
        cdef entry_t *page
        for p in range((start + PAGE_ENTRIES - 1) >> PAGE_SHIFT, stop >> PAGE_SHIFT):
            page = self.pages[p]
            if _shared(page):
                continue
            if memcmp(page, _zero_page, PAGE_BYTES) == 0:
                self.pages[p] = _zero_page
            elif memcmp(page, _invalid_page, PAGE_BYTES) == 0:
                self.pages[p] = _invalid_page
            else:
                continue
            free(page)
            self.private_pages -= 1

    cdef void _drop_alt(self, uint64_t segment) noexcept:
        # An entry with an alternate location is in one of the table's own pages (shared pages have none).
        cdef entry_t *entry = entry_at(self, segment)
        cdef uint32_t index = entry.alt
        if index == NO_ALT:
            return
        entry.alt = NO_ALT
        if self.alts[index].flags & ALT_DIRTY:
            self.dirty -= 1
        self.alts[index].flags = 0
        self.alts[index].used = 0
        self.alts[index].segment = self.free_alt
        self.free_alt = index
