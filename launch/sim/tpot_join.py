"""Which routing decisions cost TPOT: per-request records joined with the decisions that placed them.

``python -m launch.sim.tpot_join --trace T --profile P --rate-scale X --policies a,b [--json OUT]``
simulates the trace's first ``--window`` seconds once per policy and joins, for every request, the
views the policy saw (:class:`RecordingPolicy` wraps the real policy object: same decisions), the
decision, and the request's TTFT/TPOT.

Theory of operation
-------------------
With prefill-first scheduling (SGLang's default, our engine's), a request's prefill steps stop every
request decoding on its instance for their whole duration. A request ``a`` routed to instance ``i`` and
prefilled in ``[first_token_a - prefill_a, first_token_a]`` therefore adds, to each request ``v``
decoding on ``i`` in that interval, the overlap to ``v``'s decode time, and ``overlap / (output_v - 1)``
to ``v``'s TPOT. Summed over ``v`` and divided by the number of requests, that is ``a``'s share of the
mean TPOT (``inflicted``); summed over every ``a`` it is the part of the mean TPOT spent stalled behind
prefills. ``prefill_a`` is the profile's step time of ``a``'s uncached tokens in chunks of the chunked
prefill size on top of its cached prefix (the engine's own roofline), so the attribution is exact up to
chunks shared with other prefills in one step. The report groups the inflicted TPOT by what the decision
looked like: the request's uncached tokens, the decoding requests on the chosen instance (its reported
``running``) against the fewest on any candidate, and LMetric's ``batch_over_prefill`` flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.engine.profiles import get_profile
from launch.sim.cluster import SimConfig, SimResult, simulate
from launch.sim.ingest import ingest_times
from launch.sim.prompts import PromptFactory
from launch.sim.run import seeded_policy
from launch.summary import RequestRecord
from launch.trace import load_trace, window
from router.model.policies import Decision, InstanceView, Policy

__all__ = ["Call", "Joined", "RecordingPolicy", "join_run", "recorded_run"]


class RecordingPolicy(Policy):
    """``inner`` unchanged, remembering what every ``choose`` saw and returned (in call order)."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[Call] = []

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        d = self.inner.choose(views, prompt_tokens, cached)
        self.calls.append((tuple(views), prompt_tokens, dict(cached), d))
        return d


@dataclass(frozen=True, slots=True)
class Joined:
    """One request: its decision's inputs and output, and its latencies (seconds)."""

    index: int
    instance: str
    prompt: int
    new: int
    failure_cases: tuple[str, ...]
    running_chosen: int
    running_min: int
    batch_chosen: int
    batch_min: int
    prefill_chosen: int  # queued prefill + new tokens there
    prefill_min: int
    send: float
    ttft: float
    e2e: float
    output: int
    prefill_s: float
    inflicted: float = 0.0  # share of the mean TPOT times N (seconds of TPOT summed over victims)


def _prefill_seconds(profile_name: str, prompt: int, new: int, chunk: int) -> float:
    prof = get_profile(profile_name)
    t, ctx = 0.0, prompt - new
    while new > 0:
        c = min(new, chunk) if chunk > 0 else new
        t += prof.step_time([(c, ctx)])
        ctx += c
        new -= c
    return t


Call = tuple[tuple[InstanceView, ...], int, dict[str, int], Decision]
"""One decision as :class:`RecordingPolicy` keeps it: the views, the prompt (tokens), the cached tokens
per instance, the decision."""


def recorded_run(
    trace: Path, window_s: float, rate_scale: float, policy: Policy, cfg: SimConfig
) -> tuple[SimResult, list[tuple[RequestRecord, Call]]]:
    """Simulate the trace's first ``window_s`` seconds at ``rate_scale`` with ``policy`` recorded; return the
    run and each request's record beside its decision (matched through the router's ingest order,
    :func:`launch.sim.ingest.ingest_times`: the order the policy was asked in)."""
    reqs = [r for r in load_trace(trace) if r.arrival < window_s]
    plan = window(reqs, rate_scale, None)
    rec = RecordingPolicy(policy)
    res = simulate(plan, rec, cfg, prompts=PromptFactory(cfg.page_size, cfg.vocab_size))
    routed = ingest_times(
        [t for t, _ in plan], [r.input_length for _, r in plan], cfg.ingest_overhead, cfg.ingest_per_token
    )
    order = [r.index for _, r in sorted(zip(routed, (r for _, r in plan), strict=True),
                                         key=lambda p: (p[0], p[1].index))]  # fmt: skip
    by_index = {r.index: r for r in res.records}
    return res, [(by_index[idx], call) for idx, call in zip(order, rec.calls, strict=True)]


def join_run(trace: Path, window_s: float, rate_scale: float, policy: str, cfg: SimConfig) -> list[Joined]:
    """Simulate ``policy`` and return every successful request's :class:`Joined`, with ``inflicted``."""
    _, pairs = recorded_run(trace, window_s, rate_scale, seeded_policy(policy, cfg), cfg)
    out: list[Joined] = []
    for r, (views, prompt, cached, d) in pairs:
        idx = r.index
        if r.status != "ok" or r.ttft is None or r.e2e is None:
            continue
        ch = next(v for v in views if v.name == d.instance)
        pre = {v.name: v.queued_prefill_tokens + max(prompt - cached.get(v.name, 0), 0) for v in views}
        out.append(
            Joined(
                index=idx,
                instance=d.instance,
                prompt=prompt,
                new=d.new_tokens,
                failure_cases=d.failure_cases,
                running_chosen=ch.running,
                running_min=min(v.running for v in views),
                batch_chosen=ch.batch_size,
                batch_min=min(v.batch_size for v in views),
                prefill_chosen=pre[d.instance],
                prefill_min=min(pre.values()),
                send=r.start_time,
                ttft=r.ttft,
                e2e=r.e2e,
                output=r.output_tokens,
                prefill_s=_prefill_seconds(cfg.profile, prompt, d.new_tokens, cfg.chunked_prefill_size),
            )
        )
    return _attribute(out)


def _attribute(rows: list[Joined]) -> list[Joined]:
    by_inst: dict[str, list[Joined]] = {}
    for j in rows:
        by_inst.setdefault(j.instance, []).append(j)
    inflicted: dict[int, float] = {}
    for group in by_inst.values():
        victims = [(v.send + v.ttft, v.send + v.e2e, v.output - 1) for v in group if v.output >= 2]
        for a in group:
            end = a.send + a.ttft
            start = end - a.prefill_s
            s = 0.0
            for v0, v1, n in victims:
                ov = min(end, v1) - max(start, v0)
                if ov > 0:
                    s += ov / n
            inflicted[a.index] = s
    return [_with(j, inflicted[j.index]) for j in rows]


def _with(j: Joined, inflicted: float) -> Joined:
    d = {k: getattr(j, k) for k in j.__dataclass_fields__}
    d["inflicted"] = inflicted
    return Joined(**d)


NEW_BUCKETS = ((0, 2048), (2048, 8192), (8192, 32768), (32768, 1 << 30))


def breakdown(rows: Sequence[Joined]) -> dict[str, Any]:
    """Mean TPOT and its stalled part, and the inflicted TPOT (ms, as a share of the mean) by group."""
    n = len(rows)
    tpots = [(j.e2e - j.ttft) / (j.output - 1) for j in rows if j.output >= 2]
    total = sum(j.inflicted for j in rows)

    def share(sel: Sequence[Joined]) -> dict[str, float]:
        return {"requests": len(sel), "inflicted_ms": round(1e3 * sum(j.inflicted for j in sel) / n, 3)}

    groups: dict[str, dict[str, float]] = {}
    for lo, hi in NEW_BUCKETS:
        groups[f"new {lo}-{hi if hi < 1 << 30 else 'inf'}"] = share([j for j in rows if lo <= j.new < hi])
    groups["chosen runs more decodes than the fewest"] = share(
        [j for j in rows if j.running_chosen > j.running_min]
    )
    groups["chosen runs the fewest decodes"] = share([j for j in rows if j.running_chosen == j.running_min])
    groups["batch_over_prefill"] = share([j for j in rows if "batch_over_prefill" in j.failure_cases])
    big = [j for j in rows if j.new >= 8192]
    groups["new >= 8192 and more decodes than the fewest"] = share(
        [j for j in big if j.running_chosen > j.running_min]
    )
    dec = [j for j in rows if j.output >= 2]
    per = sorted(((j.e2e - j.ttft) / (j.output - 1) for j in dec), reverse=True)
    short = [(j.e2e - j.ttft) / (j.output - 1) for j in dec if j.output <= 10]
    longer = [(j.e2e - j.ttft) / (j.output - 1) for j in dec if j.output > 10]
    return {
        "requests": n,
        "ttft_mean_s": sum(j.ttft for j in rows) / n,
        "tpot_mean_ms": 1e3 * sum(tpots) / len(tpots),
        "stalled_tpot_ms": 1e3 * total / len(tpots),
        # how much of the mean the few short answers carry: TPOT = decode time / (output - 1)
        "tpot_from_outputs_le_10_ms": 1e3 * sum(short) / len(dec),
        "outputs_le_10": len(short),
        "tpot_mean_outputs_gt_10_ms": 1e3 * sum(longer) / max(len(longer), 1),
        "tpot_token_weighted_ms": 1e3 * sum(j.e2e - j.ttft for j in dec) / sum(j.output - 1 for j in dec),
        "tpot_top10_requests_ms": 1e3 * sum(per[:10]) / len(dec),
        "groups": groups,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sim.tpot_join", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--profile", default="h20-qwen2.5-7b")
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--window", type=float, default=1200.0)
    p.add_argument("--rate-scale", type=float, required=True)
    p.add_argument("--policies", default="lmetric,sglang_cache_aware")
    p.add_argument("--ingest-overhead", type=float, default=SimConfig().ingest_overhead)
    p.add_argument("--ingest-per-token", type=float, default=SimConfig().ingest_per_token)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    cfg = SimConfig(instances=a.instances, profile=a.profile, ingest_overhead=a.ingest_overhead,
                    ingest_per_token=a.ingest_per_token)  # fmt: skip
    report: dict[str, Any] = {"trace": str(a.trace), "profile": a.profile, "rate_scale": a.rate_scale,
                              "ingest": [a.ingest_overhead, a.ingest_per_token], "policies": {}}  # fmt: skip
    for name in a.policies.split(","):
        rows = join_run(a.trace, a.window, a.rate_scale, name, cfg)
        b = breakdown(rows)
        report["policies"][name] = b
        print(f"== {name}: TTFT {b['ttft_mean_s']:.3f} s, TPOT {b['tpot_mean_ms']:.1f} ms, of which stalled "
              f"behind prefills {b['stalled_tpot_ms']:.1f} ms; {b['outputs_le_10']} answers of <= 10 tokens "
              f"carry {b['tpot_from_outputs_le_10_ms']:.1f} ms, the top 10 requests "
              f"{b['tpot_top10_requests_ms']:.1f} ms; TPOT over answers > 10 tokens "
              f"{b['tpot_mean_outputs_gt_10_ms']:.1f} ms, token-weighted {b['tpot_token_weighted_ms']:.1f} ms")  # fmt: skip
        for g, v in b["groups"].items():
            print(f"   {g:<48} {v['requests']:>6} requests  {v['inflicted_ms']:>8.2f} ms of mean TPOT")
    if a.json is not None:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
