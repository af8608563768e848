"""router.admission: the predicted-wait bound (``max_queue_wait``) sizes the queue to its departure rate."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import router.admission as admission_mod
from router.admission import RATE_MIN_SAMPLES, Admission, Rejected


class Clock:
    """A monotonic clock the test moves by hand (patched into router.admission)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(admission_mod, "time", SimpleNamespace(monotonic=c.monotonic))
    return c


async def _departures(adm: Admission, clock: Clock, n: int, gap: float) -> None:
    """``n`` departures from the queue, ``gap`` seconds apart (``adm`` holds its one slot throughout)."""
    for _ in range(n):
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.queued == 1
        clock.now += gap
        adm.release()
        await waiter


async def test_predicted_wait_refuses_at_once_when_the_queue_moves_too_slowly(clock: Clock) -> None:
    adm = Admission(lambda: 1, max_queue=100, queue_timeout=5.0, max_queue_wait=0.25)
    await adm.acquire()
    await _departures(adm, clock, RATE_MIN_SAMPLES - 1, 0.2)
    assert adm.departure_rate() is None  # too few departures to predict from
    await _departures(adm, clock, 1, 0.2)
    assert adm.departure_rate() == pytest.approx(5.0)  # one every 0.2 s while requests waited
    first = asyncio.create_task(adm.acquire())  # (0 + 1) / 5 = 0.2 s: queued
    await asyncio.sleep(0)
    assert adm.queued == 1
    with pytest.raises(Rejected, match="queue_wait"):  # (1 + 1) / 5 = 0.4 s > 0.25 s: refused at once
        await adm.acquire()
    assert adm.rejected["queue_wait"] == 1
    adm.release()  # the slot goes to the queued request
    await first
    assert adm.inflight == 1


async def test_grants_at_once_are_not_the_queue_speed(clock: Clock) -> None:
    """Requests admitted at once measure arrivals (light traffic), not how fast a queue drains: after
    many of them a burst still queues on the head's wait alone, not refused for a 'slow' rate."""
    adm = Admission(lambda: 1, max_queue=100, queue_timeout=5.0, max_queue_wait=0.5)
    for _ in range(50):  # one request every 0.5 s, each done before the next: 2 a second, no queue
        await adm.acquire()
        clock.now += 0.5
        adm.release()
    await adm.acquire()
    assert adm.departure_rate() is None
    burst = [asyncio.create_task(adm.acquire()) for _ in range(20)]
    await asyncio.sleep(0)
    assert adm.queued == 20 and adm.rejected["queue_wait"] == 0
    for t in burst:
        t.cancel()
    await asyncio.gather(*burst, return_exceptions=True)


async def test_a_head_that_waited_too_long_refuses_newcomers(clock: Clock) -> None:
    """No departure to time (the gate is stuck, or a burst just began): the head's own wait decides."""
    adm = Admission(lambda: 1, max_queue=100, queue_timeout=5.0, max_queue_wait=0.5)
    await adm.acquire()
    head = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    clock.now += 0.4
    second = asyncio.create_task(adm.acquire())  # the head waited 0.4 s <= 0.5 s: queued
    await asyncio.sleep(0)
    assert adm.queued == 2
    clock.now += 0.2
    with pytest.raises(Rejected, match="queue_wait"):  # the head waited 0.6 s
        await adm.acquire()
    adm.release()
    await head
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)


async def test_light_traffic_queues_on_the_queue_bounds_alone() -> None:
    """No departure seen yet and nobody waiting: a second request waits (bounded by max_queue and the
    timeout) instead of being refused for a predicted wait."""
    adm = Admission(lambda: 1, max_queue=1, queue_timeout=0.2, max_queue_wait=0.5)
    await adm.acquire()
    with pytest.raises(Rejected, match="queue_timeout"):
        await adm.acquire()


async def test_fast_departures_let_a_burst_wait(clock: Clock) -> None:
    adm = Admission(lambda: 1, max_queue=1000, queue_timeout=5.0, max_queue_wait=0.5)
    await adm.acquire()
    await _departures(adm, clock, 100, 0.001)  # 1,000 departures a second
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(300)]  # 300 / 1000 = 0.3 s: all wait
    await asyncio.sleep(0)
    assert adm.queued == 300 and adm.rejected["queue_wait"] == 0
    for _ in range(301):
        adm.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
