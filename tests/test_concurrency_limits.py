"""router.model.concurrency: per-instance in-flight limits that follow the engine's own concurrency."""

from __future__ import annotations

import pytest

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
