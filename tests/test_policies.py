"""Routing policies on hand-built views: pure, no sockets, no clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.model.lmetric import (
    ALL_AT_MAX_RUNNING,
    AT_MAX_RUNNING,
    FULLY_CACHED,
    LMetric,
    RoundRobin,
    lmetric_score,
)
from router.model.policies import POLICIES, InstanceView, make_policy


def view(name: str, bs: int = 0, queued: int = 0, running: int = 0, max_running: int = 0) -> InstanceView:
    return InstanceView(
        name=name,
        batch_size=bs,
        queued_prefill_tokens=queued,
        running=running,
        max_running_requests=max_running,
    )


def test_lmetric_picks_argmin_of_product() -> None:
    views = [view("a", bs=2, queued=100), view("b", bs=5, queued=0)]
    # a: (100 + 1000) * 3 = 3300; b: (0 + 1000) * 6 = 6000
    d = LMetric().choose(views, 1000, {})
    assert (d.instance, d.score, d.new_tokens, d.cached_tokens) == ("a", 3300.0, 1000, 0)
    assert d.reason == "score"
    assert d.policy == "lmetric"
    # b holds 900 tokens of the prompt: (0 + 100) * 6 = 600 < 3300
    d = LMetric().choose(views, 1000, {"b": 900})
    assert (d.instance, d.score, d.new_tokens, d.cached_tokens) == ("b", 600.0, 100, 900)
    assert d.failure_cases == ()


def test_lmetric_ties_break_on_batch_size_then_new_tokens() -> None:
    # a: (0 + 100) * (1 + 1) = 200; b: (0 + 50) * (3 + 1) = 200 -> lower batch size wins
    views = [view("b", bs=3), view("a", bs=1)]
    d = LMetric().choose(views, 100, {"b": 50})
    assert (d.instance, d.reason) == ("a", "batch_size")
    # same score, same bs: a (50 queued + 50 new) vs b (0 queued + 100 new) -> fewer new tokens wins
    views = [view("a", bs=1, queued=50), view("b", bs=1, queued=0)]
    d = LMetric().choose(views, 100, {"a": 50})
    assert (d.instance, d.reason, d.new_tokens) == ("a", "new_tokens", 50)


def test_lmetric_full_tie_rotates_whatever_the_input_order() -> None:
    policy = LMetric()
    names = ["c", "a", "b"]
    chosen = []
    rng = random.Random(7)
    for _ in range(6):
        rng.shuffle(names)
        d = policy.choose([view(n, bs=2, queued=10) for n in names], 64, {})
        assert d.reason == "rotation"
        chosen.append(d.instance)
    assert chosen == ["a", "b", "c", "a", "b", "c"]


def test_lmetric_skips_instance_at_max_running() -> None:
    # a holds the whole prompt (product 0) but runs at its cap: skipped, flagged.
    views = [view("a", bs=8, running=8, max_running=8), view("b", bs=3, running=3, max_running=8)]
    d = LMetric().choose(views, 100, {"a": 100})
    assert d.instance == "b"
    assert AT_MAX_RUNNING in d.failure_cases
    assert d.skipped == ("a",)


def test_lmetric_skip_not_flagged_when_it_did_not_matter() -> None:
    views = [view("a", bs=8, queued=10_000, running=8, max_running=8), view("b")]
    d = LMetric().choose(views, 100, {})
    assert d.instance == "b"
    assert d.failure_cases == ()
    assert d.skipped == ("a",)


def test_lmetric_unknown_cap_never_skips() -> None:
    d = LMetric().choose([view("a", running=500), view("b", bs=1)], 100, {"a": 100})
    assert d.instance == "a"
    assert d.skipped == ()


def test_lmetric_all_at_max_running_falls_back_to_plain_argmin() -> None:
    views = [view("a", bs=4, running=4, max_running=4), view("b", bs=4, running=4, max_running=4)]
    d = LMetric().choose(views, 100, {"b": 60})
    assert d.instance == "b"
    assert ALL_AT_MAX_RUNNING in d.failure_cases
    assert AT_MAX_RUNNING not in d.failure_cases


def test_lmetric_flags_fully_cached() -> None:
    views = [view("a", bs=30), view("b", bs=0)]
    d = LMetric().choose(views, 64, {"a": 64})
    # a: (0 + 0) * 31 = 0 beats an idle b: the product ignores a's 30 requests.
    assert (d.instance, d.score, d.new_tokens) == ("a", 0.0, 0)
    assert FULLY_CACHED in d.failure_cases


def test_lmetric_cached_beyond_prompt_clamps_to_zero_new_tokens() -> None:
    d = LMetric().choose([view("a")], 10, {"a": 16})
    assert (d.new_tokens, d.cached_tokens, d.reason) == (0, 10, "only")


def test_round_robin_rotates_in_name_order() -> None:
    policy = RoundRobin()
    views = [view("b", bs=100), view("a"), view("c")]
    got = [policy.choose(views, 10, {"c": 8}).instance for _ in range(6)]
    assert got == ["a", "b", "c", "a", "b", "c"]
    d = policy.choose(views, 10, {"b": 8})
    assert (d.instance, d.new_tokens, d.cached_tokens) == ("a", 10, 0)


def test_registry_and_errors() -> None:
    assert set(POLICIES) >= {"lmetric", "round_robin"}
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")
    for name in POLICIES:
        with pytest.raises(ValueError):
            make_policy(name).choose([], 10, {})


_views = st.lists(
    st.builds(
        InstanceView,
        name=st.text("abcdefgh", min_size=1, max_size=3),
        batch_size=st.integers(0, 50),
        queued_prefill_tokens=st.integers(0, 5000),
        running=st.integers(0, 20),
        max_running_requests=st.integers(0, 20),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda v: v.name,
)


@given(_views, st.integers(0, 4000), st.data())
def test_lmetric_choice_is_minimal_among_candidates(
    views: list[InstanceView], prompt: int, data: st.DataObject
) -> None:
    cached = {v.name: data.draw(st.integers(0, prompt)) for v in views}
    d = LMetric().choose(views, prompt, cached)
    candidates = [v for v in views if not v.at_max_running] or views
    by_name = {v.name: v for v in views}
    assert by_name[d.instance] in candidates
    assert d.score == lmetric_score(by_name[d.instance], d.new_tokens)
    assert d.new_tokens + d.cached_tokens == prompt

    def prefill(v: InstanceView) -> int:
        return v.queued_prefill_tokens + prompt - cached[v.name]

    def fresh(v: InstanceView) -> bool:
        return v.queued_prefill_tokens > 0 or v.unreported > 0

    if d.reason != "fresh_guard":  # the product's minimum
        assert d.score == min(lmetric_score(v, prompt - cached[v.name]) for v in candidates)
        return
    # stalls_fresh: the least product among the candidates with less prefill work than the product's
    # choice and no fresh request (which the product's choice holds)
    assert "stalls_fresh" in d.failure_cases and not fresh(by_name[d.instance])
    low = min(lmetric_score(v, prompt - cached[v.name]) for v in candidates)
    tied = [v for v in candidates if lmetric_score(v, prompt - cached[v.name]) == low]  # one was the pick

    def guarded(pick: InstanceView) -> float | None:
        calm = [v for v in candidates if prefill(v) < prefill(pick) and not fresh(v)]
        if not fresh(pick) or not calm:
            return None
        return min(lmetric_score(v, prompt - cached[v.name]) for v in calm)

    assert d.score in {guarded(v) for v in tied}
    assert prefill(by_name[d.instance]) < max(prefill(v) for v in tied)


# ------------------------------------------------------------------------------- baselines, linear


def lv(name: str, **kw: int) -> InstanceView:
    return InstanceView(name=name, **kw)


def test_vllm_v1_is_argmin_of_4_waiting_plus_running() -> None:
    # a: 4*2 + 1 = 9; b: 4*0 + 8 = 8; c: 4*1 + 6 = 10
    views = [
        lv("a", running=1, waiting=2, batch_size=3),
        lv("b", running=8, batch_size=8),
        lv("c", running=6, waiting=1, batch_size=7),
    ]
    d = make_policy("vllm_v1").choose(views, 100, {"a": 100})
    assert (d.instance, d.score, d.reason, d.policy) == ("b", 8.0, "score", "vllm_v1")
    # the router's unreported dispatches count as waiting: b has 1 -> 4*1 + 8 = 12 > 9
    views[1] = lv("b", running=8, batch_size=9)
    assert make_policy("vllm_v1").choose(views, 100, {}).instance == "a"


def test_vllm_v1_tie_goes_to_the_first_in_name_order() -> None:
    views = [
        lv("c", running=4, batch_size=4),
        lv("b", waiting=1, batch_size=1),
        lv("a", running=4, batch_size=4),
    ]
    d = make_policy("vllm_v1").choose(views, 10, {})
    assert (d.instance, d.reason) == ("a", "first")
    assert [make_policy("vllm_v1").choose(views, 10, {}).instance for _ in range(3)] == ["a"] * 3


def test_bailian_weights_follow_the_formula() -> None:
    from router.model.baselines import bailian_weights

    views = [
        lv("a", batch_size=4, kv_used_tokens=1000, queued_prefill_tokens=1000),
        lv("b", batch_size=2, kv_used_tokens=500),
        lv("c", batch_size=0),
    ]
    w = bailian_weights(views, 100, {"a": 50, "b": 100})
    # a: hit 0.5, bs term 1 - 4/4 = 0, tokens term 1 - 2000/2000 = 0
    # b: hit 1.0, 1 - 2/4 = 0.5, 1 - 500/2000 = 0.75; c: 0, 1, 1
    assert w == pytest.approx([0.5 / 3, 2.25 / 3, 2.0 / 3])
    # no load anywhere: both load terms are 1
    assert bailian_weights([lv("x"), lv("y")], 10, {"x": 10}) == pytest.approx([1.0, 2 / 3])


def test_bailian_samples_proportionally_to_its_weights_and_is_seeded() -> None:
    from router.model.baselines import Bailian, bailian_weights

    views = [lv("a", batch_size=4, kv_used_tokens=2000), lv("b", batch_size=2, kv_used_tokens=500), lv("c")]
    cached = {"a": 100}
    w = bailian_weights(views, 100, cached)
    p = Bailian(seed=3)
    got = [p.choose(views, 100, cached).instance for _ in range(6000)]
    for name, weight in zip("abc", w, strict=True):
        assert got.count(name) / len(got) == pytest.approx(weight / sum(w), abs=0.025)
    again = Bailian(seed=3)
    assert [again.choose(views, 100, cached).instance for _ in range(50)] == got[:50]
    # the exact draw: r = random() * total, first instance whose cumulative weight exceeds r
    r = random.Random(9).random() * sum(w)
    expect = next(n for n, c in zip("abc", [w[0], w[0] + w[1], sum(w)], strict=True) if r < c)
    assert Bailian(seed=9).choose(views, 100, cached).instance == expect


def test_bailian_zero_weights_fall_back_to_uniform() -> None:
    # equal non-zero loads, no hit: every term is 0
    views = [lv(n, batch_size=3, kv_used_tokens=10) for n in "ab"]
    p = make_policy("bailian", seed=1)
    got = {p.choose(views, 10, {}).instance for _ in range(40)}
    assert got == {"a", "b"}
    assert p.choose(views, 10, {}).reason == "random"


def test_dynamo_logit_and_argmin() -> None:
    from router.model.baselines import dynamo_logit

    a = lv("a", block_size=16, queued_prefill_tokens=160, kv_used_tokens=320)
    # prefill blocks (160 + 100 - 64) / 16 = 12.25; active ceil(480 / 16) = 30; request blocks ceil(100/16)
    # = 7, overlap 64 // 16 = 4 -> decode 30 + 3 = 33
    assert dynamo_logit(a, 100, 64) == pytest.approx(12.25 + 33)
    assert dynamo_logit(a, 100, 64, overlap_weight=2.0) == pytest.approx(24.5 + 33)
    b = lv("b", block_size=16, kv_used_tokens=1600)  # 100/16 + ceil(1600/16) + 7 = 113.25
    c = lv("c", block_size=16, queued_prefill_tokens=800)  # (900)/16 + 50 + 7 = 113.25
    d = make_policy("dynamo", seed=0).choose([b, a, c], 100, {"a": 64})
    assert (d.instance, d.reason, d.score) == ("a", "score", pytest.approx(45.25))


def test_dynamo_ties_are_drawn_among_the_tied_only() -> None:
    views = [
        lv("a", block_size=16, kv_used_tokens=1600),
        lv("b", block_size=16, queued_prefill_tokens=800),
        lv("c", block_size=16, kv_used_tokens=99_999),
    ]
    p = make_policy("dynamo", seed=5)
    got = [p.choose(views, 100, {}) for _ in range(60)]
    assert {d.instance for d in got} == {"a", "b"} and all(d.reason == "random" for d in got)


def test_sglang_cache_aware_imbalance_rule_and_its_boundaries() -> None:
    p = make_policy("sglang_cache_aware")
    # 100 - 30 = 70 > 64 and 100 > 45: imbalanced -> least load, even against a full cache hit
    views = [lv("a", inflight=100), lv("b", inflight=30), lv("c", inflight=40)]
    d = p.choose(views, 100, {"a": 100})
    assert (d.instance, d.reason) == ("b", "imbalanced")
    # difference exactly 64: balanced -> cache
    views = [lv("a", inflight=94), lv("b", inflight=30)]
    assert p.choose(views, 100, {"a": 100}).reason == "cache_match"
    # difference 70 but max == 1.5 * min (210 vs 140): balanced
    views = [lv("a", inflight=210), lv("b", inflight=140)]
    assert p.choose(views, 100, {"a": 100}).instance == "a"
    # imbalanced tie between two least loaded: the first in name order
    views = [lv("c", inflight=0), lv("b", inflight=0), lv("a", inflight=100)]
    assert p.choose(views, 10, {}).instance == "b"


def test_sglang_cache_aware_match_threshold_and_smallest_tree() -> None:
    p = make_policy("sglang_cache_aware")
    views = [lv("a", routed_tokens=500), lv("b", routed_tokens=100), lv("c", routed_tokens=100)]
    # longest match 31 of 100 > 0.3: the holder
    d = p.choose(views, 100, {"a": 31, "c": 16})
    assert (d.instance, d.reason, d.cached_tokens) == ("a", "cache_match", 31)
    # exactly 0.3 is not above the threshold: smallest tree, tie b/c -> b
    d = p.choose(views, 100, {"a": 30})
    assert (d.instance, d.reason, d.score) == ("b", "smallest_tree", 100.0)
    # two holders of the longest match: the first in name order
    assert p.choose(views, 100, {"c": 64, "b": 64}).instance == "b"
    assert p.choose(views, 0, {}).reason == "smallest_tree"  # empty prompt: match rate 0


def test_random_and_power_of_two_are_seeded() -> None:
    views = [lv("a", batch_size=9), lv("b", batch_size=1), lv("c", batch_size=5)]
    r1, r2 = make_policy("random", seed=4), make_policy("random", seed=4)
    a = [r1.choose(views, 10, {}).instance for _ in range(300)]
    assert a == [r2.choose(views, 10, {}).instance for _ in range(300)]
    assert {x: a.count(x) > 60 for x in "abc"} == {"a": True, "b": True, "c": True}
    p = make_policy("power_of_two", seed=8)
    rng = random.Random(8)
    ordered = sorted(views, key=lambda v: v.name)
    for _ in range(50):
        i, j = rng.sample(range(3), 2)
        expect = ordered[i] if ordered[i].batch_size <= ordered[j].batch_size else ordered[j]
        d = p.choose(views, 10, {})
        assert (d.instance, d.reason) == (expect.name, "two_choices")
        assert d.instance != "a"  # the most loaded never wins a pair
    assert make_policy("power_of_two", seed=1).choose([lv("z")], 1, {}).reason == "only"


def test_power_of_two_tie_keeps_the_first_drawn() -> None:
    views = [lv("a", batch_size=2), lv("b", batch_size=2)]
    rng = random.Random(2)
    p = make_policy("power_of_two", seed=2)
    for _ in range(20):
        i, _j = rng.sample(range(2), 2)
        assert p.choose(views, 1, {}).instance == "ab"[i]


def test_linear_is_a_times_prefill_plus_b_times_batch() -> None:
    from router.model.lmetric import Linear

    views = [
        lv("a", batch_size=10, queued_prefill_tokens=0),
        lv("b", batch_size=1, queued_prefill_tokens=500),
    ]
    # b = 0: least prefill work (a: 0 + 100 = 100; b: 500 + 1000 = 1500)
    assert make_policy("linear", params={"a": 1, "b": 0}).choose(views, 1000, {"a": 900}).instance == "a"
    # b = 200: a = 100 + 2000 = 2100 > b = 1500 + 200 = 1700
    d = make_policy("linear", params={"b": 200}).choose(views, 1000, {"a": 900})
    assert (d.instance, d.score, d.policy) == ("b", 1700.0, "linear")
    # a = 0: least batch size
    assert make_policy("linear", params={"a": 0, "b": 1}).choose(views, 1000, {"a": 1000}).instance == "b"
    # ties as LMetric: batch size, then new tokens, then rotation
    tie = [lv("a", batch_size=2, queued_prefill_tokens=0), lv("b", batch_size=1, queued_prefill_tokens=10)]
    assert Linear(1, 10).choose(tie, 10, {}).reason == "batch_size"
    same = [lv("a", batch_size=1), lv("b", batch_size=1)]
    lin = Linear(1, 1)
    assert [lin.choose(same, 5, {}).instance for _ in range(4)] == ["a", "b", "a", "b"]
    for a, b in ((0, 0), (-1, 1), (1, -1)):
        with pytest.raises(ValueError):
            Linear(a, b)


# ------------------------------------------------------------------------ LMetric's failure cases


def test_at_max_running_counts_unreported_dispatches() -> None:
    # a reports 6 running of 8 but the router sent it 2 more: 8 >= 8, it cannot start another now
    views = [view("a", bs=8, running=6, max_running=8), view("b", bs=5, queued=400, running=5, max_running=8)]
    d = LMetric().choose(views, 100, {"a": 100})
    assert d.instance == "b" and d.skipped == ("a",) and d.failure_cases == (AT_MAX_RUNNING,)
    assert views[0].at_max_running and not views[1].at_max_running
    # one below the cap: a's zero product wins, fully cached but a is not the least loaded
    views = [view("a", bs=7, running=6, max_running=8), view("b", bs=5, running=5, max_running=8)]
    d = LMetric().choose(views, 100, {"a": 100})
    assert (d.instance, d.failure_cases, d.skipped) == ("a", (FULLY_CACHED,), ())


def test_lmetric_plain_routes_into_the_cap_and_says_so() -> None:
    views = [view("a", bs=8, running=8, max_running=8), view("b", bs=3, running=3, max_running=8)]
    d = make_policy("lmetric_plain").choose(views, 100, {"a": 100})
    assert (d.instance, d.policy, d.skipped) == ("a", "lmetric_plain", ())
    assert set(d.failure_cases) == {AT_MAX_RUNNING, FULLY_CACHED}
    # the same state, mitigated
    d = make_policy("lmetric").choose(views, 100, {"a": 100})
    assert (d.instance, d.failure_cases) == ("b", (AT_MAX_RUNNING,))


def test_zero_product_flagged_only_when_it_overrides_a_load_difference() -> None:
    # zero product on the least loaded instance: both factors agree, nothing to flag
    d = LMetric().choose([view("a", bs=1), view("b", bs=4)], 64, {"a": 64, "b": 64})
    assert (d.instance, d.score, d.failure_cases) == ("a", 0.0, ())
    # fully cached but with queued prefill: the product is positive, no zero-product case
    d = LMetric().choose([view("a", bs=9, queued=10), view("b", bs=0, queued=100)], 64, {"a": 64})
    assert d.instance == "a" and d.score == 100.0 and d.failure_cases == ()
    # two zero products: the load factor decides (mitigation), no failure
    d = LMetric().choose([view("a", bs=9), view("b", bs=3), view("c")], 64, {"a": 64, "b": 64})
    assert (d.instance, d.reason, d.failure_cases) == ("b", "batch_size", (FULLY_CACHED,))
    d = LMetric().choose([view("a", bs=9), view("b", bs=3)], 64, {"a": 64, "b": 64})
    assert (d.instance, d.reason, d.failure_cases) == ("b", "batch_size", ())


def test_every_policy_on_random_states_returns_a_candidate() -> None:
    rng = random.Random(11)
    for name in POLICIES:
        p = make_policy(name, seed=1)
        for _ in range(200):
            views = [
                InstanceView(
                    name=f"i{k}",
                    batch_size=rng.randint(0, 40),
                    queued_prefill_tokens=rng.randint(0, 9000),
                    running=rng.randint(0, 20),
                    waiting=rng.randint(0, 5),
                    inflight=rng.randint(0, 120),
                    max_running_requests=rng.choice([0, 16]),
                    kv_used_tokens=rng.randint(0, 10**5),
                    block_size=16,
                    routed_tokens=rng.randint(0, 10**6),
                )
                for k in range(rng.randint(1, 6))
            ]
            prompt = rng.randint(0, 3000)
            cached = {v.name: rng.randint(0, prompt) // 16 * 16 for v in views}
            d = p.choose(views, prompt, cached)
            assert d.instance in {v.name for v in views} and d.policy == name
            assert d.new_tokens + d.cached_tokens == prompt and d.cached_tokens == cached[d.instance]


def test_batch_over_prefill_fires_when_the_product_buys_a_smaller_batch_with_prefill() -> None:
    from router.model.lmetric import BATCH_OVER_PREFILL

    # a: (2000 + 1000) * 1 = 3000 beats b: (0 + 500) * 9 = 4500, although b has less prefill work
    views = [view("a", bs=0, queued=2000), view("b", bs=8, queued=0)]
    d = LMetric().choose(views, 1000, {"b": 500})
    assert (d.instance, d.failure_cases) == ("a", (BATCH_OVER_PREFILL,))
    # the least prefill work also wins the product: nothing to flag
    d = LMetric().choose([view("a", bs=0), view("b", bs=8, queued=200)], 1000, {})
    assert (d.instance, d.failure_cases) == ("a", ())
    # equal prefill work, smaller batch: not a trade
    d = LMetric().choose([view("a", bs=1), view("b", bs=8)], 1000, {"a": 500, "b": 500})
    assert (d.instance, d.failure_cases) == ("a", ())
    # an instance skipped at its cap does not count as an alternative
    views = [view("a", bs=0, queued=2000), view("b", bs=8, running=8, max_running=8)]
    assert LMetric().choose(views, 1000, {"b": 500}).failure_cases == ()


def test_make_policy_checks_params_and_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--linear-b must be >= 0"):
        make_policy("linear", params={"b": -1})
    with pytest.raises(ValueError, match="--linear-a and --linear-b must not both be 0"):
        make_policy("linear", params={"a": 0, "b": 0})
    with pytest.raises(ValueError, match="no parameter c"):
        make_policy("linear", params={"c": 1})
    with pytest.raises(ValueError, match="no parameter"):
        make_policy("lmetric", params={"a": 1})


def test_policy_params_reach_every_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter declared only in a policy's PARAMS becomes a flag of ``python -m router``, ``launch
    simulate`` and ``launch cluster``, is carried by their configs and reaches ``make_policy``."""
    import argparse

    from launch.cluster import Cluster
    from launch.cluster_config import add_arguments as cluster_arguments
    from launch.cluster_config import config_from_args as cluster_config
    from launch.sim.run import add_arguments as sim_arguments
    from launch.sim.run import config_from_args as sim_config
    from launch.sim.run import config_json, seeded_policy
    from router.cli import parse_args
    from router.config import RouterConfig
    from router.model.lmetric import Linear
    from router.model.model import RoutingModel
    from router.model.policies import Param

    monkeypatch.setattr(Linear, "PARAMS", {**Linear.PARAMS, "c": Param(0.0, "a third weight")})
    want = (("linear", "b", 0.0), ("linear", "c", 5.0))
    # the router: flag -> RouterConfig -> ModelConfig -> RoutingModel's policy
    cfg = parse_args(["--policy", "linear", "--linear-c", "5", "--linear-b", "0"])
    assert cfg.policy_params == cfg.model.policy_params == want
    pol = RoutingModel(cfg.model, lambda job: None).policy
    assert isinstance(pol, Linear) and (pol.a, pol.b, vars(pol)["c"]) == (1.0, 0.0, 5.0)
    with pytest.raises(ValueError, match="--linear-c must be >= 0"):
        RouterConfig(policy_params=(("linear", "c", -1.0),))
    with pytest.raises(SystemExit):
        parse_args(["--linear-c", "-1"])
    # the simulator: flag -> SimConfig -> the simulated policy, and the summary's config
    p = argparse.ArgumentParser()
    sim_arguments(p)
    sim = sim_config(p.parse_args(["--policies", "linear", "--linear-c", "5", "--linear-b", "0"]))
    assert sim.policy_params == want
    assert vars(seeded_policy("linear", sim))["c"] == 5.0
    assert config_json(sim)["policy_params"] == [list(t) for t in want]
    # launch cluster: flag -> ClusterConfig -> the routers' command lines -> the router's config
    p = argparse.ArgumentParser()
    cluster_arguments(p)
    ccfg = cluster_config(p.parse_args(["--policy", "linear", "--linear-c", "5", "--linear-b", "0"]))
    cluster = Cluster(ccfg)
    cluster._agents = []
    router_cmd = cluster._router_args("primary")
    assert router_cmd[router_cmd.index("--linear-c") + 1] == "5.0"
    assert parse_args(router_cmd).policy_params == want
    # defaults are not passed on
    plain = Cluster(cluster_config(p.parse_args(["--policy", "linear"])))
    plain._agents = []
    assert not any(a.startswith("--linear") for a in plain._router_args("primary"))


def test_lmetric_does_not_queue_more_prefill_behind_fresh_requests() -> None:
    """``stalls_fresh``: the product picks ``a`` (smaller batch, but a fresh request's prefill queued
    there); ``b`` has less prefill work and only requests already decoding, so the mitigation takes it."""
    a = InstanceView(name="a", batch_size=1, running=1, queued_prefill_tokens=4000)
    b = InstanceView(name="b", batch_size=2, running=2, queued_prefill_tokens=0)
    plain = make_policy("lmetric_plain").choose([a, b], 60_000, {})
    assert plain.instance == "a"  # 64000 * 2 < 60000 * 3
    d = make_policy("lmetric").choose([a, b], 60_000, {})
    assert (d.instance, d.reason) == ("b", "fresh_guard") and "stalls_fresh" in d.failure_cases
    # no calmer alternative (b also fresh): the product decides
    b_fresh = InstanceView(name="b", batch_size=3, running=2, queued_prefill_tokens=0)
    assert make_policy("lmetric").choose([a, b_fresh], 60_000, {}).instance == "a"
