# cython: language_level=3
"""Test helper: the map table's C-level API (translate_fast, prefetch_entry, mark_written) called from another Cython
module.

Compiled at test time through pyximport, as any Cython frontend would cimport san._fastmap."""

from libc.stdint cimport uint64_t

from san._fastmap cimport MapTable, extent_t, fault_t, mark_written, prefetch_entry, translate_fast


def translate_cdef(MapTable table, uint64_t lba, uint64_t nblocks, bint is_write):
    """What translate_fast() answers, as translate() would: a list of extents or (segment, state) of the fault."""
    cdef extent_t out[64]
    cdef fault_t fault
    cdef int n, i
    prefetch_entry(table, lba)
    n = translate_fast(table, lba, nblocks, is_write, out, 64, &fault)
    if n == -1:
        return (fault.segment, fault.state)
    if n == -2:
        return None
    return [(out[i].container, out[i].offset, out[i].length) for i in range(n)]


def mark_written_cdef(MapTable table, uint64_t lba, uint64_t nblocks):
    """mark_written() as the C frontends call it after a write (the caller checked the range)."""
    mark_written(table, lba, nblocks)
