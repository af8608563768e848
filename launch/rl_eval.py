"""``train-rl``'s evaluation and curve plot: the trained router against the published policies on a later
window of the trace (``launch/rl``)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from launch.sim.cluster import SimConfig, simulate
from launch.sim.prompts import PromptFactory
from launch.sim.run import result_summary, seeded_policy
from launch.trace import TraceRequest, window
from router.model.intelligent import N_BUCKETS, IntelligentRouter, LengthPredictor, QNet, output_bucket
from router.model.policies import PUBLISHED

__all__ = ["evaluate", "held_hook", "plot_curve"]

INTELLIGENT = (
    "intelligent_router",
    "intelligent_router_unguided",
    "intelligent_router_oracle",
    "mixing_penalty",
)
"""``_unguided``: the same network with guidance 0 (its Q-values alone); ``_oracle``: the true output
bucket with the paper's predictor accuracy."""


def evaluate(
    evalw: Sequence[TraceRequest], eval_from: float, rates: dict[str, float], policies: Sequence[str],
    net: QNet, guidance: float, predictor: LengthPredictor, cfg: SimConfig, prompts: PromptFactory,
    allow_hold: bool, oracle_accuracy: float, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Per level: every policy of ``policies`` (default order: :data:`INTELLIGENT`, then the published
    ones) on ``evalw`` shifted to start at 0, mean TTFT / TPOT / E2E, p99 E2E and E2E against round
    robin (which always runs)."""
    names = [*(policies or [*INTELLIGENT, *PUBLISHED])]
    if "round_robin" not in names:
        names.append("round_robin")
    ev = [replace(r, arrival=r.arrival - eval_from) for r in evalw]
    levels: dict[str, Any] = {}
    for lv, rate in rates.items():
        rows: dict[str, Any] = {}
        for name in names:
            if name.startswith("intelligent_router"):
                ir = IntelligentRouter(net, predictor)
                ir.guidance = 0.0 if name.endswith("unguided") else guidance
                ir.allow_hold = allow_hold
                hook = _oracle_hook(ir, ev, oracle_accuracy, seed) if name.endswith("oracle") else \
                    held_hook(ir)  # fmt: skip
                res = simulate(window(ev, rate, None), ir, cfg, prompts=prompts, before_route=hook)
            else:
                res = simulate(window(ev, rate, None), seeded_policy(name, cfg), cfg, prompts=prompts)
            sm = result_summary(res)
            rows[name] = {k: sm[k]["mean"] for k in ("ttft", "tpot", "e2e")} | {"p99_e2e": sm["e2e"]["p99"]}
            print(f"{lv} rate {rate:g} {name:<26} TTFT {sm['ttft']['mean']:.3f}  TPOT "
                  f"{1e3 * sm['tpot']['mean']:.1f} ms  E2E {sm['e2e']['mean']:.3f}", flush=True)  # fmt: skip
        rr = rows["round_robin"]["e2e"]
        for r in rows.values():
            r["e2e_vs_round_robin_pct"] = 100 * (r["e2e"] - rr) / rr
        levels[lv] = {"rate_scale": rate, "rows": rows}
    return levels


def held_hook(pol: IntelligentRouter) -> Any:
    def hook(req: TraceRequest, held: int) -> None:
        pol.held = held

    return hook


def _oracle_hook(pol: IntelligentRouter, reqs: Sequence[TraceRequest], accuracy: float, seed: int) -> Any:
    rng = random.Random(seed)
    noisy = {}
    for r in reqs:
        b = output_bucket(r.output_length)
        if rng.random() >= accuracy:
            b = rng.choice([k for k in range(N_BUCKETS) if k != b])
        noisy[r.index] = b

    def hook(req: TraceRequest, held: int) -> None:
        pol.held = held
        pol.next_bucket = noisy[req.index]

    return hook


def plot_curve(curve: Sequence[dict[str, float]], val_base: dict[str, float], path: Path) -> None:
    """Episode mean E2E (each episode its own window), holds per episode, and the validation window's
    mean E2E (greedy) against round robin's and the mixing penalty's there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.5))
    eps = [c["episode"] for c in curve]
    for axis, key, label in (
        (ax[0], "e2e_mean", "episode mean E2E (s)"),
        (ax[1], "holds", "holds per episode"),
    ):
        v = np.array([c[key] for c in curve], dtype=float)
        axis.plot(eps, v, alpha=0.4, label="episode")
        if len(v) >= 10:
            axis.plot(eps[9:], np.convolve(v, np.ones(10) / 10, mode="valid"), label="mean of 10")
        axis.set_xlabel("episode")
        axis.set_ylabel(label)
        axis.legend()
    pts = [(c["episode"], c["val_e2e"]) for c in curve if "val_e2e" in c]
    if pts:
        ax[2].plot(*zip(*pts, strict=True), marker="o", label="intelligent_router (greedy)")
    for name, val in val_base.items():
        ax[2].axhline(val, linestyle="--", color="grey" if name == "round_robin" else "green", label=name)
    ax[2].set_xlabel("episode")
    ax[2].set_ylabel("validation window mean E2E (s)")
    if pts or val_base:
        ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
