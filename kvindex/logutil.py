"""A logger that says a recurring warning once per interval and counts the rest. Pure stdlib."""

from __future__ import annotations

import logging
import time
from collections import Counter

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs a warning per key at most once per ``interval`` seconds, reporting how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval`` seconds ago."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            self._log.warning(msg + " (%d similar suppressed)", *args, n)
        else:
            self._log.warning(msg, *args)
