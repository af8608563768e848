"""router.model.concurrency: per-instance in-flight limits that follow the engine's own concurrency."""

from __future__ import annotations

import pytest

from kvindex.protocol import LoadReport
from kvindex.protocol.messages import decode_message, encode_message
from router.model.concurrency import ConcurrencyLimits


def test_limit_drops_to_what_the_engine_runs_when_it_queues_and_probes_up_when_full() -> None:
    lim = ConcurrencyLimits(ceiling=64, queue_allowance=2)
    assert lim.limit_of("a") == 64  # before any report: the ceiling
    assert lim.on_report("a", running=10, waiting=3, inflight=40) == 12  # queue beyond the allowance
    assert lim.on_report("a", running=12, waiting=2, inflight=12) == 13  # allowance only, kept full: +1
    assert lim.on_report("a", running=12, waiting=0, inflight=5) == 13  # not full: stays
    assert lim.on_report("a", running=0, waiting=9, inflight=20) == 2  # never below floor (1) + allowance
    lim.forget("a")
    assert lim.limit_of("a") == 64
    assert lim.total(["a", "b"]) == 128


def test_limit_stays_within_floor_and_ceiling() -> None:
    lim = ConcurrencyLimits(ceiling=3, floor=2, queue_allowance=0)
    for _ in range(10):
        lim.on_report("a", running=50, waiting=0, inflight=50)
    assert lim.limit_of("a") == 3
    lim.on_report("a", running=0, waiting=5, inflight=3)
    assert lim.limit_of("a") == 2 and lim.snapshot() == {"a": 2}


@pytest.mark.parametrize("args", [(0, 1, 0), (4, 5, 0), (4, 1, -1)])
def test_bad_arguments(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimits(*args)


def test_a_queue_too_long_in_seconds_stops_admissions_though_few_requests_wait() -> None:
    """Two waiting requests can be 0.1 s of prefill or 10 s: past ``queue_seconds`` the limit drops to
    what the engine holds, however few wait; an unknown prefill speed leaves the request count alone."""
    lim = ConcurrencyLimits(ceiling=64, queue_allowance=2, queue_seconds=1.0)
    assert lim.on_report("a", running=10, waiting=1, inflight=64, queued_seconds=0.5) == 64  # within both
    assert lim.on_report("a", running=10, waiting=1, inflight=11, queued_seconds=4.0) == 11  # one long prompt
    assert lim.on_report("a", running=10, waiting=2, inflight=12, queued_seconds=4.0) == 11  # stays closed
    assert (
        lim.on_report("a", running=11, waiting=1, inflight=11, queued_seconds=0.2) == 12
    )  # drained, full: +1
    assert lim.on_report("a", running=11, waiting=0, inflight=12, queued_seconds=9.0) == 13  # nothing waits
    assert lim.on_report("a", running=11, waiting=1, inflight=13, queued_seconds=None) == 14  # speed unknown
    off = ConcurrencyLimits(ceiling=64, queue_allowance=2, queue_seconds=0.0)
    assert off.on_report("a", running=10, waiting=1, inflight=11, queued_seconds=99.0) == 64  # 0 = off


def test_load_report_prefill_speed_is_optional_on_the_wire() -> None:
    rep = LoadReport("a", 1, 0.0, 2, 1, 8192, 0, 1000, 128, 40_000, 2_000_000)
    assert rep.prefill_seconds_per_token == pytest.approx(2.0 / 40_000)
    assert decode_message(encode_message(rep)) == rep
    old = LoadReport("a", 1, 0.0, 2, 1, 8192, 0, 1000, 128)  # an older agent: no prefill counters
    assert old.prefill_seconds_per_token is None
    assert decode_message(encode_message(old)) == old
