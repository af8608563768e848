"""The router's loop-lag clock (``router.looplag``) and what it excuses (``Dispatcher._failed``)."""

from __future__ import annotations

import time

import pytest

from router.config import RouterConfig
from router.dispatch import Dispatcher
from router.looplag import EXCUSE_SHARE, LoopLag
from router.metrics import RouterMetrics
from router.model.model import RoutingModel


def test_a_punctual_loop_is_never_late() -> None:
    lag = LoopLag(0.1)
    for i in range(100):
        lag.tick(i * 0.1)
    assert lag.share(0.0, 9.9) == pytest.approx(0.0, abs=1e-9)


def test_a_starved_loop_is_late_for_most_of_the_interval() -> None:
    lag = LoopLag(0.1)
    t = 0.0
    for _ in range(20):  # every wake-up 0.4 s late: 0.4 of each 0.5 s
        lag.tick(t)
        t += 0.5
    assert lag.share(1.0, t - 0.5) == pytest.approx(0.8)
    assert lag.share(1.0, t - 0.5) >= EXCUSE_SHARE


def test_one_long_stall_counts_only_inside_the_interval_and_the_overdue_tick_counts() -> None:
    lag = LoopLag(0.1)
    for i in range(11):
        lag.tick(i * 0.1)  # 0.0 .. 1.0 on time
    lag.tick(4.1)  # 3 s late: the loop was blocked over [1.1, 4.1]
    assert lag.share(3.1, 4.1) == pytest.approx(1.0)  # all of this interval was the stall
    assert lag.share(0.0, 4.1) == pytest.approx(3.0 / 4.1)
    # no tick since 4.1: at 6.1 the tick due at 4.2 is 1.9 s overdue
    assert lag.share(4.1, 6.1) == pytest.approx(1.9 / 2.0)
    assert lag.share(5.0, 5.0) == 0.0
    with pytest.raises(ValueError):
        LoopLag(0.0)


def _dispatcher() -> Dispatcher:
    cfg = RouterConfig()
    core = RoutingModel(cfg.model, lambda job: None)
    return Dispatcher(cfg, core, RouterMetrics(core, None), tick_period=0.1)


def _fail_timeouts(d: Dispatcher, n: int, started: float) -> None:
    for _ in range(n):
        d._failed("i0", "timeout_connect", "http://127.0.0.1:9", "rid-1", accepted=False, started=started)


def test_a_timeout_while_the_loop_was_starved_is_not_charged_to_the_instance() -> None:
    d = _dispatcher()
    now = time.monotonic()
    for k in range(7, -1, -1):  # the last 3.5 s: a wake-up every 0.5 s instead of 0.1 s
        d.lag.tick(now - 0.5 * k)
    _fail_timeouts(d, 5, started=now - 3.0)  # more than --breaker-failures (3)
    assert d.metrics.timeouts_excused._value.get() == 5
    assert d.metrics.timeouts.labels("connect")._value.get() == 5  # still counted as timeouts
    assert not d.breakers.blocked()


def test_a_timeout_on_a_punctual_loop_is_charged() -> None:
    d = _dispatcher()
    now = time.monotonic()
    for k in range(30, -1, -1):
        d.lag.tick(now - 0.1 * k)
    _fail_timeouts(d, 3, started=now - 3.0)
    assert d.metrics.timeouts_excused._value.get() == 0
    assert "i0" in d.breakers.blocked()


def _with_static_instance(d: Dispatcher) -> None:
    d.core.add_static("i0", 16, "http://127.0.0.1:9")


def test_a_silent_load_stream_is_ejected_on_a_punctual_loop_not_on_a_late_one() -> None:
    for late in (False, True):
        d = _dispatcher()
        _with_static_instance(d)
        t = 100.0
        for _ in range(5):  # a load report every 0.1 s: usual interval 0.1 s, so silent after 0.5 s
            d.on_load("i0", t)
            d.tick(t)
            t += 0.1
        last = t - 0.1
        step = 0.5 if late else 0.1  # a late loop wakes every 0.5 s instead of every 0.1 s
        while t < last + 2.0:
            d.tick(t)
            t += step
        assert d.breakers.is_stalled("i0") is not late, late
