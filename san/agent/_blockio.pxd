# cython: language_level=3
"""C helpers for moving blocks between containers and a caller's memory, shared by the agent's block I/O and the
TCMU ring (which reads and writes straight into the ring's data area).

An fd in a container fd table may carry DIRECT_FD: the container is open with O_DIRECT (it is shared with other
hosts). Its I/O goes through an aligned bounce buffer when the caller's memory is not aligned, and never comes from
the page cache (read_nowait says EAGAIN, so the caller reads in a thread)."""

from libc.errno cimport EAGAIN, EINTR, ENOMEM, EOPNOTSUPP, errno
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free
from libc.string cimport memcpy
from posix.types cimport off_t
from posix.uio cimport iovec
from posix.unistd cimport pread, pwrite

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef enum:
    RWF_NOWAIT = 0x00000008
    DIRECT_FD = 0x40000000  # set on an fd table entry: the container is open with O_DIRECT
    FD_BITS = 0x3FFFFFFF
    DIRECT_ALIGN = 4096  # memory alignment for O_DIRECT (offsets and lengths: the container's logical block size)
    BOUNCE_MAX = 1 << 20  # a larger transfer through a bounce buffer goes in pieces of this size


cdef inline int transfer(int fdv, unsigned char *buf, uint64_t length, uint64_t offset, bint write) noexcept nogil:
    """Move length bytes; 0, or the errno of a failure (-1 for a container that ends early)."""
    if fdv & DIRECT_FD and <uintptr_t>buf % DIRECT_ALIGN:
        return bounce(fdv & FD_BITS, buf, length, offset, write)
    return transfer_plain(fdv & FD_BITS, buf, length, offset, write)


cdef inline int bounce(int fd, unsigned char *buf, uint64_t length, uint64_t offset, bint write) noexcept nogil:
    """transfer() for an O_DIRECT fd and unaligned memory: through an aligned buffer, in pieces of BOUNCE_MAX."""
    cdef void *aligned = NULL
    cdef uint64_t done = 0, piece
    cdef int err = 0
    if posix_memalign(&aligned, DIRECT_ALIGN, min(length, <uint64_t>BOUNCE_MAX)) != 0:
        return ENOMEM
    while done < length and not err:
        piece = min(length - done, <uint64_t>BOUNCE_MAX)
        if write:
            memcpy(aligned, buf + done, piece)
            err = transfer_plain(fd, <unsigned char *>aligned, piece, offset + done, True)
        else:
            err = transfer_plain(fd, <unsigned char *>aligned, piece, offset + done, False)
            if not err:
                memcpy(buf + done, aligned, piece)
        done += piece
    free(aligned)
    return err


cdef inline int transfer_plain(int fd, unsigned char *buf, uint64_t length, uint64_t offset, bint write) noexcept nogil:
    cdef Py_ssize_t done = 0
    cdef Py_ssize_t n
    while <uint64_t>done < length:
        if write:
            n = pwrite(fd, buf + done, length - done, offset + done)
        else:
            n = pread(fd, buf + done, length - done, offset + done)
        if n < 0:
            if errno == EINTR:
                continue
            return errno
        if n == 0:
            return -1
        done += n
    return 0


cdef inline int read_nowait(int fdv, unsigned char *buf, uint64_t length, uint64_t offset) noexcept nogil:
    """preadv2(RWF_NOWAIT) until done: 0, EAGAIN if any of it is not cached, or the errno of a failure. A file system
    that cannot say (tmpfs, overlayfs on it: EOPNOTSUPP) is read the ordinary way: its pages are memory. An O_DIRECT
    container has no cached pages to read: EAGAIN."""
    if fdv & DIRECT_FD:
        return EAGAIN
    cdef int fd = fdv
    cdef iovec iov
    cdef Py_ssize_t done = 0
    cdef Py_ssize_t n
    while <uint64_t>done < length:
        iov.iov_base = buf + done
        iov.iov_len = length - done
        n = preadv2(fd, &iov, 1, offset + done, RWF_NOWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EOPNOTSUPP:
                return transfer_plain(fd, buf + done, length - done, offset + done, False)
            return errno
        if n == 0:
            return EAGAIN if done else -1
        done += n
    return 0
