"""Paths san opens as root, walked without following a symbolic link anywhere in them, so that a directory another
user controls cannot redirect a pool create, open or delete elsewhere between the check and the act.

Container paths are resolved (realpath) when a pool is made; a component that has become a link since fails."""

from __future__ import annotations

import errno
import os
import stat


class UnsafePath(OSError):
    """A path that another user could redirect, or that changed under san."""


def _parent_fd(path: str) -> tuple[int, str]:
    """An O_PATH descriptor of path's directory, reached without following links, and path's last component."""
    if not os.path.isabs(path) or path.endswith("/"):
        raise UnsafePath(errno.EINVAL, f"{path} is not an absolute path to a file")
    parts = [part for part in path.split("/") if part]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            if part in (".", ".."):
                raise UnsafePath(errno.EINVAL, f"{path} is not a resolved path")
            following = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = following
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(exc.errno, f"a directory on the way to {path} is a symbolic link or not a directory") from None
        raise
    return fd, parts[-1]


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open(path, flags) where no component of path may be a symbolic link."""
    directory, name = _parent_fd(path)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(errno.ELOOP, f"{path} is a symbolic link; give the path it points to") from None
        raise
    finally:
        os.close(directory)


def unlink_nofollow(path: str, identity: tuple[int, int]) -> None:
    """Remove path if it still is the file with that (st_dev, st_ino): never another file put in its place."""
    directory, name = _parent_fd(path)
    try:
        st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != identity:
            raise UnsafePath(errno.ESTALE, f"{path} is no longer the pool's file; left alone")
        os.unlink(name, dir_fd=directory)
    finally:
        os.close(directory)


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def check_trusted(directory: str, top: str) -> None:
    """Every directory from top down to directory is owned by root or by san's user and cannot be changed by other
    users (or is sticky, like /tmp): nobody else can swap what san puts there."""
    current = os.path.realpath(directory)
    top = os.path.realpath(top)
    while True:
        st = os.stat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(errno.ENOTDIR, f"{current} is not a directory")
        if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise UnsafePath(errno.EPERM, f"{current} can be changed by other users: san puts no pool there")
        if current == top or current == os.path.dirname(current):
            return
        current = os.path.dirname(current)
