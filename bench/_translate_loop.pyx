# cython: language_level=3, boundscheck=False, wraparound=False
"""Benchmark helper: Cython loops that call the map table's inline cdef translate_fast() with no Python objects.

Compiled at run time by bench/fastmap.py through pyximport."""

from libc.stdint cimport uint64_t

from san._fastmap cimport MapTable, extent_t, fault_t, prefetch_entry, translate_fast


def translate_loop(MapTable table, const uint64_t[:] lbas, uint64_t nblocks, bint is_write, Py_ssize_t ahead):
    """Translate every lba, prefetching the entry `ahead` requests on (0: no prefetch); return the extent count."""
    cdef extent_t out[16]
    cdef fault_t fault
    cdef Py_ssize_t i
    cdef Py_ssize_t n = lbas.shape[0]
    cdef long total = 0
    with nogil:
        for i in range(n):
            if ahead and i + ahead < n:
                prefetch_entry(table, lbas[i + ahead])
            total += translate_fast(table, lbas[i], nblocks, is_write, out, 16, &fault)
    return total
