"""The emulated engine's pure core on a virtual clock: radix cache, scheduler, step-time model."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.engine.core import EngineConfig, EngineCore, Request, RequestRejected, Step, TokenOutput
from agents.engine.profiles import PROFILES, get_profile
from agents.engine.radix_cache import CacheBusyError, RadixCache
from kvindex.hashing import block_hashes
from kvindex.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

PROFILE = get_profile("h100-llama3.1-8b")


def make_core(**kw: object) -> EngineCore:
    return EngineCore(EngineConfig(**kw), PROFILE)  # type: ignore[arg-type]


def prompt(n: int, seed: int = 0) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(256) for _ in range(n))


def run(
    core: EngineCore, now: float = 0.0, max_steps: int = 100_000
) -> tuple[list[Step], dict[str, list[TokenOutput]], float]:
    """Drive ``core`` until idle; returns the steps, the outputs per rid and the final clock."""
    steps: list[Step] = []
    outs: dict[str, list[TokenOutput]] = {}
    for _ in range(max_steps):
        step = core.schedule(now)
        if step is None:
            return steps, outs, now
        now += step.duration
        steps.append(step)
        for o in core.complete(step, now):
            outs.setdefault(o.rid, []).append(o)
    raise AssertionError("core did not go idle")


def replay(events: list[KVEvent], into: set[int]) -> None:
    for ev in events:
        if isinstance(ev, BlockStored):
            assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size
            into.update(ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            assert set(ev.block_hashes) <= into
            into.difference_update(ev.block_hashes)
        else:
            assert isinstance(ev, AllBlocksCleared)
            into.clear()


# ------------------------------------------------------------------------------------------ radix cache


def test_cache_hashes_are_sglang_chained_hashes() -> None:
    c = RadixCache(1024, page_size=4)
    toks = list(range(1, 11))  # 2 full pages + 2 tokens
    assert c.insert(toks, now=1.0) == 8
    (ev,) = c.drain_events()
    assert isinstance(ev, BlockStored)
    assert list(ev.block_hashes) == block_hashes(toks[:8], 4)
    assert ev.parent_block_hash is None and ev.token_ids == tuple(toks[:8]) and ev.block_size == 4
    # Extending the prefix: one event for the new pages, chained on the last old page.
    assert c.insert([*toks[:8], 7, 7, 7, 7, 8, 8, 8, 8], now=2.0) == 8
    (ev2,) = c.drain_events()
    assert isinstance(ev2, BlockStored)
    assert ev2.parent_block_hash == ev.block_hashes[-1]
    assert list(ev2.block_hashes) == block_hashes([*toks[:8], 7, 7, 7, 7, 8, 8, 8, 8], 4)[2:]
    assert c.match_prefix(toks, now=3.0).cached_tokens == 8
    assert c.match_prefix([1, 2, 3, 4, 9], now=3.0).cached_tokens == 4  # splits the node: page aligned
    assert c.block_hashes() == set(ev.block_hashes) | set(ev2.block_hashes)
    assert c.cached_tokens == 16 and c.drain_events() == []


def test_lru_evicts_least_recently_used_unlocked_leaf_first() -> None:
    c = RadixCache(96, page_size=16)
    a, b, d = prompt(32, 1), prompt(32, 2), prompt(32, 3)
    c.insert(a, now=1.0)
    c.insert(b, now=2.0)
    c.insert(d, now=3.0)
    c.match_prefix(a, now=4.0)  # a is now the most recently used
    c.drain_events()
    assert c.evict(16) == 32  # whole leaf: b (LRU)
    (ev,) = c.drain_events()
    assert isinstance(ev, BlockRemoved) and set(ev.block_hashes) == set(block_hashes(b, 16))
    # Lock d (older than a): eviction must skip it and take a.
    node = c.match_prefix(d, now=5.0).node
    c.match_prefix(a, now=6.0)
    c.lock(node)
    assert c.evictable_tokens == 32 and c.protected_tokens == 32
    assert c.evict(1000) == 32
    assert c.block_hashes() == set(block_hashes(d, 16))
    assert c.evict(1000) == 0  # only locked pages left
    with pytest.raises(CacheBusyError):
        c.flush()
    c.unlock(node)
    c.flush()
    assert c.cached_tokens == 0 and isinstance(c.drain_events()[-1], AllBlocksCleared)


def test_lock_survives_split_and_protects_ancestors() -> None:
    c = RadixCache(1000, page_size=4)
    node = c.match_prefix(c.insert_prefix(list(range(16)), now=1.0)[1].key, now=1.0).node
    c.lock(node)
    c.insert(list(range(8)) + [99] * 8, now=2.0)  # splits the locked node after 2 pages
    assert c.protected_tokens == 16 and c.evictable_tokens == 8
    assert c.evict(1000) == 8
    c.unlock(node)
    assert c.evictable_tokens == 16 and c.evict(1000) == 16 and c.cached_tokens == 0


def test_allocate_evicts_and_refuses_beyond_capacity() -> None:
    c = RadixCache(64, page_size=16)
    c.insert(prompt(48), now=1.0)
    assert c.free == 16 and c.available == 64
    assert c.allocate(32)  # evicts the cached leaf
    assert c.cached_tokens == 0 and c.private_tokens == 32
    assert not c.allocate(33)
    c.release(32)
    assert c.free == 64


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 80)), min_size=1, max_size=60))
def test_cache_events_replay_to_current_pages(ops: list[tuple[int, int, int]]) -> None:
    c = RadixCache(400, page_size=8)
    mirror: set[int] = set()
    locked = []
    for t, (op, family, n) in enumerate(ops):
        toks = prompt(8, family) + prompt(n, family * 100 + n % 3)
        if op == 0 and c.free >= len(toks):
            c.insert(toks, now=float(t))
        elif op == 1:
            m = c.match_prefix(toks, now=float(t))
            c.lock(m.node)
            locked.append(m.node)
        elif op == 2 and locked:
            c.unlock(locked.pop(0))
        else:
            c.evict(n)
        replay(c.drain_events(), mirror)
        assert mirror == c.block_hashes()
        assert 0 <= c.evictable_tokens <= c.cached_tokens <= c.capacity


# ------------------------------------------------------------------------------------------ step model


def test_step_time_calibration_and_monotonicity() -> None:
    p = PROFILES["h100-llama3.1-8b"]
    assert p.model.kv_bytes_per_token == 131072
    assert 0.006 <= p.step_time([(1, 100)]) <= 0.007  # ~150 tok/s single stream
    assert 20_000 <= 8192 / p.step_time([(8192, 0)]) <= 30_000
    assert 300_000 < p.kv_capacity_tokens() < 500_000
    # decode grows with batch size and with the KV read
    assert p.step_time([(1, 1000)] * 64) > p.step_time([(1, 1000)] * 8) > p.step_time([(1, 1000)])
    assert p.step_time([(1, 50_000)] * 8) > p.step_time([(1, 1000)] * 8)
    # prefill grows with new tokens, and with the context attended to
    assert p.step_time([(4096, 0)]) > p.step_time([(1024, 0)]) > p.step_time([(128, 0)])
    assert p.step_time([(4096, 60_000)]) > p.step_time([(4096, 0)])
    with pytest.raises(ValueError, match="known"):
        get_profile("nope")


# ------------------------------------------------------------------------------------------- scheduler


def test_prefix_hit_skips_prefill() -> None:
    core = make_core()
    p = prompt(1000)
    core.add_request(Request("a", p, 4, ignore_eos=True), 0.0)
    steps_a, outs_a, now = run(core)
    core.add_request(Request("b", p, 4, ignore_eos=True), now)
    steps_b, outs_b, _ = run(core, now)
    assert outs_a["a"][-1].cached_tokens == 0
    assert outs_b["b"][-1].cached_tokens == 992  # 999 tokens matchable (last one recomputed), page aligned
    assert steps_b[0].prefill_tokens == 8 < steps_a[0].prefill_tokens == 1000
    assert steps_b[0].duration < steps_a[0].duration
    assert core.cache_hit_rate == pytest.approx(992 / 2000)


def test_outputs_are_deterministic_ascii_and_lengths_follow_eos_rules() -> None:
    core = make_core()
    core.add_request(Request("x", prompt(40), 50, ignore_eos=True), 0.0)
    core.add_request(Request("y", prompt(40, 9), 50), 0.0)
    core.add_request(Request("z", prompt(40, 8), 0), 0.0)
    _, outs, _ = run(core)
    x = [t for o in outs["x"] for t in o.token_ids]
    assert len(x) == 50 and all(32 <= t <= 126 for t in x)
    assert outs["x"][0].first_token and outs["x"][-1].finish_reason == "length"
    y = outs["y"][-1]
    assert 1 <= y.completion_tokens <= 50 and y.finish_reason == (
        "stop" if y.completion_tokens < 50 else "length"
    )
    assert outs["z"] == [TokenOutput("z", (), 40, 0, 0, True, "length")]
    core2 = make_core()
    core2.add_request(Request("x", prompt(40), 50, ignore_eos=True), 0.0)
    assert [t for o in run(core2)[1]["x"] for t in o.token_ids] == x


def test_running_cap_queues_requests() -> None:
    core = make_core(max_running_requests=2)
    for i in range(4):
        core.add_request(Request(f"r{i}", prompt(100, i), 5, ignore_eos=True), 0.0)
    step = core.schedule(0.0)
    assert step is not None and [e.rid for e in step.entries] == ["r0", "r1"]
    stat = core.load_stat()
    assert (stat.num_running_reqs, stat.num_waiting_reqs, stat.max_running_requests) == (2, 2, 2)
    assert stat.num_waiting_uncached_tokens == 400  # 2 waiting + 2 admitted, none prefilled yet
    core.complete(step, step.duration)
    _, outs, _ = run(core, step.duration)
    assert set(outs) == {"r0", "r1", "r2", "r3"}


def test_chunked_prefill_splits_long_prompt() -> None:
    core = make_core(chunked_prefill_size=256)
    core.add_request(Request("long", prompt(1000), 2, ignore_eos=True), 0.0)
    steps, outs, _ = run(core)
    assert [s.prefill_tokens for s in steps if s.kind == "prefill"] == [256, 256, 256, 232]
    assert [e.context_tokens for s in steps[:4] for e in s.entries] == [0, 256, 512, 768]
    assert outs["long"][-1].completion_tokens == 2


@pytest.mark.parametrize("mixed", [False, True])
def test_mixed_chunk_interleaves_decode_with_prefill(mixed: bool) -> None:
    core = make_core(chunked_prefill_size=256, mixed_chunk=mixed)
    core.add_request(Request("short", prompt(32), 20, ignore_eos=True), 0.0)
    now = 0.0
    for _ in range(2):  # prefill "short", then one decode step
        step = core.schedule(now)
        assert step is not None
        now += step.duration
        core.complete(step, now)
    core.add_request(Request("long", prompt(1000, 1), 2, ignore_eos=True), now)
    kinds: list[str] = []
    short_tokens_during_prefill = 0
    while (step := core.schedule(now)) is not None:
        now += step.duration
        outs = core.complete(step, now)
        kinds.append(step.kind)
        assert sum(e.new_tokens for e in step.entries) <= 256  # decodes take from the chunk budget
        if step.kind != "decode":
            short_tokens_during_prefill += sum(len(o.token_ids) for o in outs if o.rid == "short")
    n_prefill = sum(k != "decode" for k in kinds)
    assert n_prefill >= 4
    if mixed:
        assert kinds[:n_prefill] == ["mixed"] * n_prefill and short_tokens_during_prefill == n_prefill
    else:
        assert kinds[:n_prefill] == ["prefill"] * n_prefill and short_tokens_during_prefill == 0


def test_retraction_under_kv_pressure_still_finishes_everything() -> None:
    core = make_core(max_total_tokens=512, chunked_prefill_size=512)
    for i in range(6):
        core.add_request(Request(f"r{i}", prompt(64, i), 120, ignore_eos=True), 0.0)
    _, outs, _ = run(core)
    assert core.num_retractions > 0
    for i in range(6):
        toks = [t for o in outs[f"r{i}"] for t in o.token_ids]
        assert len(toks) == 120 and outs[f"r{i}"][-1].finish_reason == "length"
        assert sum(o.first_token for o in outs[f"r{i}"]) == 1
    assert core.cache.private_tokens == 0 and core.cache.protected_tokens == 0


def test_pages_of_running_requests_are_never_evicted() -> None:
    core = make_core(max_total_tokens=2048, chunked_prefill_size=4096)
    long_p = prompt(512, 99)
    core.add_request(Request("keep", long_p, 1000, ignore_eos=True), 0.0)
    now = 0.0
    for i in range(200):
        if i % 5 == 0:
            core.add_request(Request(f"o{i}", prompt(300, i), 3, ignore_eos=True), now)
        step = core.schedule(now)
        assert step is not None
        now += step.duration
        core.complete(step, now)
        assert set(block_hashes(long_p, 16)) <= core.cache.block_hashes()
    assert any(isinstance(e, BlockRemoved) for e in core.drain_events())  # others were evicted


def test_rejections() -> None:
    core = make_core(max_total_tokens=1000, context_length=2048)
    with pytest.raises(RequestRejected, match="KV cache capacity"):
        core.add_request(Request("a", prompt(1000), 1), 0.0)
    with pytest.raises(RequestRejected, match="context length"):
        core.add_request(Request("b", prompt(2048), 1), 0.0)
    with pytest.raises(RequestRejected, match="maximum context length"):
        core.add_request(Request("c", prompt(500), 1549), 0.0)
    core.add_request(Request("c2", prompt(500), 1548), 0.0)  # == context length: SGLang accepts it
    with pytest.raises(RequestRejected, match="empty"):
        core.add_request(Request("d", (), 1), 0.0)
    core.add_request(Request("e", prompt(900), 500, ignore_eos=True), 0.0)  # max_new clamped to fit
    with pytest.raises(RequestRejected, match="in flight"):
        core.add_request(Request("e", prompt(10), 1), 0.0)
    _, outs, _ = run(core)
    assert outs["e"][-1].completion_tokens == 100


def test_abort_frees_pages_even_with_a_step_in_flight() -> None:
    core = make_core(chunked_prefill_size=64)
    core.add_request(Request("a", prompt(200), 10, ignore_eos=True), 0.0)
    core.add_request(Request("w", prompt(200, 1), 10, ignore_eos=True), 0.0)
    step = core.schedule(0.0)
    assert step is not None and core.cache.private_tokens == 64
    assert core.abort("a") and core.abort("w") and not core.abort("a")
    assert core.complete(step, 1.0) == []
    assert core.cache.private_tokens == 0 and core.cache.protected_tokens == 0
    assert core.schedule(1.0) is None and core.flush_cache()


def test_load_stat_is_consistent_and_events_mirror_cache() -> None:
    rng = random.Random(7)
    core = make_core(max_total_tokens=4096, chunked_prefill_size=512, max_running_requests=8)
    families = [prompt(rng.randrange(16, 600), f) for f in range(5)]
    mirror: set[int] = set()
    now, busy_before, prefill_before = 0.0, 0, 0
    for i in range(300):
        if rng.random() < 0.3:
            base = families[rng.randrange(5)]
            tail = prompt(rng.randrange(0, 200), 1000 + i)
            core.add_request(Request(f"r{i}", base + tail, rng.randrange(0, 40), rng.random() < 0.5), now)
        if rng.random() < 0.02 and core.num_running:
            core.abort(f"r{rng.randrange(i + 1)}")
        step = core.schedule(now)
        if step is not None:
            now += step.duration
            core.complete(step, now)
        replay(core.drain_events(), mirror)
        assert mirror == core.cache.block_hashes()
        s = core.load_stat()
        assert 0 <= s.num_tokens <= s.num_total_tokens <= s.max_total_num_tokens == 4096
        assert s.num_running_reqs <= 8 and s.num_waiting_reqs == core.num_waiting
        assert s.total_prefill_busy_us >= busy_before and s.total_prefill_uncached_tokens >= prefill_before
        busy_before, prefill_before = s.total_prefill_busy_us, s.total_prefill_uncached_tokens
    run(core, now)
    replay(core.drain_events(), mirror)
    assert mirror == core.cache.block_hashes()
    s = core.load_stat()
    assert (s.num_running_reqs, s.num_waiting_reqs, s.num_tokens, s.num_waiting_uncached_tokens) == (
        0,
        0,
        0,
        0,
    )
    assert core.flush_cache()
    replay(core.drain_events(), mirror)
    assert mirror == set()
