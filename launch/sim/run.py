"""``python -m launch simulate``: replay a trace through a simulated cluster, once per routing policy.

Each policy gets a fresh cluster of ``--instances`` emulated engines (the engine core of ``launch
cluster``, on a virtual clock) behind a simulated router that uses the real index and policy code, with
KV events and load reports reaching it ``--event-delay`` seconds late (see ``docs/simulator.md``).
Requests arrive at trace time / ``--rate-scale``; the run lasts until every request sent in the first
``--duration`` seconds has finished. Prints one table per policy; ``--summary-json`` writes
``{"runs": {POLICY: summary}, "config": {...}}`` where a summary is :func:`launch.summary.summarize`'s
plus ``max_batch_size``, ``mean_batch_size`` (running requests, mean over steps), ``sim_wall_s`` and a
few counters; ``--plot DIR`` writes ``ttft_cdf.png`` and ``tpot_cdf.png`` with one curve per policy.
Deterministic: the same inputs and ``--seed`` give the same results.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.engine.profiles import DEFAULT_PROFILE, PROFILES
from launch.plots import cdf_title, plot_cdf
from launch.sim.cluster import SimConfig, SimResult, simulate
from launch.sim.ingest import INGEST_OVERHEAD_S, INGEST_PER_TOKEN_S
from launch.sim.prompts import PromptFactory
from launch.summary import format_summary, summarize
from launch.trace import DEFAULT_TRACE, DEFAULT_VOCAB_SIZE, TraceError, TraceRequest, load_trace, window
from router.model.policies import (
    POLICIES,
    Policy,
    add_param_arguments,
    make_policy,
    params_for,
    params_from_namespace,
)

__all__ = [
    "add_arguments",
    "config_from_args",
    "config_json",
    "result_summary",
    "run_policies",
    "run_simulate",
    "seeded_policy",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``simulate`` subcommand's flags."""
    d = SimConfig()
    a = p.add_argument
    a(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="Mooncake .jsonl or Azure .csv trace (default: the Mooncake trace shipped in launch/traces)",
    )
    a("--instances", type=int, default=d.instances, help="engine instances (default %(default)s)")
    a(
        "--profile",
        default=d.profile,
        choices=sorted(PROFILES),
        help=f"GPU + model (default {DEFAULT_PROFILE})",
    )
    a(
        "--policies",
        default="lmetric",
        help=f"comma-separated routing policies, one run each ({', '.join(sorted(POLICIES))}; default %(default)s)",
    )
    a(
        "--rate-scale",
        type=float,
        default=1.0,
        help="2 replays at twice the trace's rate (default %(default)s)",
    )
    a("--duration", type=float, default=None, help="replay only requests sent in the first S seconds")
    a(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the engines' load-report phases (default %(default)s)",
    )
    a(
        "--page-size",
        type=int,
        default=d.page_size,
        help="KV page = index block size in tokens (default %(default)s)",
    )
    a(
        "--max-running-requests",
        type=int,
        default=d.max_running_requests,
        help="per-engine cap (default %(default)s)",
    )
    a(
        "--max-total-tokens",
        type=int,
        default=None,
        help="KV capacity per engine in tokens (default: profile's)",
    )
    a(
        "--chunked-prefill-size",
        type=int,
        default=d.chunked_prefill_size,
        help="prefill tokens per step; <= 0 off (default %(default)s)",
    )
    a("--enable-mixed-chunk", action="store_true", help="decode requests ride along in prefill steps")
    a(
        "--event-delay",
        type=float,
        default=d.event_delay,
        help="seconds from an engine's KV event / load report to the router (default %(default)s)",
    )
    a(
        "--load-period",
        type=float,
        default=d.load_period,
        help="seconds between an engine's load reports (default %(default)s)",
    )
    add_ingest_arguments(p)
    a(
        "--routers",
        type=int,
        default=d.routers,
        help="active routers, each following every engine and the others' decisions; requests go to them "
        "round robin in send order (default %(default)s)",
    )
    a(
        "--router-delay",
        type=float,
        default=d.router_delay,
        help="seconds from one router's decision (or a request's end) to the other routers applying it "
        "(with --routers > 1; default %(default)s)",
    )
    a(
        "--decision-slot",
        type=float,
        default=d.decision_slot,
        help="with --routers > 1: the routers take turns to decide, each in the first half of its own slot "
        "of this many seconds (python -m router --decision-slot; 0 = off, default %(default)s)",
    )
    add_param_arguments(p)  # --POLICY-PARAM, from every policy's PARAMS (--linear-a, --linear-b, ...)
    a("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="token ids in [0, V) (default %(default)s)")
    a("--summary-json", type=Path, default=None, help="write every policy's summary as JSON here")
    a("--plot", type=Path, default=None, metavar="DIR", help="write TTFT and TPOT CDF plots (PNG) here")
    a("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(a: argparse.Namespace) -> SimConfig:
    """The :class:`SimConfig` of parsed flags. Raises ``ValueError`` with a message for a bad value."""
    if a.instances < 1:
        raise ValueError("--instances must be at least 1")
    if a.page_size <= 0 or a.max_running_requests <= 0:
        raise ValueError("--page-size and --max-running-requests must be positive")
    if a.max_total_tokens is not None and a.max_total_tokens <= 0:
        raise ValueError("--max-total-tokens must be positive")
    if a.event_delay < 0 or a.load_period <= 0:
        raise ValueError("--event-delay must be >= 0 and --load-period > 0")
    check_ingest_arguments(a)
    if a.routers < 1 or a.router_delay < 0:
        raise ValueError("--routers must be at least 1 and --router-delay >= 0")
    if a.decision_slot < 0 or (a.decision_slot > 0 and a.routers == 1):
        raise ValueError("--decision-slot must be >= 0, and needs --routers > 1")
    if a.rate_scale <= 0:
        raise ValueError("--rate-scale must be positive")
    return SimConfig(
        policy_params=params_from_namespace(a),
        instances=a.instances,
        profile=a.profile,
        page_size=a.page_size,
        max_running_requests=a.max_running_requests,
        max_total_tokens=a.max_total_tokens,
        chunked_prefill_size=a.chunked_prefill_size,
        enable_mixed_chunk=a.enable_mixed_chunk,
        event_delay=a.event_delay,
        load_period=a.load_period,
        ingest_overhead=a.ingest_overhead,
        ingest_per_token=a.ingest_per_token,
        vocab_size=a.vocab_size,
        seed=a.seed,
        routers=a.routers,
        router_delay=a.router_delay,
        decision_slot=a.decision_slot,
    )


def policy_names(spec: str) -> list[str]:
    """Split ``--policies``. Raises ``ValueError`` for an empty list or an unknown name."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("--policies is empty")
    for n in names:
        if n not in POLICIES:
            raise ValueError(f"unknown policy {n!r}; known: {', '.join(sorted(POLICIES))}")
    return names


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    """``--ingest-overhead`` and ``--ingest-per-token`` (see :data:`launch.sim.ingest.INGEST_OVERHEAD_S`)."""
    p.add_argument(
        "--ingest-overhead",
        type=float,
        default=INGEST_OVERHEAD_S,
        help="router ingest work per request in seconds, plus --ingest-per-token per prompt token, shared"
        " by the requests in flight; measured on this project's router. Both 0: every request is routed"
        " at its trace time (default %(default)s)",
    )
    p.add_argument(
        "--ingest-per-token",
        type=float,
        default=INGEST_PER_TOKEN_S,
        help="router ingest work per prompt token in seconds (default %(default)s)",
    )


def check_ingest_arguments(a: argparse.Namespace) -> None:
    """Raises ValueError if an ingest flag is negative."""
    if a.ingest_overhead < 0 or a.ingest_per_token < 0:
        raise ValueError("--ingest-overhead and --ingest-per-token must be >= 0")


def seeded_policy(name: str, cfg: SimConfig) -> Policy:
    """``make_policy`` of ``name`` with ``cfg``'s seed (randomised policies draw from it) and its
    ``policy_params``."""
    return make_policy(name, cfg.seed, params_for(cfg.policy_params, name))


def config_json(cfg: SimConfig) -> dict[str, Any]:
    """``cfg``'s fields for a summary's ``config``; ``policy_params`` only when some are given and
    ``routers`` / ``router_delay`` only with more than one router (so the files written before they
    existed compare equal)."""
    conf = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    if cfg.routers == 1:
        del conf["routers"], conf["router_delay"], conf["decision_slot"]
    if not cfg.policy_params:
        del conf["policy_params"]
    else:
        conf["policy_params"] = [list(t) for t in cfg.policy_params]
    return conf


def result_summary(res: SimResult) -> dict[str, Any]:
    """:func:`summarize` of ``res.records`` plus the simulator's batch statistics and counters."""
    s = summarize(res.records)
    s.update(
        max_batch_size=res.max_batch_size,
        mean_batch_size=res.mean_batch_size,
        mean_batch_size_time_weighted=res.mean_batch_size_time_weighted,
        sim_wall_s=res.sim_wall_s,
        steps=res.steps,
        virtual_s=res.virtual_s,
        retractions=res.retractions,
        failure_cases=res.failure_cases,
        decisions=res.decisions,
    )
    if res.peer_decisions:  # several active routers only (summaries of one router stay as they were)
        s["peer_decisions"] = res.peer_decisions
        s["peer_races"] = res.peer_races
    return s


def format_result(s: dict[str, Any], title: str) -> str:
    """:func:`format_summary` plus the batch-size line of a :func:`result_summary`."""
    return (
        format_summary(s, title)
        + f"\nbatch size (running requests): max {s['max_batch_size']}  mean {s['mean_batch_size']:.2f} per"
        f" step  {s['mean_batch_size_time_weighted']:.2f} time-weighted over busy time"
        + f"\nsteps {s['steps']}  virtual {s['virtual_s']:.0f} s  simulated in {s['sim_wall_s']:.1f} s"
        + (f"  retractions {s['retractions']}" if s["retractions"] else "")
        + (f"\npolicy failure cases: {s['failure_cases']}" if s["failure_cases"] else "")
        + (
            f"\npeer decisions applied: {s['peer_decisions']}; decisions racing an unseen peer decision"
            f" for the same instance: {s['peer_races']}"
            if s.get("peer_decisions")
            else ""
        )
    )


def run_policies(
    plan: Sequence[tuple[float, TraceRequest]],
    policies: Sequence[str],
    cfg: SimConfig,
    progress: bool,
) -> dict[str, SimResult]:
    """One simulation per policy over the same ``plan``; results by policy name."""
    prompts = PromptFactory(cfg.page_size, cfg.vocab_size)  # shared: memoised blocks and hashes
    out: dict[str, SimResult] = {}
    for name in policies:
        policy = seeded_policy(name, cfg)
        out[name] = simulate(plan, policy, cfg, prompts=prompts, progress=progress, desc=name)
    return out


def plot_cdfs(summaries: dict[str, SimResult], out_dir: Path, title: str) -> list[Path]:
    """Write ``ttft_cdf.png`` and ``tpot_cdf.png`` (one curve per policy, log x) into ``out_dir``; their paths."""
    return [
        plot_cdf(
            {
                name: [v for r in res.records if r.status == "ok" and (v := getattr(r, metric)) is not None]
                for name, res in summaries.items()
            },
            label,
            cdf_title(metric, title),
            out_dir / f"{metric}_cdf.png",
        )
        for metric, label in (("ttft", "TTFT (s)"), ("tpot", "TPOT (s)"))
    ]


def run_simulate(args: argparse.Namespace) -> int:
    """Entry point of ``launch simulate``; returns the exit code (2 on bad input)."""
    try:
        cfg = config_from_args(args)
        names = policy_names(args.policies)
        plan = window(load_trace(args.trace), args.rate_scale, args.duration)
    except (ValueError, TraceError) as exc:
        print(f"launch simulate: error: {exc}", file=sys.stderr)
        return 2
    title = f"{args.trace.name}, {cfg.instances} x {cfg.profile}, rate scale {args.rate_scale}" + (
        f", first {args.duration:g} s" if args.duration is not None else ""
    )
    if cfg.routers > 1:
        title += f", {cfg.routers} active routers ({1e3 * cfg.router_delay:g} ms apart)"
        if cfg.decision_slot > 0:
            title += f" in {1e3 * cfg.decision_slot:g} ms decision slots"
    try:
        results = run_policies(plan, names, cfg, progress=not args.no_progress)
    except TraceError as exc:
        print(f"launch simulate: error: {exc}", file=sys.stderr)
        return 2
    runs = {name: result_summary(res) for name, res in results.items()}
    for name, s in runs.items():
        print(format_result(s, f"== {name}: {title}"))
        print()
    if args.summary_json:
        conf = config_json(cfg)
        conf.update(trace=str(args.trace), rate_scale=args.rate_scale, duration=args.duration)
        args.summary_json.write_text(json.dumps({"runs": runs, "config": conf}, indent=2) + "\n")
    if args.plot:
        for path in plot_cdfs(results, args.plot, title):
            print(f"wrote {path}")
    return 0
