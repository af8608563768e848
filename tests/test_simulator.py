"""The discrete-event simulator: determinism, routing on cache, the engine on a virtual clock, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.engine.profiles import get_profile
from kvindex.hashing import block_hashes
from kvindex.protocol import BlockStored, LoadStat
from launch.__main__ import main
from launch.sim.cluster import SimConfig, SimResult, _needed_ticks, simulate
from launch.sim.ingest import INGEST_OVERHEAD_S, INGEST_PER_TOKEN_S, ingest_times
from launch.sim.prompts import PromptFactory
from launch.sim.router_model import SimRouter
from launch.summary import summarize
from launch.trace import TraceRequest, load_trace, prompt_tokens, window
from router.model.policies import make_policy

PROFILE = "h100-llama3.1-8b"


def req(
    index: int, arrival: float, ids: list[int], input_length: int | None = None, out: int = 8
) -> TraceRequest:
    n = input_length if input_length is not None else 512 * len(ids)
    return TraceRequest(index, arrival, n, out, tuple(ids))


def run(plan: list[TraceRequest], policy: str, **kw: object) -> SimResult:
    cfg = SimConfig(**{"instances": 4, "profile": PROFILE, **kw})  # type: ignore[arg-type]
    return simulate([(r.arrival, r) for r in plan], make_policy(policy), cfg)


def without_wall(s: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in s.items() if k != "sim_wall_s"}


def mixed_plan(n: int = 40) -> list[TraceRequest]:
    """Conversations sharing system prompts, arriving in bursts, with long and short prompts."""
    plan = []
    for k in range(n):
        family = k % 3
        ids = [100 * family + j for j in range(1 + family * 3)] + [10_000 + k]
        plan.append(
            req(k, 0.05 * k + (0.0 if k % 5 else 0.3), ids, 512 * len(ids) - 37 * (k % 4), out=5 + k % 30)
        )
    return plan


# --------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("page", [16, 64, 48])
def test_prompt_factory_matches_replay_tokens_and_router_hashes(page: int) -> None:
    f = PromptFactory(page)
    reqs = [
        req(0, 0, [1, 2, 3], 1300),
        req(1, 0, [1, 2, 9], 1536),
        req(2, 0, [1], 40),
        req(3, 0, [1, 2], 530),
    ]
    for r in reqs * 2:  # the second pass hits the memo
        toks = f.tokens(r)
        assert list(toks) == prompt_tokens(r)
        assert list(f.hashes(r, toks)) == block_hashes(toks, page)


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_results() -> None:
    plan = mixed_plan()
    a, b = run(plan, "lmetric", seed=7), run(plan, "lmetric", seed=7)
    assert a.records == b.records
    assert without_wall(vars(a)) == without_wall(vars(b))
    assert summarize(a.records) == summarize(b.records)
    assert len(a.records) == len(plan) and all(r.status == "ok" for r in a.records)
    assert all(r.output_tokens == p.output_length for r, p in zip(a.records, plan, strict=True))


def test_needed_ticks_are_the_last_report_before_each_arrival() -> None:
    ticks = _needed_ticks([0.001, 0.2, 0.26, 0.27, 1.0], phase=0.05, period=0.1, delay=0.01)
    # 0.001: no report yet; 0.2 -> 0.15 (0.25 + 0.01 > 0.2); 0.26/0.27 -> 0.25; 1.0 -> 0.95
    assert ticks == pytest.approx([0.15, 0.25, 0.95])


# ------------------------------------------------------------------------------------------- routing


def test_lmetric_routes_a_shared_prefix_to_the_caching_instance() -> None:
    # 12 requests 2 s apart (each finishes before the next), all sharing a 6-block (3072-token) prefix.
    plan = [req(k, 2.0 * k, [1, 2, 3, 4, 5, 6, 1000 + k]) for k in range(12)]
    lm, rr = run(plan, "lmetric"), run(plan, "round_robin")
    hit_lm, hit_rr = summarize(lm.records)["hit_ratio"], summarize(rr.records)["hit_ratio"]
    assert hit_lm > hit_rr
    assert hit_lm > 0.75  # every request after the first hits the 3072-token prefix (of 3584)
    assert max(lm.decisions.values()) == len(plan)  # all on the instance that caches the prefix
    assert sorted(rr.decisions.values()) == [3, 3, 3, 3]
    ttft = summarize(lm.records)["ttft"]["mean"]
    assert ttft < summarize(rr.records)["ttft"]["mean"]


def test_router_sees_kv_events_and_load_reports_only_after_the_delay() -> None:
    r = SimRouter(["a", "b"], make_policy("lmetric"), block_size=4, event_delay=0.5)
    hashes = block_hashes(list(range(8)), 4)
    r.kv_events(0, 1.0, [BlockStored(tuple(hashes), None, tuple(range(8)), 4)])
    assert r.index.match_hashes(hashes).cached_tokens["a"] == 0
    # Before the events arrive the decision cannot use them ...
    i, ticket, d = r.route(1.2, hashes, 9)
    assert d.cached_tokens == 0
    r.finish(i, ticket)
    # ... afterwards it does.
    i, ticket, d = r.route(1.6, hashes, 9)
    assert (d.instance, d.cached_tokens) == ("a", 8)
    # The dispatch stays pending until a report stamped >= dispatch + margin arrives.
    stat = LoadStat(1, 0, 10, 100, 0, 1, 10, 128, 0, 0)
    r.load_report(0, 1.61, stat)  # ts 1.61 < 1.6 + 0.02: does not cover it
    r.load_report(0, 1.7, stat)  # covers it, delivered at 2.2
    a = r.model.table.get("a")
    assert a is not None
    assert a.view().batch_size == 1 and a.view().queued_prefill_tokens == 1
    r._deliver(2.15)
    assert len(a.pending) == 1 and a.load is not None
    assert a.load.ts == 1.61
    r._deliver(2.2)
    assert not a.pending and a.view().batch_size == 1  # from the report now
    assert a.load is not None and a.load.ts == 1.7


# ---------------------------------------------------------------------------------------- engine model


def test_prefix_hit_skips_prefill_on_the_virtual_clock() -> None:
    ids = list(range(1, 33))  # 32 blocks = 16384 tokens: two 8192-token prefill chunks
    plan = [req(0, 0.0, ids, out=4), req(1, 10.0, ids, out=4)]
    res = run(plan, "lmetric", instances=1)
    first, second = res.records
    assert first.cached_tokens == 0 and second.cached_tokens == 16384 - 16  # the last page is recomputed
    p = get_profile(PROFILE)
    chunks = p.step_time([(8192, 0)]) + p.step_time([(8192, 8192)])
    ingest = INGEST_OVERHEAD_S + INGEST_PER_TOKEN_S * 16384  # send -> routed
    assert first.ttft == pytest.approx(ingest + chunks)  # send -> end of the step producing the first token
    assert second.ttft == pytest.approx(ingest + p.step_time([(16, 16368)]))
    assert second.ttft is not None and first.ttft is not None and second.ttft < first.ttft / 10
    assert first.tpot is not None and first.e2e is not None
    assert first.tpot == pytest.approx((first.e2e - first.ttft) / 3)


def test_ingest_times_is_processor_sharing() -> None:
    # A lone request: its own work. Two sent together: the shorter done at twice its work, the longer
    # after both; a later one shares the server only while the earlier one is still in it.
    assert ingest_times([1.0], [1000], 0.001, 1e-6) == pytest.approx([1.002])
    got = ingest_times([0.0, 0.0, 0.5], [9000, 1000, 1000], 0.0, 1e-5)
    assert got == pytest.approx([0.1, 0.02, 0.51])
    got = ingest_times([0.0, 0.005], [1000, 1000], 0.0, 1e-5)  # overlap 0.005 s: each half speed then
    assert got == pytest.approx([0.015, 0.02])
    assert ingest_times([0.3, 0.1], [5, 7], 0.0, 0.0) == [0.3, 0.1]
    assert ingest_times([], [], 0.001, 1e-6) == []


def test_ingest_time_orders_a_burst_and_counts_in_ttft() -> None:
    """Requests sharing a timestamp are routed after the router's processor-shared ingest (shortest
    prompt first), and TTFT runs from the send; with no ingest work they are routed at once, in trace
    order."""
    plan = [req(0, 0.0, list(range(1, 17)), out=2), req(1, 0.0, [100], out=2)]  # 8192 then 512 tokens
    p = get_profile(PROFILE)
    work_long, work_short = 0.01 + 1e-5 * 8192, 0.01 + 1e-5 * 512
    a, b = run(plan, "round_robin", instances=1, ingest_overhead=0.01, ingest_per_token=1e-5).records
    assert b.ttft == pytest.approx(2 * work_short + p.step_time([(512, 0)]))  # routed first, prefilled alone
    # The long prompt is routed after the short request has finished, and is prefilled alone.
    assert b.e2e is not None and b.e2e < work_short + work_long
    assert a.ttft == pytest.approx(work_short + work_long + p.step_time([(8192, 0)]))
    assert a.start_time == b.start_time == 0.0
    a0, b0 = run(plan, "round_robin", instances=1, ingest_overhead=0.0, ingest_per_token=0.0).records
    # Routed together in trace order: the long prompt fills the first step's 8192-token prefill budget
    # and the short one waits behind it.
    assert a0.ttft == pytest.approx(p.step_time([(8192, 0)]))
    assert b0.ttft is not None and a0.ttft is not None and b0.ttft > a0.ttft > 5 * (b.ttft or 0.0)


def test_given_routing_times_replace_the_ingest_model() -> None:
    plan = [req(0, 0.0, list(range(1, 17)), out=2), req(1, 0.0, [100], out=2)]
    cfg = SimConfig(instances=1, profile=PROFILE)
    sends = [(r.arrival, r) for r in plan]
    a, b = simulate(sends, make_policy("round_robin"), cfg, routed_at=[0.5, 0.0]).records
    p = get_profile(PROFILE)
    assert b.ttft == pytest.approx(p.step_time([(512, 0)]))  # routed at its send
    assert b.e2e is not None and b.e2e < 0.5
    assert a.ttft == pytest.approx(0.5 + p.step_time([(8192, 0)]))  # routed 0.5 s after its send
    with pytest.raises(ValueError, match="routed_at"):
        simulate(sends, make_policy("round_robin"), cfg, routed_at=[0.0])


def test_batch_statistics_and_rejections() -> None:
    plan = [req(k, 0.0, [k + 1], 400, out=50) for k in range(6)] + [req(6, 0.1, [99, 98, 97], 1500)]
    res = run(plan, "round_robin", instances=2, max_total_tokens=1024)
    assert res.records[6].status.startswith("rejected:") and res.records[6].ttft is None
    assert all(r.status == "ok" for r in res.records[:6])
    assert res.max_batch_size >= 2 and 1 <= res.mean_batch_size <= res.max_batch_size
    assert res.steps > 50


# ------------------------------------------------------------------------------------------------- CLI


def write_trace(path: Path, n: int = 20) -> Path:
    """A Mooncake-format trace: a shared 3-block prefix, prompts of 2-4 blocks, 150 ms apart."""
    rows = []
    for k in range(n):
        length = 700 + 300 * (k % 5)
        need = -(-length // 512)
        ids = [*[7, 8, 9][: need - 1], 500 + k]
        rows.append(
            {"timestamp": 150 * k, "input_length": length, "output_length": 3 + k % 7, "hash_ids": ids}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_writes_summary_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    assert len(load_trace(trace)) == 20
    out = tmp_path / "s.json"
    code = main(
        ["simulate", "--trace", str(trace), "--instances", "3", "--policies", "lmetric,round_robin",
         "--summary-json", str(out), "--plot", str(tmp_path / "plots"), "--no-progress", "--seed", "3"]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "== lmetric" in text and "== round_robin" in text and "TTFT" in text and "batch size" in text
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"lmetric", "round_robin"}
    for s in runs.values():
        assert s["requests"] == 20 and s["failed"] == 0
        assert {"ttft", "tpot", "e2e", "hit_ratio", "throughput_rps", "max_batch_size", "mean_batch_size",
                "sim_wall_s"} <= set(s)  # fmt: skip
        assert set(s["ttft"]) == {"mean", "p50", "p90", "p99"}
    for name in ("ttft_cdf.png", "tpot_cdf.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    # Same window through the library gives the same summary (the CLI adds nothing random).
    res = simulate(
        window(load_trace(trace), 1.0, None), make_policy("lmetric"), SimConfig(instances=3, seed=3)
    )
    assert summarize(res.records)["ttft"] == runs["lmetric"]["ttft"]


def test_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl", 3)
    assert main(["simulate", "--trace", str(trace), "--policies", "nope", "--no-progress"]) == 2
    assert main(["simulate", "--trace", str(tmp_path / "missing.jsonl"), "--no-progress"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_gap_join_joins_both_runs_request_by_request(tmp_path: Path) -> None:
    """``launch.sim.gap_join`` on a short window: both runs are joined over every request, and the
    prompt buckets' shares of the mean-TTFT gap add up to the gap."""
    from launch.sim import gap_join

    out = tmp_path / "gap.json"
    assert (
        gap_join.main(["--instances", "4", "--window", "60", "--rate-scale", "1.0", "--json", str(out)]) == 0
    )
    rep = json.loads(out.read_text())
    runs = rep["runs"]
    assert set(runs) == {"lmetric", "linear_b1"}
    r = rep["report"]
    assert r["requests"] > 0 and sum(b["requests"] for b in r["by_prompt"]) == r["requests"]
    by_bucket = sum(b["gap_share_of_mean_s"] for b in r["by_prompt"])  # the buckets' shares add up to the gap
    gap = runs["lmetric"]["ttft_mean_s"] - runs["linear_b1"]["ttft_mean_s"]
    assert by_bucket == pytest.approx(gap, abs=0.01 * len(r["by_prompt"]))
