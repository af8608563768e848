"""``python -m launch compare``: LMetric against every published baseline in the simulator, at three loads.

For one trace and one cluster (``--instances`` x ``--profile``), on the requests the trace sends in its
first ``--window`` seconds (trace time; arrivals divided by the rate scale):

1. the **floor**: ``vllm_v1``'s mean TTFT at rate scale 0.05 (near idle);
2. the **load levels**, each a rate scale found by bisection on ``vllm_v1``'s mean TTFT: light = floor +
   0.5 s, medium = floor + 2 s, saturated = 10 x floor (``--rate-scale LEVEL=X`` skips the search);
3. at each level, one run per policy (``--policies``, default every published one plus
   ``lmetric_plain``, the ablation without mitigations) and, with ``--linear-sweep``, ``linear`` with
   ``a = 1`` over ``b`` in 0, 1, 10, ..., 1e5;
4. a table per level: TTFT and TPOT (mean, p99), hit ratio, LMetric's change against each policy in
   percent, the wall time of each run; the sweep's best point and LMetric's distance from it.

Runs are cached (``--cache-dir``; a spec already run is read back), and simulated ``--jobs`` at a time in
worker processes. ``--json`` writes every number, ``--markdown`` the tables, ``--plot DIR`` TTFT and
TPOT CDFs per level. Deterministic: the same flags give the same tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from agents.engine.profiles import PROFILES
from launch.plots import cdf_title, plot_cdf
from launch.sim.batch import Batch, Bisection, RunResult, RunSpec, bisect_rate, round_scale
from launch.sim.cluster import SimConfig
from launch.sim.run import add_ingest_arguments, check_ingest_arguments, config_json
from launch.trace import DEFAULT_TRACE, TraceError
from router.model.policies import POLICIES, PUBLISHED, add_param_arguments, params_from_namespace

__all__ = ["add_arguments", "run_compare"]

FLOOR_RATE: Final = 0.05
LEVELS: Final[dict[str, Callable[[float], float]]] = {
    "light": lambda floor: floor + 0.5,
    "medium": lambda floor: floor + 2.0,
    "saturated": lambda floor: 10.0 * floor,
}
LINEAR_GRID: Final = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
REFERENCE: Final = "vllm_v1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``compare`` subcommand's flags."""
    a = p.add_argument
    a(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="Mooncake .jsonl or Azure .csv trace (default: the Mooncake trace shipped in launch/traces)",
    )
    a(
        "--profile",
        default="h20-qwen2.5-7b",
        choices=sorted(PROFILES),
        help="GPU + model (default %(default)s)",
    )
    a("--instances", type=int, default=16, help="engine instances (default %(default)s)")
    a(
        "--window",
        type=float,
        default=1200.0,
        help="trace seconds replayed, from its start (default %(default)s)",
    )
    a("--levels", default="light,medium,saturated", help="load levels (default %(default)s)")
    a(
        "--rate-scale",
        action="append",
        default=[],
        metavar="LEVEL=X",
        help="use rate scale X for LEVEL instead of bisecting (repeatable)",
    )
    a("--policies", default=",".join((*PUBLISHED, "lmetric_plain")), help="policies (default: %(default)s)")
    a(
        "--linear-sweep",
        action="store_true",
        help="also run linear (a=1) over b in " + ", ".join(f"{b:g}" for b in LINEAR_GRID),
    )
    a("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs, %(default)s)")
    a("--cache-dir", type=Path, default=Path(".cache/compare"), help="run cache (default %(default)s)")
    a("--no-cache", action="store_true", help="neither read nor write the run cache")
    a("--seed", type=int, default=0, help="simulator and random policies' seed (default %(default)s)")
    a("--enable-mixed-chunk", action="store_true", help="engines batch decodes into prefill steps")
    add_ingest_arguments(p)
    add_param_arguments(p)  # --POLICY-PARAM, from every policy's PARAMS (the sweep sets linear's own)
    a("--json", type=Path, default=None, help="write every number here")
    a("--markdown", type=Path, default=None, help="write the tables (Markdown) here")
    a("--plot", type=Path, default=None, metavar="DIR", help="write TTFT/TPOT CDF plots (PNG) here")


def _pct(x: float, base: float) -> float:
    """Relative change of ``x`` against ``base`` in percent (negative: ``x`` is lower)."""
    return 100.0 * (x - base) / base if base else math.nan


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _row(label: str, r: RunResult, lm: RunResult | None) -> dict[str, Any]:
    s = r.summary
    out = {
        "policy": label,
        "ttft_mean": s["ttft"]["mean"],
        "ttft_p99": s["ttft"]["p99"],
        "tpot_mean": s["tpot"]["mean"],
        "tpot_p99": s["tpot"]["p99"],
        "e2e_mean": s["e2e"]["mean"],
        "hit_ratio": s["hit_ratio"],
        "failed": s["failed"],
        "failure_cases": s.get("failure_cases", {}),
        "wall_s": r.wall_s,
        "cached": r.cached,
    }
    if lm is not None:
        out["lmetric_ttft_change_pct"] = _pct(lm.summary["ttft"]["mean"], s["ttft"]["mean"])
        out["lmetric_tpot_change_pct"] = _pct(lm.summary["tpot"]["mean"], s["tpot"]["mean"])
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of :func:`_row` dicts."""
    head = (
        "| policy | TTFT mean (s) | TTFT p99 (s) | TPOT mean (ms) | TPOT p99 (ms) | hit ratio "
        "| LMetric TTFT vs it | LMetric TPOT vs it | sim wall (s) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tm, tp = r["tpot_mean"], r["tpot_p99"]
        lt, lp = r.get("lmetric_ttft_change_pct"), r.get("lmetric_tpot_change_pct")
        lines.append(
            f"| {r['policy']} | {_f(r['ttft_mean'])} | {_f(r['ttft_p99'])} | {_f(tm and 1e3 * tm, 1)} "
            f"| {_f(tp and 1e3 * tp, 1)} | {100 * r['hit_ratio']:.1f} % "
            f"| {'' if lt is None or r['policy'] == 'lmetric' else f'{lt:+.1f} %'} "
            f"| {'' if lp is None or r['policy'] == 'lmetric' else f'{lp:+.1f} %'} "
            f"| {r['wall_s']:.1f}{'*' if r['cached'] else ''} |"
        )
    return "\n".join(lines)


def _parse_fixed(items: Sequence[str], levels: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for it in items:
        name, _, val = it.partition("=")
        if name not in levels or not val:
            raise ValueError(f"--rate-scale wants LEVEL=X with LEVEL in {', '.join(levels)}, got {it!r}")
        out[name] = float(val)
        if out[name] <= 0:
            raise ValueError("--rate-scale must be positive")
    return out


def _plot(results: dict[str, RunResult], path_stem: Path, title: str) -> list[Path]:
    """TTFT and TPOT CDFs (one curve per policy) at ``path_stem``-ttft.png / -tpot.png; their paths."""
    return [
        plot_cdf(
            {name: getattr(res, metric) for name, res in results.items()},
            label,
            cdf_title(metric, title),
            path_stem.with_name(f"{path_stem.name}-{metric}.png"),
            dpi=110,
        )
        for metric, label in (("ttft", "TTFT (s)"), ("tpot", "TPOT (s)"))
    ]


def run_compare(args: argparse.Namespace) -> int:
    """Entry point of ``launch compare``; returns the exit code (2 on bad input)."""
    t_start = time.perf_counter()
    try:
        levels = [x.strip() for x in args.levels.split(",") if x.strip()]
        for lv in levels:
            if lv not in LEVELS:
                raise ValueError(f"unknown level {lv!r}; known: {', '.join(LEVELS)}")
        fixed = _parse_fixed(args.rate_scale, levels)
        policies = [x.strip() for x in args.policies.split(",") if x.strip()]
        for p in policies:
            if p not in POLICIES:
                raise ValueError(f"unknown policy {p!r}; known: {', '.join(sorted(POLICIES))}")
        if "lmetric" not in policies:
            policies.insert(0, "lmetric")
        if args.instances < 1 or args.window <= 0 or args.jobs < 1:
            raise ValueError("--instances, --window and --jobs must be positive")
        if not args.trace.is_file():
            raise ValueError(f"trace file not found: {args.trace}")
        check_ingest_arguments(args)
        policy_params = params_from_namespace(args)
    except ValueError as exc:
        print(f"launch compare: error: {exc}", file=sys.stderr)
        return 2
    cfg = SimConfig(
        policy_params=policy_params,
        instances=args.instances,
        profile=args.profile,
        seed=args.seed,
        enable_mixed_chunk=args.enable_mixed_chunk,
        ingest_overhead=args.ingest_overhead,
        ingest_per_token=args.ingest_per_token,
    )
    title = f"{args.trace.name}, first {args.window:g} s, {cfg.instances} x {cfg.profile}" + (
        ", mixed chunk" if cfg.enable_mixed_chunk else ""
    )
    print(f"== {title}", flush=True)

    def on_result(spec: RunSpec, r: RunResult) -> None:
        src = "cache" if r.cached else f"{r.wall_s:.1f} s"
        print(
            f"   {spec.label:<22} rate {spec.rate_scale:<7g} mean TTFT {r.mean_ttft:8.3f} s  ({src})",
            file=sys.stderr,
            flush=True,
        )

    report: dict[str, Any] = {
        "trace": str(args.trace),
        "window_s": args.window,
        "config": config_json(cfg),
    }
    md: list[str] = [f"### {title}", ""]
    try:
        with Batch(
            args.trace, args.window, cfg, None if args.no_cache else args.cache_dir, args.jobs, on_result
        ) as b:
            t0 = time.perf_counter()
            if all(lv in fixed for lv in levels):  # nothing to calibrate: no floor run
                floor = math.nan
                print("floor: not measured (every level has a given rate scale)", flush=True)
            else:
                floor = b.run([b.spec(REFERENCE, FLOOR_RATE)])[0].mean_ttft
                print(f"floor: {REFERENCE} mean TTFT at rate scale {FLOOR_RATE} = {floor:.3f} s", flush=True)
            report["floor"] = {"rate_scale": FLOOR_RATE, "mean_ttft": None if math.isnan(floor) else floor}
            scales: dict[str, Bisection | float] = {}
            lo, lo_ttft = FLOOR_RATE, floor
            for lv in levels:
                target = LEVELS[lv](floor)
                if lv in fixed:
                    scales[lv] = round_scale(fixed[lv])
                    print(f"{lv}: rate scale {scales[lv]} (given)", flush=True)
                    continue
                if lo_ttft >= target:  # a target below the last bracket (Azure: saturated < medium)
                    below = [(s.rate_scale, s.mean_ttft) for s in scales.values()
                             if isinstance(s, Bisection) and s.mean_ttft < target]  # fmt: skip
                    lo, lo_ttft = max(below, default=(FLOOR_RATE, floor))
                bis = bisect_rate(b, REFERENCE, target, lo)
                scales[lv] = bis
                if bis.mean_ttft < target:
                    lo, lo_ttft = bis.rate_scale, bis.mean_ttft
                print(
                    f"{lv}: target {target:.3f} s -> rate scale {bis.rate_scale:g} ({REFERENCE} mean TTFT "
                    f"{bis.mean_ttft:.3f} s; probes {', '.join(f'{s:g}:{t:.2f}' for s, t in bis.probes)})",
                    flush=True,
                )
            report["calibration_wall_s"] = time.perf_counter() - t0
            if not math.isnan(floor):
                md.append(f"Floor ({REFERENCE} mean TTFT at rate scale {FLOOR_RATE}): {floor:.3f} s.")
            md.append("")
            report["levels"] = {}
            for lv in levels:
                sc = scales[lv]
                rate = sc.rate_scale if isinstance(sc, Bisection) else sc
                specs = [b.spec(p, rate) for p in policies]
                sweep = (
                    [b.spec("linear", rate, {"a": 1.0, "b": bb}) for bb in LINEAR_GRID]
                    if args.linear_sweep
                    else []
                )
                t1 = time.perf_counter()
                res = b.run(specs + sweep)
                wall = time.perf_counter() - t1
                by_pol = dict(zip(policies, res[: len(specs)], strict=True))
                lm = by_pol["lmetric"]
                rows = [_row(p, r, lm) for p, r in by_pol.items()]
                target = LEVELS[lv](floor)
                got = by_pol[REFERENCE].mean_ttft if REFERENCE in by_pol else math.nan
                lvl: dict[str, Any] = {
                    "rate_scale": rate,
                    "target_mean_ttft": target,
                    "reference_mean_ttft": got,
                    "rows": rows,
                    "wall_s": wall,
                    "bisection": list(sc.probes) if isinstance(sc, Bisection) else None,
                }
                n_cached = sum(1 for r in res if r.cached)
                lvl["simulated"] = len(res) - n_cached
                aim = (
                    "rate scale given"
                    if math.isnan(target)
                    else f"target {REFERENCE} mean TTFT {target:.2f} s"
                )
                head = (
                    f"#### {lv}: rate scale {rate:g} ({aim}, {REFERENCE} got {got:.2f} s); "
                    f"{len(res)} runs ({n_cached} from the cache) in {wall:.0f} s wall"
                )
                print("\n" + head + "\n" + format_table(rows), flush=True)
                md += [head, "", format_table(rows), ""]
                if sweep:
                    pts = [(bb, r) for bb, r in zip(LINEAR_GRID, res[len(specs) :], strict=True)]
                    best_b, best = min(pts, key=lambda p: p[1].mean_ttft)
                    gap = _pct(lm.mean_ttft, best.mean_ttft)
                    lm_tpot = lm.summary["tpot"]["mean"]
                    dominating = [
                        bb
                        for bb, r in pts
                        if r.mean_ttft < lm.mean_ttft and r.summary["tpot"]["mean"] < lm_tpot
                    ]
                    sweep_rows = [
                        {"b": bb, "ttft_mean": r.mean_ttft, "tpot_mean": r.summary["tpot"]["mean"],
                         "ttft_p99": r.summary["ttft"]["p99"], "hit_ratio": r.summary["hit_ratio"]}
                        for bb, r in pts
                    ]  # fmt: skip
                    lvl["linear_sweep"] = {
                        "points": sweep_rows,
                        "best_b": best_b,
                        "lmetric_gap_pct": gap,
                        "dominating_b": dominating,
                    }
                    line = " | ".join(f"b={bb:g}: {r.mean_ttft:.3f}" for bb, r in pts)
                    txt = (
                        f"linear (a=1) mean TTFT: {line}\nbest b = {best_b:g}: mean TTFT {best.mean_ttft:.3f} s, "
                        f"TPOT {1e3 * best.summary['tpot']['mean']:.1f} ms; LMetric {lm.mean_ttft:.3f} s = "
                        f"{gap:+.1f} % from it"
                    )
                    print(txt, flush=True)
                    md += [
                        "| b (a = 1) | " + " | ".join(f"{bb:g}" for bb, _ in pts) + " |",
                        "|---|" + "---:|" * len(pts),
                        "| TTFT mean (s) | " + " | ".join(f"{r.mean_ttft:.3f}" for _, r in pts) + " |",
                        "| TPOT mean (ms) | "
                        + " | ".join(f"{1e3 * r.summary['tpot']['mean']:.1f}" for _, r in pts)
                        + " |",
                        "",
                        f"Best linear point b = {best_b:g} (TTFT {best.mean_ttft:.3f} s, TPOT "
                        f"{1e3 * best.summary['tpot']['mean']:.1f} ms); LMetric {lm.mean_ttft:.3f} s "
                        f"({1e3 * lm_tpot:.1f} ms), {gap:+.1f} % from it. Linear points better than LMetric on "
                        f"both mean TTFT and mean TPOT: {', '.join(f'b={x:g}' for x in dominating) or 'none'}.",
                        "",
                    ]
                if args.plot is not None:
                    mixed = "-mixed" if cfg.enable_mixed_chunk else ""
                    stem = args.plot / f"{args.trace.stem}-{cfg.profile}{mixed}-{lv}"
                    for path in _plot(by_pol, stem, f"{title}, {lv} (rate {rate:g})"):
                        print(f"wrote {path}", flush=True)
                report["levels"][lv] = lvl
    except (TraceError, RuntimeError) as exc:
        print(f"launch compare: error: {exc}", file=sys.stderr)
        return 2
    report["wall_s"] = time.perf_counter() - t_start
    print(f"\ntotal wall {report['wall_s']:.0f} s", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(md) + "\n")
    return 0
