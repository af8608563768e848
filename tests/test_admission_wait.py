"""router.admission: the predicted-wait bound (``max_queue_wait``) sizes the queue to the departure rate."""

from __future__ import annotations

import asyncio

import pytest

from router.admission import RATE_MIN_SAMPLES, RATE_WINDOW, Admission, Rejected


async def test_predicted_wait_refuses_at_once_when_the_queue_moves_too_slowly() -> None:
    adm = Admission(lambda: 1, max_queue=100, queue_timeout=5.0, max_queue_wait=0.25)
    await adm.acquire()
    for _ in range(RATE_MIN_SAMPLES - 2):  # too few grants to predict from: the queue's bounds only
        adm.release()
        await adm.acquire()
    assert adm.departure_rate() is None and adm.predicted_wait() is None
    for _ in range(2):  # RATE_MIN_SAMPLES + 1 grants over RATE_WINDOW = 2 s: 4.5 a second
        adm.release()
        await adm.acquire()
    assert adm.departure_rate() == pytest.approx((RATE_MIN_SAMPLES + 1) / RATE_WINDOW)
    first = asyncio.create_task(adm.acquire())  # (0 + 1) / 4.5 = 0.22 s: queued
    await asyncio.sleep(0)
    assert adm.queued == 1
    with pytest.raises(Rejected, match="queue_wait"):  # (1 + 1) / 4.5 = 0.44 s > 0.25 s: refused at once
        await adm.acquire()
    assert adm.rejected["queue_wait"] == 1
    adm.release()  # the slot goes to the queued request
    await first
    assert adm.inflight == 1


async def test_light_traffic_queues_on_the_queue_bounds_alone() -> None:
    """One grant in the window is no rate: a second request waits (bounded by max_queue and the timeout)
    instead of being refused for a predicted wait of 1 / 0.5 s."""
    adm = Admission(lambda: 1, max_queue=1, queue_timeout=0.2, max_queue_wait=0.5)
    await adm.acquire()
    with pytest.raises(Rejected, match="queue_timeout"):
        await adm.acquire()


async def test_fast_departures_let_a_burst_wait() -> None:
    adm = Admission(lambda: 1, max_queue=1000, queue_timeout=5.0, max_queue_wait=0.5)
    await adm.acquire()
    for _ in range(2000):  # 1,000 releases a second
        adm.release()
        await adm.acquire()
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(300)]  # 300 / 1000 = 0.3 s: all wait
    await asyncio.sleep(0)
    assert adm.queued == 300 and adm.rejected["queue_wait"] == 0
    for _ in range(301):
        adm.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
