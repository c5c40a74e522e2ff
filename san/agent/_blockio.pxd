# cython: language_level=3
"""C helpers for moving blocks between containers and a caller's memory, shared by the agent's block I/O and the
TCMU ring (which reads and writes straight into the ring's data area)."""

from libc.errno cimport EAGAIN, EINTR, EOPNOTSUPP, errno
from libc.stdint cimport uint64_t
from posix.types cimport off_t
from posix.uio cimport iovec
from posix.unistd cimport pread, pwrite

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)

cdef enum:
    RWF_NOWAIT = 0x00000008


cdef inline int transfer(int fd, unsigned char *buf, uint64_t length, uint64_t offset, bint write) noexcept nogil:
    """Move length bytes; 0, or the errno of a failure (-1 for a container that ends early)."""
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


cdef inline int read_nowait(int fd, unsigned char *buf, uint64_t length, uint64_t offset) noexcept nogil:
    """preadv2(RWF_NOWAIT) until done: 0, EAGAIN if any of it is not cached, or the errno of a failure. A file system
    that cannot say (tmpfs, overlayfs on it: EOPNOTSUPP) is read the ordinary way: its pages are memory."""
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
                return transfer(fd, buf + done, length - done, offset + done, False)
            return errno
        if n == 0:
            return EAGAIN if done else -1
        done += n
    return 0
