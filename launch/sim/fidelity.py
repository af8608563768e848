"""``python -m launch fidelity``: the simulator against a live emulated cluster, on the same trace window.

Per load level (``--rate-scales``): start ``launch cluster`` as a subprocess (``--port 0``, a temporary
``--cluster-file``, emulated engines at time scale 1, the chosen ``--policy``), wait until its router is
up, run ``launch replay`` against it for the first ``--duration`` seconds of the trace, stop the cluster,
then run the simulator on the same window with the same cluster settings, and print both summaries side by
side with the simulator's relative difference, ``(sim - live) / live``, per metric (mean TTFT and mean TPOT
first). Takes about ``duration + drain + start-up`` seconds per level; not part of the test suite.

The live side runs every engine, agent, the router and the client on this machine's CPUs: when they are
saturated the live engines fall behind their modelled step times, which shows up here as a difference
that is the live run's, not the model's (see ``docs/simulator.md``). Before stopping each cluster the
command scrapes its engines' pacing metrics (``emulated_engine:step_lateness_seconds``, ``...:pace_resync_
seconds``) and prints how late the live engines delivered their steps.

Means of TPOT over a 120 s window are dominated by a few requests whose decode waited behind other requests'
long prefills, and which requests collide changes with small timing differences: one run is one sample.
So the simulator runs ``--sim-seeds`` times (seeds 0..K-1: load-report phases and random tie-breaks) and
the live side ``--live-runs`` times; the table compares the means over runs and shows each side's range.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.engine.profiles import DEFAULT_PROFILE, PROFILES
from launch.sim.cluster import SimConfig, simulate
from launch.sim.fidelity_table import agreement, format_agreement, side_by_side
from launch.sim.ingest import ingest_times
from launch.sim.live_run import run_live
from launch.sim.run import add_ingest_arguments, check_ingest_arguments, result_summary, seeded_policy
from launch.trace import DEFAULT_TRACE, TraceError, TraceRequest, load_trace, window

__all__ = ["add_arguments", "run_fidelity"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fidelity`` subcommand's flags."""
    a = p.add_argument
    a(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="Mooncake .jsonl or Azure .csv trace (default: the Mooncake trace shipped in launch/traces)",
    )
    a(
        "--duration",
        type=float,
        default=120.0,
        help="seconds of (scaled) trace per level (default %(default)s)",
    )
    a("--rate-scales", default="0.5,1.0", help="comma-separated load levels (default %(default)s)")
    a("--instances", type=int, default=4, help="engine instances (default %(default)s)")
    a("--policy", default="lmetric", help="routing policy of both sides (default %(default)s)")
    a(
        "--profile",
        default=DEFAULT_PROFILE,
        choices=sorted(PROFILES),
        help="GPU + model (default %(default)s)",
    )
    a("--page-size", type=int, default=16, help="KV page size in tokens (default %(default)s)")
    a("--max-running-requests", type=int, default=128, help="per-engine cap (default %(default)s)")
    a("--max-total-tokens", type=int, default=None, help="KV capacity per engine (default: profile's)")
    a("--event-delay", type=float, default=0.005, help="simulated event delay, s (default %(default)s)")
    add_ingest_arguments(p)
    a("--ready-timeout", type=float, default=120.0, help="seconds for the cluster to come up")
    a(
        "--sim-seeds",
        type=int,
        default=8,
        help="simulator runs per level, seeds 0..K-1; the table shows their mean (default %(default)s)",
    )
    a(
        "--live-runs",
        type=int,
        default=None,
        help="new live runs per level (about 2.5 min each at the defaults); the table shows their mean"
        " (default: 1, or 0 with --reuse-live)",
    )
    a(
        "--reuse-live",
        type=Path,
        action="append",
        default=[],
        metavar="JSON",
        help="also compare against the live runs stored in this earlier --summary-json (same trace,"
        " duration, instances, profile and policy; repeatable): re-simulate without re-running them",
    )
    a(
        "--tolerance",
        type=float,
        default=0.15,
        help="relative difference of mean TTFT and mean TPOT reported as agreement (default %(default)s)",
    )
    a("--summary-json", type=Path, default=None, help="write every run's summary per level as JSON here")


def ingest_check(
    live: Sequence[dict[str, Any]], prompt_tokens: dict[int, int], overhead: float, per_token: float
) -> dict[str, float] | None:
    """The live runs' send-to-route delays against what the simulator's ingest model
    (:func:`launch.sim.ingest.ingest_times`) predicts for the same sends.

    ``prompt_tokens``: trace index -> prompt length. Returns ``{"requests", "observed_mean_s",
    "observed_p90_s", "observed_max_s", "predicted_mean_s", "predicted_p90_s", "predicted_max_s"}``, or
    None when no request was both sent and seen routed.
    """
    obs: list[float] = []
    pred: list[float] = []
    for run in live:
        rows = [r for r in (run.get("observed") or {}).get("requests", []) if r[0] in prompt_tokens]
        sends = [r[1] for r in rows]
        routed = ingest_times(sends, [prompt_tokens[r[0]] for r in rows], overhead, per_token)
        for (_, sent, seen), model in zip(rows, routed, strict=True):
            if seen is not None:
                obs.append(seen - sent)
                pred.append(model - sent)
    if not obs:
        return None
    o, m = np.asarray(obs), np.asarray(pred)
    return {
        "requests": float(len(o)),
        "observed_mean_s": float(o.mean()),
        "observed_p90_s": float(np.percentile(o, 90)),
        "observed_max_s": float(o.max()),
        "predicted_mean_s": float(m.mean()),
        "predicted_p90_s": float(np.percentile(m, 90)),
        "predicted_max_s": float(m.max()),
    }


def _sim_config(args: argparse.Namespace, seed: int) -> SimConfig:
    return SimConfig(
        instances=args.instances,
        profile=args.profile,
        page_size=args.page_size,
        max_running_requests=args.max_running_requests,
        max_total_tokens=args.max_total_tokens,
        event_delay=args.event_delay,
        ingest_overhead=args.ingest_overhead,
        ingest_per_token=args.ingest_per_token,
        seed=seed,
    )


Plan = Sequence[tuple[float, TraceRequest]]
"""One level's window of the trace: ``(send offset in seconds, request)``, as :func:`window` gives."""


def run_sim(args: argparse.Namespace, plan: Plan, seed: int = 0) -> dict[str, Any]:
    """The simulator on ``plan`` with ``args``' settings and ``seed``, requests sent at their trace times
    (as ``launch simulate`` runs them); :func:`result_summary` of the run."""
    cfg = _sim_config(args, seed)
    return result_summary(simulate(plan, seeded_policy(args.policy, cfg), cfg))


def run_sim_observed(
    args: argparse.Namespace, plan: Plan, observed: dict[str, Any], seed: int = 0
) -> dict[str, Any] | None:
    """The simulator on the requests of ``plan`` a live run sent, each routed when the live router routed
    it (``simulate(..., routed_at=...)``).

    Within a burst of equal trace timestamps the live order is set by how long each request took to send
    and parse (long prompts arrive last), and that order decides which requests share an instance; this
    run takes the order and the times from the live run, so what is left to differ is the model. Each
    request's TTFT and E2E also get its live send-to-route delay, so they span the same interval as the
    client's. A request the decisions missed arrives at its send time plus the median delay. None when
    ``observed`` is empty.
    """
    rows = observed.get("requests") or []
    by_index = {r.index: r for _, r in plan}
    delays = [rt - st for _, st, rt in rows if rt is not None]
    if not rows or not delays:
        return None
    median = float(np.median(delays))
    sent = [(st, by_index[i]) for i, st, _ in rows if i in by_index]
    routes = [st + median if rt is None else rt for i, st, rt in rows if i in by_index]
    cfg = _sim_config(args, seed)
    res = simulate(sent, seeded_policy(args.policy, cfg), cfg, routed_at=routes)
    return result_summary(res)


def load_live_runs(paths: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """The live runs stored in earlier ``--summary-json`` files, per load level (``"0.5"``, ``"1"``).

    Raises:
        ValueError: a file cannot be read or is not a fidelity summary.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        try:
            report = json.loads(path.read_text())
            for level, entry in report.items():
                runs = entry["live"]
                if not isinstance(runs, list) or not all(isinstance(r, dict) and "ttft" in r for r in runs):
                    raise TypeError("live is not a list of replay summaries")
                out.setdefault(level, []).extend(runs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a launch fidelity summary ({exc})") from exc
    return out


def run_fidelity(args: argparse.Namespace) -> int:
    """Entry point of ``launch fidelity``; returns the exit code (1 if a live run failed, 2 bad flags)."""
    try:
        scales = [float(x) for x in args.rate_scales.split(",") if x.strip()]
        if not scales or min(scales) <= 0:
            raise ValueError("--rate-scales needs positive numbers")
        if args.live_runs is None:
            args.live_runs = 0 if args.reuse_live else 1
        if args.sim_seeds < 1 or args.live_runs < 0 or (args.live_runs == 0 and not args.reuse_live):
            raise ValueError("--sim-seeds needs at least 1, and --live-runs at least 1 without --reuse-live")
        reused = load_live_runs(args.reuse_live)
        check_ingest_arguments(args)
        trace = load_trace(args.trace)
    except (ValueError, TraceError) as exc:
        print(f"launch fidelity: error: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {}
    code = 0
    for x in scales:
        title = (
            f"== rate scale {x:g}: first {args.duration:g} s of {args.trace.name}, {args.instances} x "
            f"{args.profile}, policy {args.policy}"
        )
        live: list[dict[str, Any]] = list(reused.get(f"{x:g}", []))
        if reused:
            print(f"{title}: {len(live)} stored live run(s)", file=sys.stderr, flush=True)
        for k in range(args.live_runs):
            print(f"{title}: live run {k + 1}/{args.live_runs} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="fidelity-") as d:
                try:
                    live.append(run_live(args, x, Path(d)))
                except RuntimeError as exc:
                    print(f"launch fidelity: live run failed: {exc}", file=sys.stderr)
                    logs = Path(d) / "cluster.out"
                    if logs.is_file():
                        sys.stderr.write(logs.read_text()[-3000:])
                    code = 1
        if not live:
            continue
        print(
            f"{title}: simulating {args.sim_seeds} seed(s) per arrival mode ...", file=sys.stderr, flush=True
        )
        seeds = range(args.sim_seeds)
        plan = window(trace, x, args.duration)
        sim_trace = [run_sim(args, plan, seed) for seed in seeds]
        sim_obs = [
            s
            for run in live
            for seed in seeds
            if (s := run_sim_observed(args, plan, run.get("observed") or {}, seed)) is not None
        ]
        sims: list[tuple[str, list[dict[str, Any]]]] = [(_TRACE, sim_trace)]
        if sim_obs:
            sims.append((_OBSERVED, sim_obs))
        print(side_by_side(live, sims, title), flush=True)
        lengths = {r.index: r.input_length for _, r in plan}
        ing = ingest_check(live, lengths, args.ingest_overhead, args.ingest_per_token)
        if ing is not None:
            print(
                f"send-to-route delay over {ing['requests']:.0f} live requests: mean"
                f" {1000 * ing['observed_mean_s']:.1f} ms, p90 {1000 * ing['observed_p90_s']:.1f} ms, max"
                f" {1000 * ing['observed_max_s']:.0f} ms; the ingest model ({1000 * args.ingest_overhead:g} ms +"
                f" {1e6 * args.ingest_per_token:g} us/token, processor-shared) predicts"
                f" {1000 * ing['predicted_mean_s']:.1f}, {1000 * ing['predicted_p90_s']:.1f},"
                f" {1000 * ing['predicted_max_s']:.0f} ms",
                flush=True,
            )
        agree = {label: agreement(live, runs) for label, runs in sims}
        for label, a in agree.items():
            print(f"{label}: " + format_agreement(a, args.tolerance), flush=True)
        print(flush=True)
        report[f"{x:g}"] = {
            "live": live,
            "sim": sim_trace,
            "sim_live_arrivals": sim_obs,
            "agreement": agree,
            "ingest": ing,
        }
    if args.summary_json:
        args.summary_json.write_text(json.dumps(report, indent=2) + "\n")
    return code


_TRACE = "sim trace-arr"
_OBSERVED = "sim live-arr"
