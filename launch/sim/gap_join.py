"""Why one policy's mean TTFT trails another's: both runs joined request by request, with the decisions.

``python -m launch.sim.gap_join --profile P --rate-scale X [--policy lmetric] [--against-b 1]
[--json OUT]`` simulates the trace's first ``--window`` seconds once with ``--policy`` and once with
``linear`` (``a = 1``, ``b = --against-b``), recording every decision's views
(:class:`launch.sim.tpot_join.RecordingPolicy`). At each of ``--policy``'s decisions it also asks a fresh
``linear`` object what it would have chosen on the same views (a counterfactual: the runs diverge
after the first disagreement, so the per-request TTFT difference between the runs is the *joint* effect).

It prints: the TTFT of both runs by prompt-length bucket; for the decisions where the two rules part,
what each would have chosen (queued prefill + new tokens, batch, KV use of the instance) and the TTFT the
request got; the distribution of batch sizes, queued prefill and KV use at decision time; and, per
request, the TTFT against the prefill-first estimate ``(queued prefill + new) / prefill rate`` (what the
product's first factor predicts), split by how full the chosen instance's KV pool was.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.engine.profiles import get_profile
from launch.sim.cluster import SimConfig
from launch.sim.run import seeded_policy
from launch.sim.tpot_join import recorded_run
from launch.summary import summarize
from router.model.lmetric import Linear
from router.model.policies import InstanceView, Policy
from router.model.policy_base import new_tokens

__all__ = ["Row", "run_rows"]

DEFAULT_TRACE = Path("launch/traces/mooncake/conversation_trace.jsonl")
PROMPT_BUCKETS = ((0, 4096), (4096, 16384), (16384, 32768), (32768, 65536), (65536, 1 << 30))


@dataclass(frozen=True, slots=True)
class Row:
    """One request under one policy: what the policy saw at the chosen instance and the best others."""

    index: int
    prompt: int
    instance: str
    new: int
    failure_cases: tuple[str, ...]
    q_chosen: int  # queued prefill tokens there
    p_chosen: int  # queued prefill + new tokens there
    p_min: int  # least queued prefill + new over the candidates
    batch_chosen: int
    batch_min: int
    running_chosen: int
    kv_frac_chosen: float  # kv_used / kv_capacity there (0 when unknown)
    alt_instance: str  # what the --against rule would have chosen on the same views
    alt_p: int
    alt_batch: int
    alt_kv_frac: float
    alt_new: int
    ttft: float
    output: int
    cached_admitted: int  # prompt tokens the engine found cached when it admitted the request
    cached_best: int  # the longest cached prefix of the request on any candidate at decision time


def _kv_frac(v: InstanceView) -> float:
    return v.kv_used_tokens / v.kv_capacity_tokens if v.kv_capacity_tokens > 0 else 0.0


def run_rows(
    trace: Path, window_s: float, rate_scale: float, policy: Policy, alt: Policy | None, cfg: SimConfig
) -> tuple[list[Row], dict[str, Any]]:
    """Simulate ``policy`` and return one :class:`Row` per successful request (``alt`` asked on the same
    views at every decision; ``policy`` itself when None) and the run's counters."""
    res, pairs = recorded_run(trace, window_s, rate_scale, policy, cfg)
    rows: list[Row] = []
    for r, (views, prompt, cached, d) in pairs:
        idx = r.index
        a = alt.choose(views, prompt, cached) if alt is not None else d
        if r.status != "ok" or r.ttft is None:
            continue
        named = {v.name: v for v in views}
        pre = {v.name: v.queued_prefill_tokens + new_tokens(prompt, cached.get(v.name, 0)) for v in views}
        ch, al = named[d.instance], named[a.instance]
        rows.append(
            Row(
                index=idx,
                prompt=prompt,
                instance=d.instance,
                new=d.new_tokens,
                failure_cases=d.failure_cases,
                q_chosen=ch.queued_prefill_tokens,
                p_chosen=pre[d.instance],
                p_min=min(pre.values()),
                batch_chosen=ch.batch_size,
                batch_min=min(v.batch_size for v in views),
                running_chosen=ch.running,
                kv_frac_chosen=_kv_frac(ch),
                alt_instance=a.instance,
                alt_p=pre[a.instance],
                alt_batch=al.batch_size,
                alt_kv_frac=_kv_frac(al),
                alt_new=a.new_tokens,
                ttft=r.ttft,
                output=r.output_tokens,
                cached_admitted=r.cached_tokens,
                cached_best=max([min(cached.get(v.name, 0), prompt) for v in views]),
            )
        )
    summ = summarize(res.records)
    counters = {
        "ttft_mean_s": float(np.mean([x.ttft for x in rows])),
        "tpot_mean_ms": 1e3 * summ["tpot"]["mean"],
        "hit_ratio": summ["hit_ratio"],
        "retractions": res.retractions,
        "failure_cases": dict(res.failure_cases),
        "mean_batch_size": res.mean_batch_size,
    }
    return rows, counters


def _pct(a: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> list[float]:
    return [round(float(x), 3) for x in np.percentile(np.asarray(a, dtype=float), qs)] if a else []


def report(
    mine: list[Row], theirs: list[Row], prefill_tok_s: float, names: tuple[str, str]
) -> dict[str, Any]:
    """The breakdown printed by :func:`main` (every number also in the returned dict)."""
    n = len(mine)
    t_other = {r.index: r.ttft for r in theirs}
    out: dict[str, Any] = {"requests": n}
    # 1. TTFT by prompt bucket, same requests in both runs
    buckets = []
    for lo, hi in PROMPT_BUCKETS:
        sel = [r for r in mine if lo <= r.prompt < hi and r.index in t_other]
        if not sel:
            continue
        a = sum(r.ttft for r in sel)
        b = sum(t_other[r.index] for r in sel)
        buckets.append({
            "prompt": f"{lo}-{hi if hi < 1 << 30 else 'inf'}",
            "requests": len(sel),
            f"{names[0]}_ttft_mean_s": round(a / len(sel), 3),
            f"{names[1]}_ttft_mean_s": round(b / len(sel), 3),
            "gap_share_of_mean_s": round((a - b) / n, 3),
        })  # fmt: skip
    out["by_prompt"] = buckets
    # 2. the decisions where the two rules part (counterfactual on the same views)
    parted = [r for r in mine if r.alt_instance != r.instance]
    # equal prefill work and batch: the two objects' tie-break rotations differ, not the rules
    diff = [r for r in parted if (r.p_chosen, r.batch_chosen) != (r.alt_p, r.alt_batch)]
    same = [r for r in mine if r.alt_instance == r.instance]
    out["disagreements"] = {
        "tie_break_only": len(parted) - len(diff),
        "requests": len(diff),
        "ttft_mean_s": round(float(np.mean([r.ttft for r in diff])), 3) if diff else None,
        "ttft_mean_same_s": round(float(np.mean([r.ttft for r in same])), 3) if same else None,
        "ttft_sum_share_of_mean_s": round(sum(r.ttft for r in diff) / n, 3),
        "other_run_ttft_sum_share_of_mean_s": round(sum(t_other.get(r.index, 0.0) for r in diff) / n, 3),
        "p_chosen_mean": round(float(np.mean([r.p_chosen for r in diff])), 1) if diff else None,
        "p_alt_mean": round(float(np.mean([r.alt_p for r in diff])), 1) if diff else None,
        "extra_prefill_tokens_mean": round(float(np.mean([r.p_chosen - r.alt_p for r in diff])), 1)
        if diff
        else None,
        "extra_prefill_s_mean_at_rate": round(float(np.mean([r.p_chosen - r.alt_p for r in diff])) / prefill_tok_s, 3)
        if diff
        else None,
        "batch_chosen_mean": round(float(np.mean([r.batch_chosen for r in diff])), 2) if diff else None,
        "batch_alt_mean": round(float(np.mean([r.alt_batch for r in diff])), 2) if diff else None,
        "chosen_more_prefill": sum(r.p_chosen > r.alt_p for r in diff),
        "chosen_less_prefill": sum(r.p_chosen < r.alt_p for r in diff),
        "chosen_fewer_new_tokens": sum(r.new < r.alt_new for r in diff),
        "chosen_more_new_tokens": sum(r.new > r.alt_new for r in diff),
        "kv_frac_chosen_mean": round(float(np.mean([r.kv_frac_chosen for r in diff])), 3) if diff else None,
        "kv_frac_alt_mean": round(float(np.mean([r.alt_kv_frac for r in diff])), 3) if diff else None,
        "q_chosen_zero": sum(r.q_chosen == 0 for r in diff),
    }  # fmt: skip
    by_new = []
    for lo, hi in PROMPT_BUCKETS:
        sel = [r for r in diff if lo <= r.new < hi]
        if not sel:
            continue
        by_new.append({
            "new_tokens": f"{lo}-{hi if hi < 1 << 30 else 'inf'}",
            "disagree": len(sel),
            "of": sum(lo <= r.new < hi for r in mine),
            "queued_chosen_mean": round(float(np.mean([r.q_chosen for r in sel]))),
            "queued_alt_mean": round(float(np.mean([r.alt_p - r.alt_new for r in sel]))),
            "batch_chosen_mean": round(float(np.mean([r.batch_chosen for r in sel])), 1),
            "batch_alt_mean": round(float(np.mean([r.alt_batch for r in sel])), 1),
            "prefill_ratio_mean": round(float(np.mean([r.p_chosen / max(r.alt_p, 1) for r in sel])), 2),
            "batch_factor_ratio_mean": round(float(np.mean([(r.alt_batch + 1) / (r.batch_chosen + 1) for r in sel])), 2),
            "ttft_mean_s": round(float(np.mean([r.ttft for r in sel])), 2),
            "other_run_ttft_mean_s": round(float(np.mean([t_other[r.index] for r in sel if r.index in t_other])), 2),
        })  # fmt: skip
    out["disagreements_by_new_tokens"] = by_new
    # cache: what was cached at decision (chosen, best anywhere) and at admission, both runs
    hits = {}
    for name, rows in zip(names, (mine, theirs), strict=True):
        tot = sum(r.prompt for r in rows)
        hits[name] = {
            "chosen_at_decision_pct": round(100 * sum(r.prompt - r.new for r in rows) / tot, 2),
            "best_anywhere_at_decision_pct": round(100 * sum(r.cached_best for r in rows) / tot, 2),
            "at_admission_pct": round(100 * sum(r.cached_admitted for r in rows) / tot, 2),
        }
    out["cached_share_of_prompt_tokens"] = hits
    # 3. state at decision time
    out["at_decision"] = {
        "batch_chosen_p50_p90_p99": _pct([r.batch_chosen for r in mine]),
        "queued_prefill_chosen_p50_p90_p99": _pct([r.q_chosen for r in mine]),
        "queued_prefill_chosen_zero_share": round(sum(r.q_chosen == 0 for r in mine) / n, 3),
        "kv_frac_chosen_p50_p90_p99": _pct([r.kv_frac_chosen for r in mine]),
    }
    # 4. TTFT against the prefill-first estimate, by KV use of the chosen instance
    kv_rows = []
    for klo, khi in ((0.0, 0.5), (0.5, 0.8), (0.8, 0.9), (0.9, 2.0)):
        sel = [r for r in mine if klo <= r.kv_frac_chosen < khi]
        if not sel:
            continue
        est = [r.p_chosen / prefill_tok_s for r in sel]
        kv_rows.append({
            "kv_used": f"{klo:.1f}-{min(khi, 1.0):.1f}",
            "requests": len(sel),
            "ttft_mean_s": round(float(np.mean([r.ttft for r in sel])), 3),
            "estimate_mean_s": round(float(np.mean(est)), 3),
            "excess_share_of_mean_s": round(sum(r.ttft - e for r, e in zip(sel, est, strict=True)) / n, 3),
        })  # fmt: skip
    out["ttft_vs_prefill_estimate_by_kv"] = kv_rows
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sim.gap_join", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake .jsonl trace (default: in-repo)"
    )
    p.add_argument(
        "--profile", default="h20-qwen3-30b-a3b", help="engine profile (agents/engine/profiles.py)"
    )
    p.add_argument("--instances", type=int, default=16, help="engine instances (default 16)")
    p.add_argument(
        "--window", type=float, default=1200.0, help="seconds of the trace replayed (default 1200)"
    )
    p.add_argument("--rate-scale", type=float, required=True, help="arrival times divided by this")
    p.add_argument("--policy", default="lmetric", help="the policy whose gap is analysed (default lmetric)")
    p.add_argument("--against-b", type=float, default=1.0, help="linear's b (a = 1) to compare with")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    a = p.parse_args(argv)
    cfg = SimConfig(instances=a.instances, profile=a.profile)
    prof = get_profile(a.profile)
    # the profile's prefill rate on an 8k chunk with nothing cached (tokens per second)
    rate = 8192 / prof.step_time([(8192, 0)])
    mine, c1 = run_rows(
        a.trace, a.window, a.rate_scale, seeded_policy(a.policy, cfg), Linear(1.0, a.against_b), cfg
    )
    theirs, c2 = run_rows(a.trace, a.window, a.rate_scale, Linear(1.0, a.against_b), None, cfg)
    names = (a.policy, f"linear_b{a.against_b:g}")
    rep = {"profile": a.profile, "rate_scale": a.rate_scale, "prefill_tok_s": round(rate, 1),
           "runs": {names[0]: c1, names[1]: c2}, "report": report(mine, theirs, rate, names)}  # fmt: skip
    print(json.dumps(rep, indent=1))
    if a.json is not None:
        a.json.write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
