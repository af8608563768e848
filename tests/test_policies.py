"""Routing policies on hand-built views: pure, no sockets, no clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.policies import (
    ALL_AT_MAX_RUNNING,
    AT_MAX_RUNNING,
    FULLY_CACHED,
    POLICIES,
    InstanceView,
    LMetric,
    RoundRobin,
    lmetric_score,
    make_policy,
)


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
    best = min(lmetric_score(v, prompt - cached[v.name]) for v in candidates)
    assert d.score == best == lmetric_score(by_name[d.instance], d.new_tokens)
    assert d.new_tokens + d.cached_tokens == prompt
