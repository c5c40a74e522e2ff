"""Log lines about what a peer can repeat at will (refused connections, failed logins) at most once a minute each.

A flood then costs one line per minute per key instead of one line per attempt."""

from __future__ import annotations

import time


class Throttle:
    """ready(key) is true at most once per `seconds` for each key; it remembers at most `keys` keys."""

    def __init__(self, seconds: float = 60.0, keys: int = 1024) -> None:
        self.seconds = seconds
        self.keys = keys
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def ready(self, key: str) -> bool:
        now = time.monotonic()
        if now - self.last.get(key, -self.seconds) < self.seconds:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if len(self.last) >= self.keys:
            self.last.clear()
            self.suppressed.clear()
        self.last[key] = now
        return True

    def since(self, key: str) -> int:
        """How many times key was held back since it was last ready (and reset the count)."""
        return self.suppressed.pop(key, 0)
