"""launch/bench/scale.py on a tiny run: it reports every figure docs/scale.md uses, and leaves
RoutingModel as it found it."""

from __future__ import annotations

from launch.bench.scale import deep_size, measure
from launch.sim.cluster import SimConfig
from launch.trace import DEFAULT_TRACE
from router.model.model import RoutingModel


def test_scale_bench_reports_and_restores() -> None:
    before = {n: getattr(RoutingModel, n) for n in ("route_hashes", "on_events", "on_load", "__init__")}
    out = measure(4, DEFAULT_TRACE, 10.0, 1.0, "lmetric", SimConfig())
    assert {n: getattr(RoutingModel, n) for n in before} == before
    assert out["instances"] == 4 and out["requests"] > 0
    assert 0 < out["decision_us"]["p50"] <= out["decision_us"]["p99"]
    assert out["blocks_stored_per_s"] > 0  # (load reports: the simulator delivers them lazily)
    assert out["index_pairs_end"] > 0 and out["index_bytes_end_measured"] > 8 * out["index_pairs_end"]


def test_deep_size_counts_shared_objects_once() -> None:
    x = list(range(1000))
    assert deep_size([x, x]) < 2 * deep_size(x)
