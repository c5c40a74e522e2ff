"""Per-object locks for management operations: one operation at a time on a pool, vdisk or host, across awaits.

A check made under an object's lock still holds when the operation acts on it, even if it waited for agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Locks:
    """asyncio locks by key, such as ("vdisk", "vm1"); taken in sorted order, so two operations never deadlock."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._users: dict[tuple[str, str], int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, *keys: tuple[str, str]) -> AsyncIterator[None]:
        wanted = sorted(set(keys))
        counted: list[tuple[str, str]] = []
        acquired: list[asyncio.Lock] = []
        try:
            for key in wanted:
                self._users[key] = self._users.get(key, 0) + 1
                counted.append(key)
                lock = self._locks.setdefault(key, asyncio.Lock())
                await lock.acquire()
                acquired.append(lock)
            yield
        finally:
            for lock in reversed(acquired):
                lock.release()
            for key in counted:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key], self._locks[key]

    def held(self, key: tuple[str, str]) -> bool:
        lock = self._locks.get(key)
        return lock is not None and lock.locked()
