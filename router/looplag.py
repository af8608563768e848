"""How late the router's own event loop is: a timeout is the engine's fault only if the router was awake.

A router starved of CPU (a noisy neighbour, a profiler, a long synchronous step) runs its callbacks late;
an upstream connect or read then "times out" while the engine answered in time, and charging that to the
engine opens healthy instances' circuit breakers and marks them suspect, which moves load onto fewer
instances and starves the router further. :class:`LoopLag` measures the lateness of a periodic task (the
router's tick) and answers what share of an interval the loop spent late; the dispatcher excuses a
timeout when that share is at least :data:`EXCUSE_SHARE` (:meth:`router.dispatch.Dispatcher._failed`),
and likewise a silence of an engine's load stream (:meth:`router.dispatch.Dispatcher.tick`).

Pure: the caller passes monotonic times in seconds.
"""

from __future__ import annotations

from collections import deque

EXCUSE_SHARE = 0.5
"""A timeout is not charged to the engine when the router's loop was late for at least this share of the
attempt (a healthy loop is late for a few per cent of the time; a starved one for most of it)."""

HORIZON = 150.0
"""Seconds of ticks kept: longer than the longest timeout that is charged to an engine (stream idle
gap, 120 s by default)."""


class LoopLag:
    """Lateness of a task that wakes every ``period`` seconds: a wake-up at ``t`` after one at ``p`` was
    ``max(0, t - p - period)`` late, attributed to the interval just before ``t``."""

    def __init__(self, period: float) -> None:
        if period <= 0:
            raise ValueError("period must be > 0")
        self.period = period
        self._ticks: deque[tuple[float, float]] = deque(maxlen=max(16, int(HORIZON / period) + 1))
        self._last: float | None = None

    def tick(self, now: float) -> None:
        """Record a wake-up at ``now``."""
        if self._last is not None:
            self._ticks.append((now, max(0.0, now - self._last - self.period)))
        self._last = now

    def share(self, since: float, now: float) -> float:
        """The share of ``[since, now]`` the loop spent late (0 to 1), the overdue current tick included;
        0 when the interval is empty."""
        span = now - since
        if span <= 0:
            return 0.0
        late = 0.0
        if self._last is not None:  # the tick now due and not yet run
            late += min(max(0.0, now - self._last - self.period), span)
        for t, lateness in reversed(self._ticks):
            if t <= since:
                break
            late += min(lateness, t - since)
        return min(1.0, late / span)
