"""Admission control: a bound on requests in flight and a bounded FIFO queue with a timeout.

A request takes a slot with :meth:`Admission.acquire` before its body is read (so a queued request holds
only its connection, never its body) and gives it back with :meth:`Admission.release`. While fewer than
``limit()`` requests are in flight it passes at once; otherwise it waits in a FIFO queue of at most
``max_queue`` requests, at most ``queue_timeout`` seconds, and only if its predicted wait is at most
``max_queue_wait`` seconds: the longer of the head's wait so far and (requests ahead + 1) x the mean time
between two departures from the queue (slots granted to waiters) while it was not empty, over the last
:data:`RATE_WINDOW` seconds (up to :data:`RATE_MAX_WINDOW` while fewer than :data:`RATE_MIN_SAMPLES`
departures were seen). Departures are timed only while requests wait: a grant at once measures the
arrivals, not the speed of the queue. With no departure to time yet (the start of a burst), the head's
wait alone decides (a queue whose head has waited ``max_queue_wait`` takes nobody more, as CoDel's
sojourn time). Past any bound it is refused at once (:class:`Rejected`, answered 429 with
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
"""Seconds of departures the queue's speed is measured over, at least."""
RATE_MAX_WINDOW = 10.0
"""Seconds the window stretches to, at most, to hold :data:`RATE_MIN_SAMPLES` departures."""
RATE_MIN_SAMPLES = 8
"""Departures below which the queue's speed is not trusted (the head's wait decides alone)."""


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
        self._since: dict[asyncio.Future[None], float] = {}  # waiter -> when it started waiting
        # Departures from the queue while it was not empty: (time, seconds since the previous one or since
        # the queue became non-empty), the last RATE_MAX_WINDOW seconds of them.
        self._departures: deque[tuple[float, float]] = deque()
        self._last_departure = 0.0  # time of the last departure, or of the queue becoming non-empty

    def departure_rate(self, now: float | None = None) -> float | None:
        """Departures from the queue per second of it not being empty: over the last :data:`RATE_WINDOW`
        seconds, or back to :data:`RATE_MAX_WINDOW` until :data:`RATE_MIN_SAMPLES` departures are in;
        ``None`` when fewer were seen (too few to predict from)."""
        now = time.monotonic() if now is None else now
        self._forget_before(now - RATE_MAX_WINDOW)
        count, busy = 0, 0.0
        for t, gap in reversed(self._departures):
            if now - t > RATE_WINDOW and count >= RATE_MIN_SAMPLES:
                break
            count += 1
            busy += gap
        if count < RATE_MIN_SAMPLES:
            return None
        return count / busy if busy > 0 else float("inf")

    def head_wait(self, now: float | None = None) -> float:
        """Seconds the request at the head of the queue has waited (0 when none waits)."""
        if not self._waiters:
            return 0.0
        return (time.monotonic() if now is None else now) - self._since.get(self._waiters[0], 0.0)

    def predicted_wait(self, now: float | None = None) -> float | None:
        """Seconds a request queued now would wait: the longer of the head's wait so far and (waiters ahead
        + 1) / :meth:`departure_rate`; the head's wait alone while the rate is unknown; ``None`` when nobody
        waits and the rate is unknown (the queue's own bound and timeout hold)."""
        now = time.monotonic() if now is None else now
        rate = self.departure_rate(now)
        head = self.head_wait(now)
        if rate is not None:
            return max(head, (len(self._waiters) + 1) / rate)
        return head if self._waiters else None

    def _forget_before(self, cutoff: float) -> None:
        d = self._departures
        while d and d[0][0] <= cutoff:
            d.popleft()

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
        if not self._waiters:
            self._last_departure = start  # the queue's busy period starts
        self._waiters.append(fut)
        self._since[fut] = start
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
        self._since.pop(fut, None)
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def release(self) -> None:
        """Give a slot back; the longest waiter (if any) takes it."""
        self.inflight -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to waiters (also after the limit grew)."""
        while self._waiters and self.inflight < self.limit():
            fut = self._waiters.popleft()
            self._since.pop(fut, None)
            if not fut.done():
                self.inflight += 1
                now = time.monotonic()
                self._departures.append((now, now - self._last_departure))
                self._last_departure = now
                self._forget_before(now - RATE_MAX_WINDOW)
                fut.set_result(None)
