"""The data directory: created mode 0700 and locked by one process, its files 0600, its store checked before use.

A store that fails `san check`'s table checks is refused with one line, and so is a missing or empty store beside
pool files (starting an empty SAN there would hand their live data out again)."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from typing import IO

from san.store.check import check_tables
from san.store.sqlite import SQLiteStore

log = logging.getLogger("san")
DB_NAME = "san.db"
LOCK_NAME = "lock"
POOLS_DIR = "pools"


class DataDirLocked(Exception):
    """Another san process serves this data directory."""


class DataDirUnsafe(Exception):
    """The data directory (or something in it) could have been prepared by another user."""


def check_private_path(path: str) -> None:
    """path is a real directory of ours, and every directory above it is root's or ours and not writable by others
    (unless sticky, as /tmp is: then others cannot replace what is in it)."""
    path = os.path.realpath(path)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        what = "not a directory" if not stat.S_ISDIR(st.st_mode) else f"owned by uid {st.st_uid}"
        raise DataDirUnsafe(f"{path} is {what}: refusing a data directory that someone else could have prepared")
    parent = os.path.dirname(path)
    while True:
        st = os.stat(parent)
        if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise DataDirUnsafe(f"{parent} can be changed by other users: put the data directory {path} elsewhere")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


class StoreRefused(Exception):
    """The store is damaged or missing beside pool files; the message is the one line to show."""


class DataDir:
    """One data directory, held (locked) from construction until close()."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise DataDirUnsafe(f"{self.path} is not a directory: give --data a directory (made if missing)")
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        check_private_path(self.path)
        self._tighten(self.path, 0o700)
        fd = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self.lock: IO[str] = os.fdopen(fd, "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise DataDirLocked(f"{self.path} is in use by another san process") from None
        try:
            for name in sorted(os.listdir(self.path)):
                full = os.path.join(self.path, name)
                self._own(full)
                self._tighten(full, 0o700 if os.path.isdir(full) else 0o600)
            pools = os.path.join(self.path, POOLS_DIR)
            if os.path.isdir(pools):
                for name in sorted(os.listdir(pools)):
                    self._own(os.path.join(pools, name))
                    self._tighten(os.path.join(pools, name), 0o600)
        except BaseException:
            self.lock.close()
            raise

    @property
    def store_path(self) -> str:
        return os.path.join(self.path, DB_NAME)

    def open_store(self) -> SQLiteStore:
        """The store, once it passes the table checks; StoreRefused otherwise."""
        path = self.store_path
        pool_files = self._pool_files()
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            what = "missing" if not os.path.exists(path) else "empty (0 bytes)"
            if pool_files:
                raise StoreRefused(
                    f"{path} is {what} but {os.path.join(self.path, POOLS_DIR)} holds pool files ({', '.join(pool_files[:3])}"
                    f"{', ...' if len(pool_files) > 3 else ''}): refusing to start an empty SAN over live data; restore "
                    "the store, or move the pool files away"
                )
            if os.path.exists(path):
                raise StoreRefused(f"{path} is empty (0 bytes): remove it to start a new store")
        else:
            problems, _ = check_tables(path)
            if problems:
                raise StoreRefused(
                    f"{path} fails san check with {len(problems)} problem(s), the first: {problems[0]}"
                    f" (run san check --data {self.path})"
                )
        return SQLiteStore(path)

    def _pool_files(self) -> list[str]:
        pools = os.path.join(self.path, POOLS_DIR)
        return sorted(os.listdir(pools)) if os.path.isdir(pools) else []

    @staticmethod
    def _own(path: str) -> None:
        """Everything san keeps in its data directory is its own: a planted store or a symlink would make root
        write wherever it points."""
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}"
            raise DataDirUnsafe(f"{path} is {what}: refusing a data directory that someone else could have prepared")

    @staticmethod
    def _tighten(path: str, mode: int) -> None:
        """No group or other access to what san keeps here (the store holds CHAP secrets)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or not st.st_mode & 0o077:
            return
        tightened = stat.S_IMODE(st.st_mode) & mode & ~0o077
        os.chmod(path, tightened)
        log.info("%s was readable by others (mode %o); now %o", path, stat.S_IMODE(st.st_mode), tightened)

    def close(self) -> None:
        self.lock.close()
