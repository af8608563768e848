"""``launch tail``: events always, load reports only when they change (or at most every ``--load-every``).

The filter alone (pure), then ``run_tail`` against a real PUB socket on an OS-assigned port.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import zmq

from kvindex.protocol import (
    TOPIC_EVENTS,
    TOPIC_LOAD,
    BlockStored,
    EventBatch,
    LoadReport,
    encode_message,
    make_frame,
)
from launch.__main__ import parse_args
from launch.tail import LoadFilter, render, run_tail

pytestmark = pytest.mark.timeout(30)


def load(instance: str, running: int, seq: int = 0, ts: float = 0.0) -> dict[str, Any]:
    """The record ``tail`` makes of a load report."""
    return next(render(seq, LoadReport(instance, 1, ts, running, 0, 0, 10, 1000, 0)))


def test_load_filter_prints_changes_only_per_instance() -> None:
    f = LoadFilter()
    assert f.wants(load("a", 0, seq=1, ts=1.0), 0.0)
    assert not f.wants(load("a", 0, seq=2, ts=2.0), 1.0)  # same load, new seq and ts
    assert f.wants(load("b", 0), 1.0)  # another instance has its own last
    assert f.wants(load("a", 1), 1.1)
    assert f.wants(load("a", 0), 1.2)  # back to the earlier value: a change from the last printed
    assert not f.wants(load("a", 0), 100.0)


def test_load_filter_every_caps_the_rate_of_changes() -> None:
    f = LoadFilter(every=5.0)
    assert f.wants(load("a", 0), 0.0)
    assert not f.wants(load("a", 1), 4.9)  # changed, but too soon
    assert f.wants(load("a", 2), 5.0)
    assert not f.wants(load("a", 2), 20.0)  # not changed: never, however long
    with pytest.raises(ValueError):
        LoadFilter(every=-1.0)


def test_tail_prints_events_always_and_idle_load_once(capsys: pytest.CaptureFixture[str]) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    seq = 0

    def send(topic: bytes, msg: Any) -> None:
        nonlocal seq
        pub.send_multipart(make_frame(topic, seq, encode_message(msg)))
        seq += 1

    def publish() -> None:
        def idle(n: int, running: int = 0) -> None:
            for _ in range(n):
                send(TOPIC_LOAD, LoadReport("i0", 1, time.time(), running, 0, 0, 10, 1000, 0))
                time.sleep(0.02)

        idle(50)  # ~1 s: the subscriber connects meanwhile (slow joiner)
        send(TOPIC_EVENTS, EventBatch("i0", 1, seq, time.time(), (BlockStored((1, 2), None, (0,) * 8, 4),)))
        idle(10)
        idle(3, running=2)
        idle(10)
        send(TOPIC_EVENTS, EventBatch("i0", 1, seq, time.time(), (BlockStored((3,), 2, (0,) * 4, 4),)))

    thread = threading.Thread(target=publish)
    try:
        args = parse_args(["tail", "--endpoint", endpoint, "--count", "5", "--timeout", "10"])
        thread.start()
        assert run_tail(args) == 0  # in the main thread: it installs signal handlers
    finally:
        thread.join()
        pub.close(0)
        ctx.term()
    lines = capsys.readouterr().out.splitlines()
    kinds = [line.split()[3] for line in lines]
    assert kinds == ["load", "BlockStored", "load", "load", "BlockStored"], lines
    assert "running=0" in lines[0] and "running=2" in lines[2] and "running=0" in lines[3]
    assert "blocks=2" in lines[1] and "blocks=1" in lines[4]
