"""The chaos and overload benchmarks' pure parts: failure attribution, figures, argument checks (the
benchmarks themselves run a cluster for minutes and are not tests)."""

from __future__ import annotations

import argparse

from launch.__main__ import parse_args
from launch.bench.chaos_report import Done, Event, Run, analyse, explained, format_report
from launch.bench.overload import Answer, Phase, figures
from launch.bench.overload import format_report as overload_report


def test_a_failure_is_explained_only_by_an_event_it_depended_on_while_in_flight() -> None:
    engine = Event(at=100.0, role="engine", instance="1", action="kill", pid=1, resumed_at=102.0)
    router = Event(at=200.0, role="router-primary", instance=None, action="kill", pid=2)
    events = [engine, router]
    assert explained(Done(99.0, 101.0, False, "x", "1"), events, 2.0) is engine
    assert explained(Done(99.0, 101.0, False, "x", "0"), events, 2.0) is None  # another instance
    assert explained(Done(99.0, 101.0, False, "x", None), events, 2.0) is engine  # instance unknown
    assert explained(Done(107.0, 108.0, False, "x", "1"), events, 2.0) is None  # after the grace
    assert explained(Done(190.0, 201.0, False, "x", "3"), events, 2.0) is router  # every request needs it
    assert explained(Done(10.0, 20.0, False, "x", "1"), events, 2.0) is None
    standby = Event(at=300.0, role="router-standby", instance=None, action="stop", pid=3, resumed_at=305.0)
    assert explained(Done(299.0, 301.0, False, "x", "1"), [standby], 2.0) is None
    # A 429 (no instance served it) is explained by an engine/agent outage until that instance healed.
    engine.heal_s = 7.0
    assert explained(Done(106.5, 106.51, False, "HTTP 429: full", None), [engine], 2.0) is engine
    assert explained(Done(106.5, 106.51, False, "HTTP 502: x", None), [engine], 2.0) is None
    assert explained(Done(112.0, 112.01, False, "HTTP 429: full", None), [engine], 2.0) is None  # healed


def test_chaos_analysis_counts_unexplained_failures() -> None:
    run = Run(
        events=[
            Event(at=100.0, role="engine", instance="1", action="stop", pid=1, resumed_at=105.0, detect_s=0.4)
        ],
        requests=[
            Done(90.0, 91.0, True, "ok", "0"),
            Done(99.0, 104.0, False, "stream error", "1"),
            Done(150.0, 151.0, False, "HTTP 502", "2"),
        ],
        rss=[(0.0, 1000), (2.0, 1100)],
    )
    fig = analyse(run, argparse.Namespace(duration=1.0))
    assert (fig["requests"], fig["failed"], fig["failed_unexplained"]) == (3, 2, 1)
    assert fig["events"][0]["failures"] == 1 and fig["router_rss_kib"]["end"] == 1100
    assert "engine-1" in format_report(fig) and "HTTP 502" in format_report(fig)


def test_overload_figures() -> None:
    phase = Phase(
        answers=[
            Answer(0.0, 200, 0.01, 0.5),
            Answer(0.0, 429, 0.002),
            Answer(0.0, 429, 0.004),
            Answer(0.0, 0, 1.0),
        ],
        rss=[(0.0, 100), (1.0, 105)],
    )
    f = figures(phase)
    assert (f["sent"], f["ok"], f["rejected_429"], f["other"]) == (4, 1, 2, 1)
    assert f["ttft_p99_s"] == 0.5 and abs(f["reject_max_ms"] - 4.0) < 1e-9 and f["rss_end_kib"] == 105
    fig = {"capacity_rps": 1.0, "overload_rps": 10.0, "at_capacity": f, "overload": f, "machine": "m"}
    fig |= {
        "ttft_p99_ratio": 1.0,
        "rss_growth": 0.05,
        "index_blocks_before_overload": 1,
        "index_blocks_after_overload": 2,
    }
    assert "429 p99 (ms)" in overload_report(fig)


def test_both_commands_parse() -> None:
    a = parse_args(["chaos-bench", "--duration", "60", "--interval", "10"])
    assert (a.duration, a.interval, a.stop_for) == (60.0, 10.0, 5.0)
    b = parse_args(["overload-bench", "--duration", "60", "--router-arg=--max-queue=0"])
    assert b.factor == 10.0 and b.router_arg == ["--max-queue=0"]
