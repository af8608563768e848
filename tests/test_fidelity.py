"""``launch fidelity``: its comparison logic (pure), re-simulation of stored live runs, and the live side's
join of records with decisions and scrape of a real emulated engine's pacing metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agents.engine.config import ServerConfig
from agents.engine.server import EngineServer
from launch.__main__ import main
from launch.sim.fidelity import run_sim, run_sim_observed
from launch.sim.fidelity_table import agreement, format_agreement, relative, side_by_side, spread
from launch.sim.live_run import engine_pace, observed_arrivals
from launch.summary import RequestRecord, summarize
from launch.trace import load_trace, window

pytestmark = pytest.mark.timeout(30)


def run_summary(ttft: float, tpot: float, n: int = 10) -> dict[str, Any]:
    """A replay-shaped summary of ``n`` identical requests with the given TTFT and TPOT (11 tokens each)."""
    e2e = ttft + 10 * tpot
    recs = [
        RequestRecord(start_time=float(i), ttft=ttft, tpot=tpot, e2e=e2e, prompt_tokens=100, output_tokens=11)
        for i in range(n)
    ]
    return summarize(recs)


def test_spread_and_relative() -> None:
    runs = [run_summary(1.0, 0.02), run_summary(2.0, 0.04), {"ttft": {"mean": None}}]
    assert spread(runs, lambda s: s["ttft"]["mean"]) == pytest.approx((1.5, 1.0, 2.0))
    assert spread([{"x": None}], lambda s: s["x"]) is None
    assert relative(2.0, 2.5) == pytest.approx(0.25)
    assert relative(0.0, 1.0) is None and relative(None, 1.0) is None and relative(1.0, None) is None


def test_agreement_compares_means_over_runs() -> None:
    live = [run_summary(1.0, 0.025), run_summary(1.2, 0.015)]  # means 1.1 s and 0.020 s
    sim = [run_summary(1.0, 0.025), run_summary(1.0, 0.020), run_summary(1.0, 0.015)]  # 1.0 s, 0.020 s
    agree = agreement(live, sim)
    assert agree["ttft_mean"] == pytest.approx(-0.1 / 1.1)
    assert agree["tpot_mean"] == pytest.approx(0.0, abs=1e-9)
    line = format_agreement(agree, 0.05)
    assert "TTFT mean -9.1% (OUTSIDE 5%)" in line and "TPOT mean " in line and "0.0% (within 5%)" in line
    assert "within 15%" in format_agreement({"ttft_mean": 0.149}, 0.15)
    assert format_agreement({"tpot_mean": None}, 0.15) == "agreement: TPOT mean -"


def test_side_by_side_compares_every_simulated_set() -> None:
    pace = {"steps": 10, "step_lateness_mean_s": 0.002, "late_steps_over_10ms": 0.1, "pace_resync_s": 0.0}
    live = [dict(run_summary(1.0, 0.02), engine_pace=pace)]
    trace_arr = [run_summary(0.9, 0.02), run_summary(1.1, 0.03)]
    live_arr = [run_summary(1.2, 0.02)]
    lines = side_by_side(live, [("sim A", trace_arr), ("sim B", live_arr)], "== title").splitlines()
    assert lines[0] == "== title" and lines[1] == "runs: live 1, sim A 2, sim B 1"
    ttft = next(ln for ln in lines if ln.startswith("TTFT mean (s)")).split()
    assert ttft[3:] == ["1", "1", "+0.0%", "1.2", "+20.0%"]
    tpot = next(ln for ln in lines if ln.startswith("TPOT mean (s)")).split()
    assert tpot[3:] == ["0.02", "0.025", "+25.0%", "0.02", "+0.0%"]
    assert "TPOT mean range over runs: live 0.02..0.02, sim A 0.02..0.03, sim B 0.02..0.02" in lines
    assert "10 steps, outputs 2.00 ms late on average, 10.0% of steps > 10 ms late" in lines[-1]


def write_trace(path: Path) -> Path:
    """Six Mooncake-format requests: a burst of four at t=0 (distinct prompts), two more at t=1 s."""
    rows = [
        {
            "timestamp": ts,
            "input_length": n,
            "output_length": 4,
            "hash_ids": list(range(10 * k, 10 * k + -(-n // 512))),
        }
        for k, (ts, n) in enumerate([(0, 600), (0, 3000), (0, 900), (0, 1500), (1000, 700), (1000, 800)])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_observed_arrivals_join_records_and_decisions(tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(
            json.dumps({"index": i, "start_time": 100.0 + t}) + "\n"
            for i, t in [(0, 0.0), (1, 0.5), (2, 1.0)]
        )
        + "not json\n"
    )
    decisions = tmp_path / "decisions.jsonl"
    lines = [
        {"event": "RequestRouted", "request_id": "replay-1", "ts": 100.7},
        {"event": "RequestRouted", "request_id": "replay-0", "ts": 100.1},
        {"event": "RequestRouted", "request_id": "replay-1", "ts": 101.9},  # a retry: the first counts
        {"event": "RequestFinished", "request_id": "replay-2", "ts": 101.5},
        {"event": "RequestRouted", "request_id": "someone-else", "ts": 100.2},
    ]
    decisions.write_text("".join(json.dumps(d) + "\n" for d in lines) + "{broken\n")
    rows = observed_arrivals(records, decisions)["requests"]
    assert [r[0] for r in rows] == [0, 1, 2] and rows[2][2] is None
    assert rows[0][1:] == pytest.approx([0.0, 0.1]) and rows[1][1:] == pytest.approx([0.5, 0.7])
    assert observed_arrivals(records, tmp_path / "missing.jsonl")["requests"][0][2] is None


def test_sim_on_observed_arrivals_follows_the_live_order(tmp_path: Path) -> None:
    """The burst's order comes from the observed routing times, not the trace; TTFT and E2E include each
    request's send-to-route delay, and a request without a decision gets the median delay."""
    trace = write_trace(tmp_path / "t.jsonl")
    args = argparse.Namespace(
        trace=trace, duration=None, instances=1, profile="h100-llama3.1-8b", page_size=16,
        max_running_requests=128, max_total_tokens=None, event_delay=0.005, policy="round_robin",
        ingest_overhead=0.0, ingest_per_token=0.0,
    )  # fmt: skip
    # Request 1 (3,000 tokens) was routed last of the burst, 0.2 s after it was sent.
    observed = {
        "requests": [
            [0, 0.0, 0.01], [1, 0.0, 0.2], [2, 0.0, 0.02], [3, 0.0, 0.03], [4, 1.0, 1.01], [5, 1.0, None],
        ]
    }  # fmt: skip
    plan = window(load_trace(trace), 1.0, None)
    got = run_sim_observed(args, plan, observed)
    assert got is not None and got["requests"] == 6 and got["failed"] == 0
    as_traced = run_sim(args, plan)
    # On one instance, the long prompt routed last no longer delays the three short ones' first tokens.
    assert got["ttft"]["p50"] < as_traced["ttft"]["p50"]
    assert run_sim_observed(args, plan, {"requests": []}) is None
    assert run_sim_observed(args, plan, {"requests": [[0, 0.0, None]]}) is None


@pytest.fixture
async def engine() -> Any:
    srv = EngineServer(ServerConfig(time_scale=1.0, load_interval=0.05, max_total_tokens=50_000))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_engine_pace_counts_steps_and_stalls(engine: EngineServer, tmp_path: Path) -> None:
    """A real engine at time scale 1: each step's lateness is recorded, and an event loop blocked for
    longer than the catch-up window shows as modelled time given up; an unreachable engine is skipped."""
    cluster = tmp_path / "cluster.json"
    cluster.write_text(
        json.dumps(
            {
                "processes": [
                    {"role": "engine", "endpoints": {"http": engine.endpoints["http"]}},
                    {"role": "engine", "endpoints": {"http": "http://127.0.0.1:9"}},  # nothing listens
                    {"role": "router-primary", "endpoints": {"http": "http://127.0.0.1:9"}},
                ]
            }
        )
    )
    body = {"text": "pace me", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=25)) as http:
        req = asyncio.create_task(http.post(engine.endpoints["http"] + "/generate", json=body))
        while engine.core.load_stat().num_running_reqs == 0:  # decoding has started
            await asyncio.sleep(0.01)
        time.sleep(1.3)  # block the engine's event loop past its 1 s catch-up window
        resp = await req
        assert resp.status == 200
        await resp.read()
    pace = await asyncio.to_thread(engine_pace, cluster, 2.0)
    assert pace["steps"] >= 400
    assert pace["pace_resync_s"] >= 1.0
    assert 0.0 <= pace["late_steps_over_10ms"] < 0.5 and pace["step_lateness_mean_s"] >= 0.0


def test_reuse_live_resimulates_stored_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--reuse-live`` compares stored live runs with fresh simulations and starts no cluster; a file
    that is not a fidelity summary is a usage error."""
    trace = write_trace(tmp_path / "t.jsonl")
    stored = dict(
        run_summary(0.2, 0.01, n=6), observed={"requests": [[i, 0.0, 0.01 * (i + 1)] for i in range(6)]}
    )
    runs = tmp_path / "live.json"
    runs.write_text(json.dumps({"1": {"live": [stored]}}))
    out = tmp_path / "report.json"
    argv = ["fidelity", "--trace", str(trace), "--rate-scales", "1", "--reuse-live", str(runs),
            "--sim-seeds", "2", "--instances", "2", "--summary-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "runs: live 1, sim trace-arr 2, sim live-arr 2" in text and "sim live-arr: agreement:" in text
    report = json.loads(out.read_text())["1"]
    assert len(report["live"]) == 1 and len(report["sim"]) == 2 and len(report["sim_live_arrivals"]) == 2
    assert report["ingest"]["requests"] == 6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"live": "nope"}}))
    assert main(["fidelity", "--trace", str(trace), "--reuse-live", str(bad)]) == 2
    assert "not a launch fidelity summary" in capsys.readouterr().err
