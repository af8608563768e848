"""The Intelligent Router seed (arXiv 2408.13510): the mixing penalty, the DQN policy's action choice and
hold, the simulator's hold, the length predictor and a tiny training run."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from launch.sim.cluster import HOLD_S, MAX_HOLDS, SimConfig, simulate
from launch.trace import TraceRequest
from router.model.intelligent import (
    IntelligentRouter,
    LengthPredictor,
    QNet,
    mixing_penalty,
    output_bucket,
    state_vector,
)
from router.model.policies import Decision, InstanceView, Policy, make_policy

PROFILE = "h100-llama3.1-8b"


def v(name: str, **kw: int) -> InstanceView:
    base = {"max_running_requests": 128, "kv_capacity_tokens": 100_000}
    return InstanceView(name=name, **{**base, **kw})


def test_mixing_penalty_weighs_prefill_into_decodes_and_resident_requests() -> None:
    busy = v("a", batch_size=4, running=4, kv_used_tokens=50_000)
    idle = v("b", batch_size=4, running=4, kv_used_tokens=0)
    # a long prompt costs more where more KV is decoding, plus the above-threshold penalty
    assert mixing_penalty(busy, 20_000, 0) > mixing_penalty(idle, 20_000, 0) + 0.5
    # fully cached: no prefill impact, only the decode impact (resident requests / cap), 50/50
    assert mixing_penalty(busy, 20_000, 20_000) == pytest.approx(0.5 * 4 / 128)
    assert make_policy("mixing_penalty").choose([busy, idle], 20_000, {}).instance == "b"
    assert make_policy("mixing_penalty", params={"alpha": 0.0}).choose(
        [idle, busy], 20_000, {"a": 0}
    ).reason in (
        "score",
        "first",
    )


def test_output_buckets() -> None:
    assert [output_bucket(n) for n in (1, 63, 64, 255, 256, 1023, 1024, 9999)] == [0, 0, 1, 1, 2, 2, 3, 3]


def _net(prefer: int, n: int, features: int) -> QNet:
    w1 = np.zeros((features, 64))
    w2 = np.zeros((64, 64))
    w3 = np.zeros((64, n + 1))
    b3 = np.zeros(n + 1)
    b3[prefer] = 10.0
    return QNet((w1, w2, w3), (np.zeros(64), np.zeros(64), b3), n)


def test_intelligent_router_acts_on_q_and_can_hold() -> None:
    views = [v("a"), v("b"), v("c")]
    feats = len(state_vector(views, 100, {}, 1, 0))
    pol = IntelligentRouter(_net(2, 3, feats))
    d = pol.choose(views, 100, {})
    assert (d.instance, d.reason) == ("c", "score")
    hold = IntelligentRouter(_net(3, 3, feats)).choose(views, 100, {})
    assert hold.reason == "hold" and hold.instance in {"a", "b", "c"}
    # no network (or one for another cluster size): the mixing penalty, never hold
    plain = IntelligentRouter(None).choose([v("a", batch_size=9), v("b")], 100, {})
    assert (plain.instance, plain.reason) != ("a", "hold")
    assert IntelligentRouter(_net(3, 5, feats)).choose(views, 100, {}).reason != "hold"


class _HoldTwice(Policy):
    name = "hold_twice"

    def __init__(self) -> None:
        self.calls = 0

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        self.calls += 1
        name = sorted(x.name for x in views)[0]
        return Decision(name, self.name, 0.0, prompt_tokens, 0, "hold" if self.calls <= 2 else "score")


def test_simulator_holds_a_request_at_the_router() -> None:
    plan = [TraceRequest(0, 0.0, 512, 4, (1,))]
    cfg = SimConfig(instances=2, profile=PROFILE, ingest_overhead=0.0, ingest_per_token=0.0)
    seen: list[int] = []
    pol = _HoldTwice()
    res = simulate([(0.0, plan[0])], pol, cfg, before_route=lambda r, held: seen.append(held))
    (rec,) = res.records
    assert pol.calls == 3 and seen == [0, 0, 0]
    assert rec.status == "ok" and rec.ttft is not None and rec.ttft >= 2 * HOLD_S

    class Always(_HoldTwice):
        def choose(self, views: Sequence[InstanceView], p: int, c: Mapping[str, int]) -> Decision:
            self.calls += 1
            return Decision("sim-00", self.name, 0.0, p, 0, "hold")

    always = Always()
    (rec,) = simulate([(0.0, plan[0])], always, cfg).records
    assert always.calls == MAX_HOLDS + 1 and rec.status == "ok"


def test_length_predictor_and_its_accuracy() -> None:
    from launch.rl import predictor_accuracy, train_predictor

    reqs = [TraceRequest(k, 0.0, 100 if k % 2 else 5000, 20 if k % 2 else 2000, ()) for k in range(40)]
    p = train_predictor(reqs)
    assert isinstance(p, LengthPredictor)
    assert p.predict(100) == 0 and p.predict(5000) == 3
    assert predictor_accuracy(p, reqs) == 1.0


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (the rl extra)")
@pytest.mark.timeout(300)
def test_train_rl_runs_seeded_and_writes_checkpoints(tmp_path: Path) -> None:
    from launch.__main__ import main
    from launch.rl import load_checkpoint

    trace = tmp_path / "t.jsonl"
    lines = [
        f'{{"timestamp": {500 * k}, "input_length": 1024, "output_length": {8 + k % 20}, "hash_ids": [{k % 3}, {100 + k}]}}'
        for k in range(80)
    ]
    trace.write_text("\n".join(lines) + "\n")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = ["train-rl", "--trace", str(trace), "--instances", "2", "--profile", PROFILE, "--episodes", "3",
                "--episode-window", "10", "--train-until", "30", "--eval-from", "30", "--eval-window", "10",
                "--updates", "2", "--checkpoint-every", "2", "--val-every", "1", "--val-from", "0",
                "--out", str(out)]  # fmt: skip
        assert main(args) == 0
        outs.append(out)
    assert (outs[0] / "checkpoint-0002.npz").is_file() and (outs[0] / "eval.json").is_file()
    report = json.loads((outs[0] / "eval.json").read_text())
    assert report["evaluated"] == "best" and 1 <= report["best_episode"] <= 3  # validated every episode
    assert (outs[0] / "best.npz").is_file() and load_checkpoint(outs[0] / "best.npz")[0].shared
    a, b = (load_checkpoint(o / "final.npz")[0] for o in outs)
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))  # seeded


def test_occupancy_integral_is_littles_law() -> None:
    from launch.rl_targets import little_returns, occupancy

    starts, ends = np.array([0.0, 1.0, 1.5]), np.array([2.0, 4.0, 1.5])
    f = occupancy(starts, ends, np.array([0.0, 1.0, 2.0, 3.0, 10.0]))
    assert f.tolist() == pytest.approx([0.0, 1.0, 3.0, 4.0, 5.0])  # total = sum of times in system
    times = np.array([0.0, 0.5, 1.0, 3.0, 10.0])
    # undiscounted, one-step lookahead: the rewards telescope to minus the total time in the system
    ret = little_returns(times, starts, ends, gamma=1.0, horizon=0.0, scale=1.0)
    assert ret.use.tolist() == [True, True, True, True, False]
    assert ret.g[ret.use].sum() == pytest.approx(-5.0)
    assert ret.nxt.tolist()[:4] == [1, 2, 3, 4] and ret.disc.tolist() == [1.0] * 5
    # a longer lookahead sums the discounted costs up to the first decision past it
    long = little_returns(times, starts, ends, gamma=0.5, horizon=1.0, scale=2.0)
    assert long.nxt[0] == 2 and long.g[0] == pytest.approx(-(0.5 + 0.5**0.5 * 0.5) / 2)
    assert long.disc[0] == pytest.approx(0.5)


def test_own_returns_charge_holds_to_the_held_request() -> None:
    from launch.rl_targets import own_returns

    times = np.array([0.0, 0.02, 0.03, 0.04])
    ret = own_returns(times, [7, 8, 7, 8], {7: 1.0, 8: None}, [False, False, True, True], 0.02, 1.0)
    assert ret.g.tolist() == pytest.approx([-0.02, -0.02, -0.97, -1.0])
    assert ret.nxt.tolist() == [2, 3, -1, -1] and ret.disc.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_shared_network_scores_instances_symmetrically() -> None:
    from router.model.intelligent import N_FEATURES, candidate_matrix

    views = [v("a", running=5), v("b", waiting=3, kv_used_tokens=50_000), v("c")]
    m = candidate_matrix(views, 1000, {"c": 512}, 2, 3)
    assert m.shape == (4, N_FEATURES) and m[-1, 11] == 1.0 and m[:3, 11].sum() == 0.0
    swapped = candidate_matrix([views[2], views[0], views[1]], 1000, {"c": 512}, 2, 3)
    assert np.array_equal(m, swapped)  # rows follow the names, not the order given
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(N_FEATURES, 8)), rng.normal(size=(8, 1)))
    net = QNet(w, (np.zeros(8), np.zeros(1)), 3, shared=True)
    pol = IntelligentRouter(net)
    scores = pol.action_scores(views, 1000, {"c": 512})
    assert scores.shape == (4,) and pol.last_state is not None and pol.last_state.shape == (4, N_FEATURES)
    # the same weights serve another cluster size
    assert IntelligentRouter(net).choose([*views, v("d")], 1000, {}).instance in {"a", "b", "c", "d"}
