"""``python -m launch.bench.scale``: what one router carries at N instances, measured in the simulator.

Runs ``launch simulate``'s own machinery (:func:`launch.sim.cluster.simulate`, one policy) on a trace
window compressed so that every instance gets the same load whatever N is (``--rate-per-instance``:
the trace's rate times N / 16 by default, i.e. the load of 16 instances at rate scale 1, per 16), and
times the router's model from the inside by wrapping, for the run only, three methods of
:class:`router.model.model.RoutingModel`:

* ``route_hashes`` -- the decision: the index match over the prompt's blocks and the policy over every
  instance. Reported per request (mean, p50, p99 of wall time on this machine).
* ``on_events`` -- KV event batches applied to the index; ``on_load`` -- load reports. Reported as
  batches, events and blocks per virtual second (the rates a live router's subscription would ingest)
  and the wall time they cost per virtual second (one router core's share). The simulator hands load
  reports to the model only when a decision needs them, so ``load_reports_per_s`` is what it applied,
  not what live agents send (docs/scale.md derives that from the report periods).

Index memory: the index's resident (instance, block) pairs and distinct hashes at the end (and the peak
over the run, sampled at each decision), converted to bytes with the per-entry costs measured by
``launch.bench.index_bench`` (docs/kvindex.md: 84 bytes per distinct hash + 8 per pair), and the
process's peak RSS for comparison. Prints JSON (one object per ``--instances`` value).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from launch.sim.cluster import SimConfig, simulate
from launch.trace import DEFAULT_TRACE, load_trace, window
from router.model.model import RoutingModel
from router.model.policies import make_policy

BYTES_PER_HASH = 84.0  # docs/kvindex.md: the dict slot + key int of one distinct hash (RSS delta)
BYTES_PER_PAIR = 8.0  # docs/kvindex.md: one array('q') entry of an instance's block log


class Probe:
    """Wall-time and count accumulators filled by the wrapped model methods."""

    def __init__(self) -> None:
        self.route_s: list[float] = []
        self.event_batches = 0
        self.events = 0
        self.blocks_stored = 0
        self.events_s = 0.0
        self.loads = 0
        self.loads_s = 0.0
        self.peak_pairs = 0
        self.peak_hashes = 0
        self.model: RoutingModel | None = None

    def sample(self) -> None:
        idx = self.model.index if self.model is not None else None
        if idx is not None and len(self.route_s) % 64 == 0:
            self.peak_pairs = max(self.peak_pairs, _pairs(idx))
            self.peak_hashes = max(self.peak_hashes, _distinct(idx))


def _distinct(idx: Any) -> int:
    return int(idx.total_blocks())  # distinct hashes held by any instance


def _pairs(idx: Any) -> int:
    return sum(idx.blocks_of(n) for n in idx.instances())  # resident (instance, block) pairs


def deep_size(root: object) -> int:
    """Bytes of every Python object reachable from ``root`` through containers and instance attributes
    (each object once): the index's own objects, without allocator slack (RSS is above this)."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
        for cls in type(o).__mro__:  # slots of base classes too (GlobalIndex keeps its own in IndexCore)
            for slot in cls.__dict__.get("__slots__", ()):
                if hasattr(o, slot):
                    stack.append(getattr(o, slot))
    return total


@contextmanager
def probed(probe: Probe) -> Iterator[None]:
    """Wrap RoutingModel.route_hashes / on_events / on_load for the duration (restored after)."""
    orig: dict[str, Callable[..., Any]] = {
        n: getattr(RoutingModel, n) for n in ("route_hashes", "on_events", "on_load", "__init__")
    }

    def init(self: RoutingModel, *a: Any, **k: Any) -> None:
        orig["__init__"](self, *a, **k)
        probe.model = self

    def route_hashes(self: RoutingModel, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        r = orig["route_hashes"](self, *a, **k)
        probe.route_s.append(time.perf_counter() - t)
        probe.sample()
        return r

    def on_events(self: RoutingModel, name: str, events: Sequence[Any], *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        r = orig["on_events"](self, name, events, *a, **k)
        probe.events_s += time.perf_counter() - t
        probe.event_batches += 1
        probe.events += len(events)
        probe.blocks_stored += sum(
            len(getattr(e, "block_hashes", ())) for e in events if type(e).__name__ == "BlockStored"
        )
        return r

    def on_load(self: RoutingModel, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        r = orig["on_load"](self, *a, **k)
        probe.loads_s += time.perf_counter() - t
        probe.loads += 1
        return r

    for n, f in (
        ("route_hashes", route_hashes),
        ("on_events", on_events),
        ("on_load", on_load),
        ("__init__", init),
    ):
        setattr(RoutingModel, n, f)
    try:
        yield
    finally:
        for n, f in orig.items():
            setattr(RoutingModel, n, f)


def measure(
    instances: int, trace: Path, duration: float, rate_scale: float, policy: str, cfg: SimConfig
) -> dict[str, Any]:
    """One simulated run at ``instances``; the figures described in the module docstring."""
    plan = window(load_trace(trace), rate_scale, duration)
    probe = Probe()
    t0 = time.perf_counter()
    with probed(probe):
        res = simulate(plan, make_policy(policy, cfg.seed), replace(cfg, instances=instances))
    wall = time.perf_counter() - t0
    idx = probe.model.index if probe.model is not None else None
    pairs, hashes = (_pairs(idx), _distinct(idx)) if idx is not None else (0, 0)
    measured = deep_size(idx) if idx is not None else 0
    vs = max(res.virtual_s, 1e-9)
    us = np.array(probe.route_s) * 1e6
    return {
        "instances": instances,
        "policy": policy,
        "requests": len(us),
        "rate_scale": rate_scale,
        "virtual_s": round(res.virtual_s, 1),
        "sim_wall_s": round(wall, 1),
        "decision_us": {
            k: round(float(v), 1)
            for k, v in (("mean", us.mean()), ("p50", np.percentile(us, 50)), ("p99", np.percentile(us, 99)))
        },
        "requests_per_s": round(len(us) / vs, 2),
        "event_batches_per_s": round(probe.event_batches / vs, 1),
        "events_per_s": round(probe.events / vs, 1),
        "blocks_stored_per_s": round(probe.blocks_stored / vs, 1),
        "load_reports_per_s": round(probe.loads / vs, 1),
        "ingest_cpu_share": round((probe.events_s + probe.loads_s) / vs, 4),
        "decision_cpu_share": round(float(np.sum(probe.route_s)) / vs, 4),
        "index_pairs_end": pairs,
        "index_hashes_end": hashes,
        "index_pairs_peak": max(pairs, probe.peak_pairs),
        "index_hashes_peak": max(hashes, probe.peak_hashes),
        "index_bytes_end_measured": measured,
        "index_bytes_per_pair_end": round(measured / max(1, pairs), 1),
        "index_bytes_peak_derived": int(
            BYTES_PER_HASH * max(hashes, probe.peak_hashes) + BYTES_PER_PAIR * max(pairs, probe.peak_pairs)
        ),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "hit_ratio": round(
            sum(r.cached_tokens for r in res.records) / max(1, sum(r.prompt_tokens for r in res.records)), 4
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run one measurement per ``--instances`` value, print JSON lines."""
    p = argparse.ArgumentParser(prog="python -m launch.bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--instances", default="64,256", help="comma-separated instance counts (default %(default)s)"
    )
    p.add_argument(
        "--trace", type=Path, default=DEFAULT_TRACE, help="trace file (default: the shipped Mooncake trace)"
    )
    p.add_argument(
        "--duration", type=float, default=30.0, help="seconds of (compressed) trace (default %(default)s)"
    )
    p.add_argument(
        "--rate-per-16", type=float, default=1.0,
        help="rate scale per 16 instances: N instances replay at N/16 times this (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--policy", default="lmetric", help="routing policy (default %(default)s)")
    p.add_argument(
        "--max-total-tokens", type=int, default=None, help="KV capacity per engine (default: profile)"
    )
    a = p.parse_args(argv)
    cfg = SimConfig() if a.max_total_tokens is None else SimConfig(max_total_tokens=a.max_total_tokens)
    for n in (int(x) for x in a.instances.split(",")):
        out = measure(n, a.trace, a.duration, a.rate_per_16 * n / 16, a.policy, cfg)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
