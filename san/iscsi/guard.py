"""Backoff for failed CHAP logins, per initiator name and per source address (sans-I/O: the clock is injected).

After a few failures, the next secret is checked only once a delay has passed, doubling up to a minute; a login
that arrives sooner is refused unchecked, so guessing a secret takes hours instead of seconds. A name's room is
kept per address, so that nobody locks a host out by failing under its name from elsewhere (a guess spread over
many addresses is slowed by each address's own count and by the connection limits, not by the name's)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# An address may carry several hosts (NAT): it is given more room than one name at it.
FREE_FAILURES = {"iqn@address": 3, "address": 10}
FIRST_DELAY = 1.0
MAX_DELAY = 60.0
FORGET_AFTER = 600.0
MAX_KEYS = 4096


@dataclass
class _Record:
    failures: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


class LoginGuard:
    """Counts failed logins by name at address and by address; wait() says how long until the next one from that
    name at that address is checked."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    def _keys(self, initiator: str, peer: str) -> list[tuple[str, str]]:
        return [("iqn@address", f"{initiator}@{peer}"), ("address", peer)]

    def wait(self, initiator: str, peer: str) -> float:
        """Seconds until a login of this initiator from this address may be checked (0: now)."""
        now = self.clock()
        longest = 0.0
        for key in self._keys(initiator, peer):
            record = self.records.get(key)
            if record is None:
                continue
            if now - record.last > FORGET_AFTER:
                del self.records[key]
                continue
            longest = max(longest, record.blocked_until - now)
        return longest

    def failed(self, initiator: str, peer: str) -> None:
        now = self.clock()
        for key in self._keys(initiator, peer):
            record = self.records.pop(key, None) or _Record()
            record.failures += 1
            record.last = now
            beyond = record.failures - FREE_FAILURES[key[0]]
            if beyond > 0:
                record.blocked_until = now + min(FIRST_DELAY * 2 ** min(beyond - 1, 16), MAX_DELAY)
            self.records[key] = record
        while len(self.records) > MAX_KEYS:
            self.records.popitem(last=False)

    def succeeded(self, initiator: str, peer: str) -> None:
        for key in self._keys(initiator, peer):
            self.records.pop(key, None)
