"""``launch compare`` and the simulator's batch runner: run cache, bisection, CLI, and the simulator's fast
paths (quiet decode steps) against the plain step-by-step path. Small synthetic traces, well under 30 s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.engine.core import EngineCore
from launch.__main__ import main
from launch.sim.batch import Batch, bisect_rate
from launch.sim.cluster import SimConfig, simulate
from launch.trace import TraceRequest, load_trace, window
from router.model.policies import make_policy

PROFILE = "h100-llama3.1-8b"


def write_trace(path: Path, n: int = 40, spacing_ms: int = 250) -> Path:
    """A Mooncake-format trace: three prefix families, long and short prompts, outputs of 5..60 tokens."""
    lines = []
    for k in range(n):
        fam = k % 3
        ids = [100 * fam + j for j in range(1 + 2 * fam)] + [10_000 + k]
        lines.append(
            json.dumps(
                {
                    "timestamp": k * spacing_ms,
                    "input_length": 512 * len(ids) - 37 * (k % 4),
                    "output_length": 5 + (7 * k) % 56,
                    "hash_ids": ids,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_of(path: Path, rate: float) -> list[tuple[float, TraceRequest]]:
    return window(load_trace(path), rate, None)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_total_tokens": 6000, "max_running_requests": 6},  # eviction and retraction
        {"enable_mixed_chunk": True, "chunked_prefill_size": 1024},
    ],
)
def test_quiet_decode_fast_path_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict[str, object]
) -> None:
    plan = plan_of(write_trace(tmp_path / "t.jsonl"), 3.0)
    cfg = SimConfig(instances=3, profile=PROFILE, **kw)  # type: ignore[arg-type]
    fast = simulate(plan, make_policy("lmetric"), cfg)
    monkeypatch.setattr(EngineCore, "run_quiet_decodes", lambda self, now, horizon: [])
    slow = simulate(plan, make_policy("lmetric"), cfg)
    assert fast.records == slow.records
    for f in ("steps", "max_batch_size", "mean_batch_size", "mean_batch_size_time_weighted", "decisions"):
        assert getattr(fast, f) == getattr(slow, f), f
    assert fast.retractions == slow.retractions


def test_every_policy_runs_in_the_simulator(tmp_path: Path) -> None:
    plan = plan_of(write_trace(tmp_path / "t.jsonl", n=24), 2.0)
    cfg = SimConfig(instances=3, profile=PROFILE)
    for name in ("vllm_v1", "bailian", "dynamo", "sglang_cache_aware", "random", "power_of_two", "linear"):
        a = simulate(plan, make_policy(name, seed=3), cfg)
        b = simulate(plan, make_policy(name, seed=3), cfg)
        assert a.records == b.records, name  # seeded: deterministic
        assert len(a.records) == 24 and all(r.status == "ok" for r in a.records), name


def test_batch_caches_runs_and_bisects(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", n=30, spacing_ms=400)
    cfg = SimConfig(instances=2, profile=PROFILE)
    seen: list[bool] = []
    with Batch(
        trace, 12.0, cfg, tmp_path / "cache", jobs=1, on_result=lambda s, r: seen.append(r.cached)
    ) as b:
        spec = b.spec("lmetric", 1.0)
        first = b.run([spec, spec])
        assert first[0] is first[1] and seen == [False]
        assert b.run([spec])[0].summary == first[0].summary and seen[-1] is True
        assert len(first[0].ttft) == first[0].summary["requests"] == 30
        floor = b.run([b.spec("vllm_v1", 0.05)])[0].mean_ttft
        bis = bisect_rate(b, "vllm_v1", 1.5 * floor, 0.05, tol=0.05)
    assert bis.rate_scale in dict(bis.probes) and dict(bis.probes)[0.05] == pytest.approx(floor)
    # the probes bracket the target: mean TTFT grows with the rate
    below = [t for s, t in bis.probes if s <= bis.rate_scale]
    assert min(below) < 1.5 * floor


def test_compare_cli_writes_tables_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl", n=20)
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    argv = [
        "compare", "--trace", str(trace), "--profile", PROFILE, "--instances", "2", "--window", "10",
        "--levels", "light,medium", "--rate-scale", "light=1", "--rate-scale", "medium=2",
        "--policies", "vllm_v1,round_robin", "--jobs", "2", "--no-cache",
        "--json", str(out), "--markdown", str(md), "--plot", str(tmp_path / "plots"),
    ]  # fmt: skip
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["floor"] == {"rate_scale": 0.05, "mean_ttft": None}  # every level given: no calibration
    rows = {r["policy"]: r for r in rep["levels"]["medium"]["rows"]}
    assert set(rows) == {"lmetric", "vllm_v1", "round_robin"}  # lmetric always compared
    assert rows["vllm_v1"]["lmetric_ttft_change_pct"] == pytest.approx(
        100 * (rows["lmetric"]["ttft_mean"] / rows["vllm_v1"]["ttft_mean"] - 1)
    )
    assert "| lmetric |" in md.read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "t-h100-llama3.1-8b-light-tpot.png",
        "t-h100-llama3.1-8b-light-ttft.png",
        "t-h100-llama3.1-8b-medium-tpot.png",
        "t-h100-llama3.1-8b-medium-ttft.png",
    ]
    assert "floor: not measured" in capsys.readouterr().out


def test_compare_cli_rejects_bad_input(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", n=3)
    assert main(["compare", "--trace", str(trace), "--levels", "hot"]) == 2
    assert main(["compare", "--trace", str(trace), "--policies", "nope"]) == 2
    assert main(["compare", "--trace", str(trace), "--rate-scale", "medium"]) == 2
    assert main(["compare", "--trace", str(tmp_path / "missing.jsonl")]) == 2


def test_simulate_linear_weights_flags(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", n=12)
    out = tmp_path / "s.json"
    base = ["simulate", "--trace", str(trace), "--instances", "2", "--no-progress", "--policies", "linear"]
    assert main([*base, "--linear-a", "1", "--linear-b", "0", "--summary-json", str(out)]) == 0
    assert json.loads(out.read_text())["runs"]["linear"]["requests"] == 12
    assert main([*base, "--linear-a", "0", "--linear-b", "0"]) == 2


def test_provoke_traces_and_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.sim import provoke

    for case in provoke.CASES:
        lines = provoke.make_trace(case)
        ts = [int(str(d["timestamp"])) for d in lines]
        assert ts == sorted(ts) and len(lines) > 50
        assert all(d["input_length"] <= 512 * len(d["hash_ids"]) for d in lines)  # type: ignore[arg-type,operator]
    out = tmp_path / "s.json"
    assert (
        provoke.main(
            [
                "at_max_running",
                "--out",
                str(tmp_path / "t.jsonl"),
                "--policies",
                "lmetric,lmetric_plain",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads(out.read_text())
    # the skip is what separates the two: it fires, and lowers the mean TTFT
    assert rep["lmetric"]["failure_cases"]["at_max_running"] > 0
    assert rep["lmetric"]["ttft"]["mean"] < rep["lmetric_plain"]["ttft"]["mean"]
    assert "at_max_running" in capsys.readouterr().out
    with pytest.raises(ValueError):
        provoke.make_trace("nope")


def test_router_takes_every_policy_and_the_linear_weights() -> None:
    from router.cli import parse_args
    from router.config import RouterConfig
    from router.model.lmetric import Linear
    from router.model.model import RoutingModel
    from router.model.policies import POLICIES

    cfg = parse_args(["--policy", "linear", "--linear-a", "2", "--linear-b", "0"])
    assert (cfg.policy, cfg.policy_params) == ("linear", (("linear", "a", 2.0), ("linear", "b", 0.0)))
    core = RoutingModel(cfg.model, lambda job: None)
    assert isinstance(core.policy, Linear) and (core.policy.a, core.policy.b) == (2.0, 0.0)
    for name in POLICIES:
        assert RoutingModel(RouterConfig(policy=name).model, lambda job: None).policy.name == name
    with pytest.raises(ValueError):
        RouterConfig(policy_params=(("linear", "a", 0.0), ("linear", "b", 0.0)))
