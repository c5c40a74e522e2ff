"""Group commit: callers that ask for the same durable step while one is running share the next run of it.

As dm-thin defers flush bios and commits once for all of them; a caller is answered by a run that began after its
call, so whatever it did before calling is covered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class GroupCommit:
    """Runs work() for a crowd: one run at a time, every caller waiting for it covered by the one run after it."""

    def __init__(self, work: Callable[[], Awaitable[None]]) -> None:
        self.work = work
        self.asked = 0  # tickets handed out, one per call
        self.covered = 0  # every ticket up to this one was covered by a run that succeeded
        self.running: tuple[asyncio.Future[None], int] | None = None  # the run in progress and the last ticket it covers
        self.runs = 0

    async def __call__(self) -> None:
        """Return once a run that began after this call has succeeded; raise what that run raised."""
        self.asked += 1
        ticket = self.asked
        while self.covered < ticket:
            if self.running is None:
                started = asyncio.ensure_future(self._run(self.asked))
                started.add_done_callback(_retrieved)
                self.running = (started, self.asked)
            run, covers = self.running
            try:
                await asyncio.shield(run)
            except asyncio.CancelledError:
                if not run.cancelled():
                    raise  # this caller was cancelled; the run goes on for the others
                if covers >= ticket:
                    raise
            except Exception:
                if covers >= ticket:
                    raise

    async def _run(self, covers: int) -> None:
        self.runs += 1
        try:
            await self.work()
        finally:
            self.running = None
        self.covered = max(self.covered, covers)


def _retrieved(run: asyncio.Future[None]) -> None:
    """Every waiter sees a failed run's exception; a run nobody waits for any more must not warn about it."""
    if not run.cancelled():
        run.exception()
