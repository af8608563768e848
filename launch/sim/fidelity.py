"""``python -m launch fidelity``: the simulator against a live emulated cluster, on the same trace window.

Per load level (``--rate-scales``): start ``launch cluster`` as a subprocess (``--port 0``, a temporary
``--cluster-file``, emulated engines at time scale 1, the chosen ``--policy``), wait until its router is
up, run ``launch replay`` against it for the first ``--duration`` seconds of the trace, stop the cluster,
then run the simulator on the same window with the same cluster settings, and print both summaries side by
side with the simulator's relative difference, ``(sim - live) / live``, per metric (mean TTFT and mean TPOT
first). Takes about ``duration + drain + start-up`` seconds per level; not part of the test suite.

The live side runs every engine, agent, the router and the client on this machine's CPUs: when they are
saturated the live engines fall behind their modelled step times, which shows up here as a difference
that is the live run's, not the model's (see ``docs/simulator.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agents.engine.profiles import DEFAULT_PROFILE, PROFILES
from launch.sim.cluster import SimConfig, simulate
from launch.sim.run import result_summary, seeded_policy
from launch.trace import TraceError, load_trace, window

__all__ = ["add_arguments", "run_fidelity"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fidelity`` subcommand's flags."""
    a = p.add_argument
    a("--trace", required=True, type=Path, help="Mooncake .jsonl or Azure .csv trace")
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
    a("--ready-timeout", type=float, default=120.0, help="seconds for the cluster to come up")
    a("--summary-json", type=Path, default=None, help="write both summaries per level as JSON here")


def _wait_router(proc: subprocess.Popen[bytes], cluster_file: Path, timeout: float) -> str:
    """The router URL once the cluster file names it. Raises RuntimeError if the cluster exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"launch cluster exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(OSError, ValueError):
            url = json.loads(cluster_file.read_text()).get("router")
            if url:
                return str(url)
        time.sleep(0.2)
    raise RuntimeError(f"launch cluster not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the cluster launcher (it stops its children in order), SIGKILL it if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def run_live(args: argparse.Namespace, rate_scale: float, tmp: Path) -> dict[str, Any]:
    """Start a cluster, replay the window against it, stop it; the replay's summary.

    Raises:
        RuntimeError: the cluster did not come up, or the replay wrote no summary.
    """
    cluster_file = tmp / "cluster.json"
    cmd = [
        sys.executable, "-m", "launch", "cluster",
        "--port", "0", "--cluster-file", str(cluster_file), "--log-dir", str(tmp / "logs"),
        "--instances", str(args.instances), "--policy", args.policy, "--profile", args.profile,
        "--page-size", str(args.page_size), "--max-running-requests", str(args.max_running_requests),
        "--time-scale", "1",
        # The standby router and the metrics daemon are not on the measured path; on a 2-core machine
        # their CPU would only add noise to the live side.
        "--no-standby", "--no-metrics",
    ]  # fmt: skip
    if args.max_total_tokens:
        cmd += ["--max-total-tokens", str(args.max_total_tokens)]
    with (tmp / "cluster.out").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        url = _wait_router(proc, cluster_file, args.ready_timeout)
        summary_path = tmp / "live.json"
        replay = [
            sys.executable, "-m", "launch", "replay", "--trace", str(args.trace), "--url", url,
            "--rate-scale", str(rate_scale), "--duration", str(args.duration),
            "--summary-json", str(summary_path), "--no-progress",
        ]  # fmt: skip
        subprocess.run(replay, check=False)
        if not summary_path.is_file():
            raise RuntimeError("launch replay wrote no summary")
        live: dict[str, Any] = json.loads(summary_path.read_text())
        return live
    finally:
        _stop(proc)


def run_sim(args: argparse.Namespace, rate_scale: float) -> dict[str, Any]:
    """The simulator on the same window and settings; :func:`result_summary` of the run."""
    plan = window(load_trace(args.trace), rate_scale, args.duration)
    cfg = SimConfig(
        instances=args.instances,
        profile=args.profile,
        page_size=args.page_size,
        max_running_requests=args.max_running_requests,
        max_total_tokens=args.max_total_tokens,
        event_delay=args.event_delay,
    )
    return result_summary(simulate(plan, seeded_policy(args.policy, cfg.seed), cfg))


def _pct(live: float | None, sim: float | None) -> str:
    if live is None or sim is None or live == 0:
        return "-"
    return f"{100 * (sim - live) / live:+.1f}%"


def side_by_side(live: dict[str, Any], sim: dict[str, Any], title: str) -> str:
    """A table of the two summaries with the simulator's relative difference."""

    def f(v: float | None, scale: float = 1.0) -> str:
        return "-" if v is None else f"{v * scale:.4g}"

    rows: list[tuple[str, float | None, float | None]] = [
        ("TTFT mean (s)", live["ttft"]["mean"], sim["ttft"]["mean"]),
        ("TPOT mean (s)", live["tpot"]["mean"], sim["tpot"]["mean"]),
    ]
    for k in ("ttft", "tpot", "e2e"):
        for q in ("p50", "p90", "p99"):
            rows.append((f"{k.upper()} {q} (s)", live[k][q], sim[k][q]))
    rows.append(("E2E mean (s)", live["e2e"]["mean"], sim["e2e"]["mean"]))
    rows.append(("hit ratio", live["hit_ratio"], sim["hit_ratio"]))
    rows.append(("throughput (req/s)", live["throughput_rps"], sim["throughput_rps"]))
    rows.append(("output tok/s", live["output_tokens_per_s"], sim["output_tokens_per_s"]))
    lines = [
        title,
        f"requests: live {live['requests']} ({live['failed']} failed), sim {sim['requests']} ({sim['failed']} failed)",
        f"{'metric':<20}{'live':>12}{'sim':>12}{'sim vs live':>13}",
    ]
    lines += [f"{name:<20}{f(lv):>12}{f(sv):>12}{_pct(lv, sv):>13}" for name, lv, sv in rows]
    return "\n".join(lines)


def run_fidelity(args: argparse.Namespace) -> int:
    """Entry point of ``launch fidelity``; returns the exit code."""
    try:
        scales = [float(x) for x in args.rate_scales.split(",") if x.strip()]
        if not scales or min(scales) <= 0:
            raise ValueError("--rate-scales needs positive numbers")
        load_trace(args.trace)
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
        print(f"{title}: live run ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="fidelity-") as d:
            try:
                live = run_live(args, x, Path(d))
            except RuntimeError as exc:
                print(f"launch fidelity: live run failed: {exc}", file=sys.stderr)
                logs = Path(d) / "cluster.out"
                if logs.is_file():
                    sys.stderr.write(logs.read_text()[-3000:])
                code = 1
                continue
        print(f"{title}: simulating ...", file=sys.stderr, flush=True)
        sim = run_sim(args, x)
        print(side_by_side(live, sim, title), flush=True)
        print()
        report[f"{x:g}"] = {"live": live, "sim": sim}
    if args.summary_json:
        args.summary_json.write_text(json.dumps(report, indent=2) + "\n")
    return code
