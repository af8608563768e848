"""The live side of ``launch fidelity``: one emulated cluster, one replay, and what was measured on it.

:func:`run_live` starts ``launch cluster`` (``--port 0``, a temporary ``--cluster-file``, emulated
engines at time scale 1, no standby or metrics daemon), subscribes ``launch tail --type decision`` to the
router's decisions, runs ``launch replay --out`` for the window, scrapes the engines' pacing
(``emulated_engine:*``) and the router's input ages (``router_*_age_seconds``), stops the cluster, and
joins each request's send time with its routing time (:func:`observed_arrivals`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvindex.protocol.cluster_file import read_cluster_file

__all__ = [
    "cluster_endpoints",
    "engine_pace",
    "observed_arrivals",
    "run_live",
    "stop_process",
    "stream_age",
    "wait_router",
]


def wait_router(proc: subprocess.Popen[bytes], cluster_file: Path, timeout: float) -> str:
    """The router URL once the cluster file names it. Raises RuntimeError if the cluster exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"launch cluster exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(OSError, ValueError):
            url = read_cluster_file(cluster_file).router
            if url:
                return str(url)
        time.sleep(0.2)
    raise RuntimeError(f"launch cluster not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the cluster launcher (it stops its children in order), SIGKILL it if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _scrape(url: str, timeout: float) -> dict[str, float]:
    """``{sample name or name{le=...}: value}`` of a Prometheus endpoint (labels other than ``le``
    summed); empty if it cannot be read."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            le = sample.labels.get("le")
            key = sample.name if le is None else f"{sample.name}{{le={float(le):g}}}"
            out[key] = out.get(key, 0.0) + sample.value
    return out


def cluster_endpoints(cluster_file: Path, role: str, kind: str = "http") -> list[str]:
    """The ``kind`` endpoints (``"http"``, ``"pub"``, ...) of the processes of ``role`` (``"engine"``,
    ``"agent"``, ``"router-primary"``) in a ``launch cluster`` cluster file, in file order."""
    return read_cluster_file(cluster_file).endpoints(role, kind)


def engine_pace(cluster_file: Path, timeout: float = 5.0) -> dict[str, float]:
    """The live engines' pacing, summed over the engines named in ``cluster_file``.

    Returns ``{"steps", "step_lateness_mean_s", "late_steps_over_10ms", "pace_resync_s"}``: steps run,
    mean seconds a step's outputs came after its modelled end, the fraction of steps more than 10 ms late,
    and modelled seconds given up to overload. Engines that cannot be scraped are left out.
    """
    steps = late_sum = within_10ms = resync = 0.0
    for url in cluster_endpoints(cluster_file, "engine"):
        m = _scrape(url, timeout)
        steps += m.get("emulated_engine:step_lateness_seconds_count", 0.0)
        late_sum += m.get("emulated_engine:step_lateness_seconds_sum", 0.0)
        within_10ms += m.get("emulated_engine:step_lateness_seconds_bucket{le=0.01}", 0.0)
        resync += m.get("emulated_engine:pace_resync_seconds_total", 0.0)
    return {
        "steps": steps,
        "step_lateness_mean_s": late_sum / steps if steps else 0.0,
        "late_steps_over_10ms": (steps - within_10ms) / steps if steps else 0.0,
        "pace_resync_s": resync,
    }


def stream_age(cluster_file: Path, timeout: float = 5.0) -> dict[str, float]:
    """How old the primary router's inputs were when it received them (what ``--event-delay`` models).

    Returns ``{"kv_event_age_mean_s", "kv_event_batches", "load_report_age_mean_s", "load_reports"}``
    (zeros if the router cannot be scraped).
    """
    out = {
        "kv_event_age_mean_s": 0.0,
        "kv_event_batches": 0.0,
        "load_report_age_mean_s": 0.0,
        "load_reports": 0.0,
    }
    for url in cluster_endpoints(cluster_file, "router-primary")[:1]:
        m = _scrape(url, timeout)
        for name, mean_key, n_key in (
            ("router_kv_event_age_seconds", "kv_event_age_mean_s", "kv_event_batches"),
            ("router_load_report_age_seconds", "load_report_age_mean_s", "load_reports"),
        ):
            n = m.get(f"{name}_count", 0.0)
            out[n_key] = n
            out[mean_key] = m.get(f"{name}_sum", 0.0) / n if n else 0.0
    return out


def observed_arrivals(records_file: Path, decisions_file: Path) -> dict[str, Any]:
    """When each replayed request was sent and when the router routed it, from ``launch replay --out``
    records and ``launch tail --type decision --json`` lines (joined on the ``replay-N`` request id).

    Returns ``{"requests": [[trace index, sent_s, routed_s or None], ...]}``, seconds since the first
    send (wall clock; client and router share this machine's clock). A request whose decision was not
    seen (the subscriber joined late, a frame was lost) has ``routed_s`` None. Unparseable lines are
    skipped.
    """
    sent: dict[int, float] = {}
    for line in records_file.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            r = json.loads(line)
            sent[int(r["index"])] = float(r["start_time"])
    routed: dict[int, float] = {}
    for line in decisions_file.read_text().splitlines() if decisions_file.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
            d = json.loads(line)
            rid = str(d.get("request_id") or "")
            if d.get("event") == "RequestRouted" and rid.startswith("replay-"):
                # A retry routes the request again: its first decision is when it arrived.
                routed.setdefault(int(rid.split("-", 1)[1]), float(d["ts"]))
    if not sent:
        return {"requests": []}
    t0 = min(sent.values())
    return {
        "requests": [[i, sent[i] - t0, None if i not in routed else routed[i] - t0] for i in sorted(sent)]
    }


def run_live(args: argparse.Namespace, rate_scale: float, tmp: Path) -> dict[str, Any]:
    """Start a cluster, replay the window against it while recording the router's decisions, read its
    engines' pacing and its router's input ages, stop it.

    Returns the replay's summary with ``engine_pace`` (:func:`engine_pace`), ``stream_age``
    (:func:`stream_age`) and ``observed`` (:func:`observed_arrivals`) added.

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
    tail: subprocess.Popen[bytes] | None = None
    try:
        url = wait_router(proc, cluster_file, args.ready_timeout)
        decisions = tmp / "decisions.jsonl"
        with decisions.open("wb") as dout:
            tail = subprocess.Popen(
                [sys.executable, "-m", "launch", "tail", "--cluster", str(cluster_file), "--type", "decision",
                 "--json"],
                stdout=dout, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        time.sleep(1.5)  # the subscriber connects before the first request (ZeroMQ drops until then)
        summary_path, records = tmp / "live.json", tmp / "records.jsonl"
        replay = [
            sys.executable, "-m", "launch", "replay", "--trace", str(args.trace), "--url", url,
            "--rate-scale", str(rate_scale), "--duration", str(args.duration),
            "--summary-json", str(summary_path), "--out", str(records), "--no-progress",
        ]  # fmt: skip
        subprocess.run(replay, check=False)
        if not summary_path.is_file():
            raise RuntimeError("launch replay wrote no summary")
        live: dict[str, Any] = json.loads(summary_path.read_text())
        live["engine_pace"] = engine_pace(cluster_file)
        live["stream_age"] = stream_age(cluster_file)
        time.sleep(0.5)  # the last RequestFinished frames reach the subscriber
        stop_process(tail)
        live["observed"] = observed_arrivals(records, decisions)
        return live
    finally:
        if tail is not None:
            stop_process(tail)
        stop_process(proc)
