"""Admission control: a bound on requests in flight and a bounded FIFO queue with a timeout.

A request takes a slot with :meth:`Admission.acquire` before its body is read (so a queued request holds
only its connection, never its body) and gives it back with :meth:`Admission.release`. While fewer than
``limit()`` requests are in flight it passes at once; otherwise it waits in a FIFO queue of at most
``max_queue`` requests, at most ``queue_timeout`` seconds, and only if its predicted wait is at most
``max_queue_wait`` seconds: (requests ahead + 1) / the rate slots were granted over the last
:data:`RATE_WINDOW` seconds. Past any bound it is refused at once (:class:`Rejected`, answered 429 with
``Retry-After``). The predicted wait sizes the queue to the cluster's speed: engines that answer in
milliseconds let a burst of thousands wait briefly, engines saturated at a few requests a second let a
few wait, and the rest are refused at once instead of after ``queue_timeout``. Memory is bounded
whatever the load: the queue holds at most ``max_queue`` futures, and the in-flight requests' bodies are bounded by the body limit.

The limit is a function (the router passes the sum of the routable instances' adaptive limits,
:mod:`router.model.concurrency`, or ``max_inflight_per_instance x routable instances``), read at every
acquire and release, so the router admits less while instances are down or their engines queue.

One owner: the event loop (no locks; asyncio only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

RATE_WINDOW = 2.0
"""Seconds of admissions (slots granted) the departure rate is measured over."""
RATE_MIN_SAMPLES = 8
"""Admissions in the window below which the rate is not trusted (light traffic: the queue's own bounds)."""
RATE_BUCKET = 0.1
"""Seconds an admission-count bucket spans (the rate's memory is RATE_WINDOW / RATE_BUCKET counters)."""


class Rejected(Exception):
    """The request was not admitted. ``reason``: ``queue_full``, ``queue_wait`` or ``queue_timeout``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Admission:
    """In-flight bound + bounded queue (see the module docstring).

    Args:
        limit: the current bound on requests in flight (>= 1 is enforced).
        max_queue: requests that may wait for a slot (0 = none wait).
        queue_timeout: seconds one may wait.
    """

    def __init__(
        self, limit: Callable[[], int], max_queue: int, queue_timeout: float, max_queue_wait: float = 0.0
    ) -> None:
        self._limit = limit
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.max_queue_wait = max_queue_wait
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejected: dict[str, int] = {
            "queue_full": 0,
            "queue_timeout": 0,
            "queue_wait": 0,
            "overloaded": 0,
        }
        # Admissions (slots granted) per RATE_BUCKET-second bucket over the last RATE_WINDOW seconds: the
        # rate at which the gate lets requests through, from which a newcomer's wait is predicted. Not
        # releases: while an in-flight limit drops below what is in flight, releases admit nobody.
        self._buckets: deque[list[float]] = deque()  # [bucket start, admissions]

    def _granted(self, now: float) -> float:
        self._forget_before(now - RATE_WINDOW)
        return sum(c for _, c in self._buckets)

    def _forget_before(self, cutoff: float) -> None:
        b = self._buckets
        while b and b[0][0] <= cutoff:
            b.popleft()

    def departure_rate(self, now: float | None = None) -> float | None:
        """Admissions (slots granted) per second over the last :data:`RATE_WINDOW` seconds; ``None`` when
        fewer than :data:`RATE_MIN_SAMPLES` were granted in that window (too few to predict from)."""
        granted = self._granted(time.monotonic() if now is None else now)
        return granted / RATE_WINDOW if granted >= RATE_MIN_SAMPLES else None

    def predicted_wait(self, now: float | None = None) -> float | None:
        """Seconds a request queued now would wait: (waiters ahead + 1) / :meth:`departure_rate`. When the
        rate is unknown: ``inf`` if requests wait and no slot was granted for a whole window (the gate is
        stuck), else ``None`` (unknown: the queue's own bound and timeout hold)."""
        now = time.monotonic() if now is None else now
        rate = self.departure_rate(now)
        if rate is not None:
            return (len(self._waiters) + 1) / rate
        # Too few grants to predict from: unknown, unless requests wait and none was granted at all.
        return float("inf") if self._waiters and self._granted(now) == 0 else None

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    def limit(self) -> int:
        return max(1, self._limit())

    async def acquire(self) -> float:
        """Take a slot, waiting in the queue if need be. Returns the seconds waited.

        Raises:
            Rejected: the queue is full, or the wait exceeded ``queue_timeout``.
            asyncio.CancelledError: the caller was cancelled while waiting (no slot is held).
        """
        if self.inflight < self.limit() and not self._waiters:
            self.inflight += 1
            self._count_admission()
            return 0.0
        if len(self._waiters) >= self.max_queue:
            self.rejected["queue_full"] += 1
            raise Rejected("queue_full")
        if self.max_queue_wait > 0:
            wait = self.predicted_wait()
            if wait is not None and wait > self.max_queue_wait:
                self.rejected["queue_wait"] += 1
                raise Rejected("queue_wait")
        start = time.monotonic()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout)
        except asyncio.TimeoutError:
            if fut.done() and not fut.cancelled():  # granted just as the wait ended: keep the slot
                return time.monotonic() - start
            self._drop(fut)
            self.rejected["queue_timeout"] += 1
            raise Rejected("queue_timeout") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over to a caller that is gone
            else:
                self._drop(fut)
            raise
        return time.monotonic() - start

    def _drop(self, fut: asyncio.Future[None]) -> None:
        fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def _count_admission(self) -> None:
        now = time.monotonic()
        b = self._buckets
        if b and now - b[-1][0] < RATE_BUCKET:
            b[-1][1] += 1
        else:
            b.append([now, 1.0])
            self._forget_before(now - RATE_WINDOW)

    def release(self) -> None:
        """Give a slot back; the longest waiter (if any) takes it."""
        self.inflight -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to waiters (also after the limit grew)."""
        while self._waiters and self.inflight < self.limit():
            fut = self._waiters.popleft()
            if not fut.done():
                self.inflight += 1
                self._count_admission()
                fut.set_result(None)
