"""GlobalIndex: unit tests for every method, and a property test against a brute-force model (pure)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex import index as index_module
from kvindex.blocklog import BlockLog
from kvindex.chains import prefix_chains
from kvindex.hashing import block_hashes
from kvindex.index import GlobalIndex, MatchResult
from kvindex.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

BS = 4


def stored(tokens: Sequence[int], start: int = 0, end: int | None = None, bs: int = BS) -> BlockStored:
    """A real BlockStored for pages ``start..end-1`` of ``tokens``, with chained hashes and parent."""
    hs = block_hashes(tokens, bs)
    end = len(hs) if end is None else end
    parent = hs[start - 1] if start > 0 else None
    return BlockStored(tuple(hs[start:end]), parent, tuple(tokens[start * bs : end * bs]), bs)


P1 = list(range(1, 17))  # 4 pages
P2 = [*range(1, 9), 90, 91, 92, 93, 94, 95, 96, 97]  # shares 2 pages with P1
H1 = block_hashes(P1, BS)
H2 = block_hashes(P2, BS)


def fresh(*names: str) -> GlobalIndex:
    idx = GlobalIndex(BS)
    for n in names:
        idx.add_instance(n)
    return idx


# ------------------------------------------------------------------------------------------ instances


def test_constructor_validates() -> None:
    assert GlobalIndex(16).block_size == 16
    assert GlobalIndex(16).ttl == 5.0
    with pytest.raises(ValueError):
        GlobalIndex(0)
    with pytest.raises(ValueError):
        GlobalIndex(4, ttl=0)
    with pytest.raises(ValueError):
        GlobalIndex(4, max_speculative_per_instance=-1)


def test_add_instance_is_idempotent_and_ids_are_reused() -> None:
    idx = fresh("a", "b", "c")
    idx.add_instance("a")
    assert idx.instances() == ("a", "b", "c")
    idx.apply("b", stored(P1))
    assert idx.remove_instance("b") == 4
    assert idx.remove_instance("b") == 0
    assert idx.instances() == ("a", "c")
    idx.add_instance("d")  # takes b's freed id
    assert idx.instances() == ("a", "d", "c")
    assert idx.blocks_of("d") == 0
    assert idx.match(P1).cached_tokens == {"a": 0, "c": 0, "d": 0}
    assert idx.total_blocks() == 0
    idx.check_invariants()


def test_unknown_names_read_as_empty_and_are_auto_added_on_apply() -> None:
    idx = fresh()
    assert idx.blocks_of("x") == 0
    assert not idx.has_block("x", H1[0])
    assert idx.dump("x") == []
    assert idx.instances() == ()
    idx.apply("x", stored(P1, 0, 2))
    assert idx.instances() == ("x",)
    assert idx.blocks_of("x") == 2
    assert idx.has_block("x", H1[0]) and idx.has_block("x", H1[1]) and not idx.has_block("x", H1[2])


# --------------------------------------------------------------------------------------------- events


def test_block_stored_shares_blocks_between_instances() -> None:
    idx = fresh()
    idx.apply("a", stored(P1))
    idx.apply("b", stored(P2))
    assert idx.total_blocks() == 4 + 2
    assert idx.blocks_of("a") == 4 and idx.blocks_of("b") == 4
    assert idx.stats.events_applied == 2
    assert idx.stats.unknown_parent == 0
    idx.check_invariants()


def test_block_size_mismatch_is_counted_and_skipped() -> None:
    idx = fresh()
    idx.apply("a", stored(P1, bs=8))
    assert idx.stats.block_size_mismatch == 1
    assert idx.blocks_of("a") == 0
    assert idx.stats.events_applied == 0
    assert idx.instances() == ("a",)


def test_unknown_parent_is_counted_but_applied() -> None:
    idx = fresh()
    idx.apply("a", stored(P1, 2, 4))
    assert idx.stats.unknown_parent == 1
    assert idx.has_block("a", H1[2]) and idx.has_block("a", H1[3])
    assert idx.match(P1).cached_tokens["a"] == 0  # the prefix is not there
    idx.apply("a", stored(P1, 0, 2))
    assert idx.stats.unknown_parent == 1
    assert idx.match(P1).cached_tokens["a"] == 16


def test_block_removed_and_unknown_removed() -> None:
    idx = fresh()
    idx.apply_batch("a", [stored(P1), BlockRemoved((H1[3], H1[2], 12345))])
    assert idx.blocks_of("a") == 2
    assert idx.stats.unknown_removed == 1
    assert idx.stats.events_applied == 2
    idx.apply("a", BlockRemoved((H1[3],)))
    assert idx.stats.unknown_removed == 2
    idx.check_invariants()


def test_all_blocks_cleared_only_touches_that_instance() -> None:
    idx = fresh()
    idx.apply("a", stored(P1))
    idx.apply("b", stored(P2))
    idx.apply("a", AllBlocksCleared())
    assert idx.blocks_of("a") == 0 and idx.blocks_of("b") == 4
    assert idx.total_blocks() == 4
    assert idx.instances() == ("a", "b")
    idx.check_invariants()


def test_non_event_objects_are_counted_not_raised() -> None:
    idx = fresh()
    bogus: Any = object()
    idx.apply("a", bogus)
    idx.replace_instance("a", [bogus, stored(P1)])
    assert idx.stats.unknown_event == 2
    assert idx.blocks_of("a") == 4


def test_apply_batch_equals_applies() -> None:
    evs: list[KVEvent] = [stored(P1), stored(P2, 2), BlockRemoved((H1[3],)), stored(P1, 3)]
    one, many = fresh(), fresh()
    for e in evs:
        one.apply("a", e)
    many.apply_batch("a", evs)
    assert one.dump("a") == many.dump("a")
    assert one.stats == many.stats


# -------------------------------------------------------------------------------------------- matching


def test_match_reports_every_instance() -> None:
    idx = fresh("idle")
    idx.apply("a", stored(P1))
    idx.apply("b", stored(P2))
    r = idx.match([*P1, 5, 5])  # a trailing partial page is ignored
    assert isinstance(r, MatchResult)
    assert r.cached_tokens == {"idle": 0, "a": 16, "b": 8}
    assert r.hashes == tuple(H1)
    assert r.prompt_tokens == 18
    assert r.block_size == BS
    assert idx.match(P2).cached_tokens == {"idle": 0, "a": 8, "b": 16}
    assert idx.match(P1[:7]).cached_tokens == {"idle": 0, "a": 4, "b": 4}
    assert idx.match([]).cached_tokens == {"idle": 0, "a": 0, "b": 0}
    assert idx.match([]).hashes == ()


def test_match_needs_consecutive_blocks_from_the_start() -> None:
    idx = fresh()
    idx.apply("a", stored(P1))
    idx.apply("a", BlockRemoved((H1[1],)))
    assert idx.match(P1).cached_tokens == {"a": 4}
    idx.apply("a", BlockRemoved((H1[0],)))
    assert idx.match(P1).cached_tokens == {"a": 0}


def test_match_hashes_and_longer_prompts() -> None:
    idx = fresh()
    idx.apply("a", stored(P1, 0, 2))
    r = idx.match_hashes(H1)
    assert r.cached_tokens == {"a": 8}
    assert r.prompt_tokens is None
    assert idx.match_hashes(H1, prompt_tokens=16).prompt_tokens == 16
    assert idx.match_hashes([]).cached_tokens == {"a": 0}


def test_match_many_instances_stops_at_right_depths() -> None:
    idx = fresh()
    for n in range(70):  # more than 64 instances: masks are plain ints
        idx.apply(f"i{n}", stored(P1, 0, n % 5))
    cached = idx.match(P1).cached_tokens
    assert cached == {f"i{n}": (n % 5) * BS for n in range(70)}


# ----------------------------------------------------------------------------------------- speculative


def test_speculative_insert_counts_in_match_and_skips_real() -> None:
    idx = fresh()
    idx.apply("a", stored(P1, 0, 1))
    assert idx.insert_speculative("a", H1, now=0.0) == 3
    assert idx.insert_speculative("a", H1, now=1.0) == 0  # refresh only
    assert idx.speculative_blocks("a") == 3
    assert idx.speculative_blocks() == 3
    assert idx.speculative_blocks("zz") == 0
    assert idx.blocks_of("a") == 1
    assert not idx.has_block("a", H1[1]) and idx.has_speculative("a", H1[1])
    assert idx.match(P1).cached_tokens == {"a": 16}
    assert idx.insert_speculative("b", H2[:2], now=1.0) == 2
    assert idx.match(P2).cached_tokens == {"a": 8, "b": 8}
    idx.check_invariants()


def test_speculative_is_confirmed_by_real_store() -> None:
    idx = fresh()
    idx.insert_speculative("a", H1, now=0.0)
    idx.apply("a", stored(P1, 0, 2))
    assert idx.stats.speculative_confirmed == 2
    assert idx.speculative_blocks("a") == 2
    assert idx.expire_speculative(100.0) == 2
    assert idx.stats.speculative_expired == 2
    assert idx.match(P1).cached_tokens == {"a": 8}  # the confirmed ones did not expire
    idx.check_invariants()


def test_speculative_expiry_uses_ttl_and_refresh() -> None:
    idx = GlobalIndex(BS, ttl=5.0)
    idx.insert_speculative("a", H1[:2], now=0.0)
    idx.insert_speculative("a", H1[2:], now=3.0)
    assert idx.expire_speculative(5.0) == 0  # not older than ttl yet
    assert idx.expire_speculative(5.5) == 2
    assert idx.match(P1).cached_tokens == {"a": 0}
    idx.insert_speculative("a", H1[2:], now=7.0)  # refresh
    assert idx.expire_speculative(9.0) == 0
    assert idx.expire_speculative(12.5) == 2
    assert idx.speculative_blocks() == 0
    assert idx.total_blocks() == 0
    idx.check_invariants()


def test_speculative_cap_evicts_oldest_first() -> None:
    idx = GlobalIndex(BS, max_speculative_per_instance=3)
    idx.insert_speculative("a", H1[:2], now=0.0)
    idx.insert_speculative("b", H1, now=0.0)  # other instance: its own cap
    assert idx.insert_speculative("a", H1[2:], now=1.0) == 2
    assert idx.stats.speculative_evicted == 1 + 1
    assert not idx.has_speculative("a", H1[0])
    assert [idx.has_speculative("a", h) for h in H1] == [False, True, True, True]
    assert idx.speculative_blocks("b") == 3
    idx.check_invariants()


def test_speculative_dropped_by_remove_clear_remove_instance_replace() -> None:
    idx = fresh()
    idx.insert_speculative("a", H1, now=0.0)
    idx.apply("a", BlockRemoved((H1[3],)))
    assert idx.speculative_blocks("a") == 3
    assert idx.stats.unknown_removed == 1
    idx.apply("a", AllBlocksCleared())
    assert idx.speculative_blocks("a") == 0
    idx.insert_speculative("a", H1, now=0.0)
    idx.replace_instance("a", [stored(P1, 0, 1)])
    assert idx.speculative_blocks("a") == 0
    assert idx.match(P1).cached_tokens == {"a": 4}
    idx.insert_speculative("a", H2, now=0.0)
    assert idx.remove_instance("a") == 1
    assert idx.speculative_blocks() == 0 and idx.total_blocks() == 0
    idx.check_invariants()


def test_speculative_shared_with_real_holder_of_other_instance() -> None:
    idx = fresh()
    idx.apply("a", stored(P1))
    idx.insert_speculative("b", H1, now=0.0)
    idx.expire_speculative(10.0)
    assert idx.total_blocks() == 4
    assert idx.match(P1).cached_tokens == {"a": 16, "b": 0}
    assert [ev.block_hashes for ev in idx.dump("b")] == []
    idx.check_invariants()


# ------------------------------------------------------------------------------------ dump and replace


def held_by_dump(evs: Sequence[BlockStored]) -> list[int]:
    return [h for ev in evs for h in ev.block_hashes]


def assert_parents_first(evs: Sequence[BlockStored]) -> None:
    blocks = set(held_by_dump(evs))
    seen: set[int] = set()
    for ev in evs:
        assert (
            ev.parent_block_hash is None or ev.parent_block_hash not in blocks or ev.parent_block_hash in seen
        )
        seen.update(ev.block_hashes)


def test_dump_merges_chains_and_orders_parents_first() -> None:
    idx = fresh()
    idx.apply_batch("a", [stored(P1), stored(P2, 2)])
    evs = idx.dump("a")
    assert all(ev.token_ids == () and ev.block_size == BS for ev in evs)
    assert sorted(held_by_dump(evs)) == sorted(set(H1) | set(H2))
    assert_parents_first(evs)
    # Two pages shared, then a branch into two chains of two: three events.
    assert sorted(len(ev.block_hashes) for ev in evs) == [2, 2, 2]


def test_dump_replace_round_trip() -> None:
    idx = fresh()
    idx.apply_batch("a", [stored(P1), stored(P2, 2), BlockRemoved((H1[0],))])
    other = fresh()
    other.replace_instance("a", idx.dump("a"))
    assert sorted(held_by_dump(other.dump("a"))) == sorted(held_by_dump(idx.dump("a")))
    assert other.match(P1).cached_tokens == idx.match(P1).cached_tokens
    assert other.stats.unknown_parent == 1  # H1[1]'s parent was evicted first
    # Replacing an instance with its own dump changes nothing.
    before = idx.dump("a")
    idx.replace_instance("a", before)
    assert idx.dump("a") == before
    idx.check_invariants()


def test_replace_instance_swaps_and_leaves_others_alone() -> None:
    idx = fresh()
    idx.apply("a", stored(P1))
    idx.apply("b", stored(P1))
    idx.replace_instance("a", [stored(P2), BlockRemoved((H2[3], 777)), stored(P1, bs=8)])
    assert idx.match(P2).cached_tokens == {"a": 12, "b": 8}
    assert idx.match(P1).cached_tokens == {"a": 8, "b": 16}
    assert idx.stats.unknown_removed == 1
    assert idx.stats.block_size_mismatch == 1
    idx.replace_instance("a", [stored(P1), AllBlocksCleared(), stored(P2, 0, 1)])
    assert idx.match(P2).cached_tokens == {"a": 4, "b": 8}
    idx.replace_instance("new", [stored(P1)])
    assert idx.blocks_of("new") == 4
    idx.check_invariants()


def test_replace_instance_is_atomic() -> None:
    idx = fresh()
    idx.apply("a", stored(P1))
    idx.insert_speculative("a", H2, now=0.0)
    stats_before = idx.stats.events_applied

    def bad() -> Iterator[KVEvent]:
        yield AllBlocksCleared()
        yield stored(P2)
        raise RuntimeError("connection lost mid-snapshot")

    with pytest.raises(RuntimeError):
        idx.replace_instance("a", bad())
    assert idx.blocks_of("a") == 4
    assert idx.speculative_blocks("a") == 2
    assert idx.stats.events_applied == stats_before
    assert idx.match(P1).cached_tokens == {"a": 16}
    idx.check_invariants()


def test_prefix_chains_survives_cycles_and_self_parents() -> None:
    parent: dict[int, int | None] = {1: 2, 2: 1, 3: 3, 4: 1, 5: None}
    chains = prefix_chains(parent.keys(), parent)
    flat = [h for _, c in chains for h in c]
    assert sorted(flat) == [1, 2, 3, 4, 5]
    for p, c in chains:
        assert p == parent[c[0]]
        assert all(parent[b] == a for a, b in pairwise(c))


# ------------------------------------------------------------------------------------ property test

PBS = 2
NAMES = ("a", "b", "c")
TOKEN = st.integers(0, 2)  # tiny alphabet: prefixes really collide


@st.composite
def prompt_family(draw: st.DrawFn) -> list[list[int]]:
    trunk = draw(st.lists(TOKEN, max_size=12))
    out = []
    for _ in range(draw(st.integers(2, 4))):
        cut = draw(st.integers(0, len(trunk)))
        out.append(trunk[:cut] + draw(st.lists(TOKEN, max_size=8)))
    return out


class Model:
    """Brute force: per instance a plain set of real hashes and a dict of speculative ones."""

    def __init__(self, cap: int, ttl: float) -> None:
        self.cap = cap
        self.ttl = ttl
        self.real: dict[str, set[int]] = {}
        self.spec: dict[str, dict[int, float]] = {}
        self.unknown_removed = 0
        self.unknown_parent = 0

    def known(self, n: str) -> None:
        self.real.setdefault(n, set())
        self.spec.setdefault(n, {})

    def store(self, n: str, ev: BlockStored) -> None:
        self.known(n)
        if ev.parent_block_hash is not None and ev.parent_block_hash not in self.real[n]:
            self.unknown_parent += 1
        for h in ev.block_hashes:
            self.real[n].add(h)
            self.spec[n].pop(h, None)

    def remove(self, n: str, hashes: Sequence[int]) -> None:
        self.known(n)
        for h in hashes:
            if h in self.real[n]:
                self.real[n].discard(h)
            else:
                self.unknown_removed += 1
                self.spec[n].pop(h, None)

    def speculate(self, n: str, hashes: Sequence[int], now: float) -> None:
        self.known(n)
        sp = self.spec[n]
        for h in hashes:
            if h not in self.real[n]:
                sp.pop(h, None)
                sp[h] = now
        while len(sp) > self.cap:
            del sp[next(iter(sp))]

    def expire(self, now: float) -> None:
        for sp in self.spec.values():
            for h in [h for h, t in sp.items() if t < now - self.ttl]:
                del sp[h]

    def cached(self, hashes: Sequence[int]) -> dict[str, int]:
        out = {}
        for n in self.real:
            held = self.real[n] | self.spec[n].keys()
            k = 0
            while k < len(hashes) and hashes[k] in held:
                k += 1
            out[n] = k * PBS
        return out


def random_store(data: st.DataObject, prompts: list[list[int]]) -> BlockStored:
    p = data.draw(st.sampled_from(prompts))
    hs = block_hashes(p, PBS)
    start = data.draw(st.integers(0, len(hs)))
    end = data.draw(st.integers(start, len(hs)))
    return stored(p, start, end, bs=PBS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompt_family(), cap=st.sampled_from([3, 65536]), data=st.data())
def test_index_matches_brute_force_model(prompts: list[list[int]], cap: int, data: st.DataObject) -> None:
    idx = GlobalIndex(PBS, ttl=5.0, max_speculative_per_instance=cap)
    model = Model(cap, 5.0)
    all_hashes = sorted({h for p in prompts for h in block_hashes(p, PBS)})
    now = 0.0
    for _ in range(data.draw(st.integers(1, 30))):
        op = data.draw(
            st.sampled_from(
                ["store", "store", "store", "remove", "clear", "drop", "spec", "expire", "replace"]
            )
        )
        n = data.draw(st.sampled_from(NAMES))
        if op == "store":
            ev = random_store(data, prompts)
            idx.apply(n, ev)
            model.store(n, ev)
        elif op == "remove":
            pool = sorted(model.real.get(n, set())) + sorted(model.spec.get(n, {})) + all_hashes[:3]
            hs = data.draw(st.lists(st.sampled_from(pool), max_size=4, unique=True)) if pool else []
            idx.apply(n, BlockRemoved(tuple(hs)))
            model.remove(n, hs)
        elif op == "clear":
            idx.apply(n, AllBlocksCleared())
            model.known(n)
            model.real[n] = set()
            model.spec[n] = {}
        elif op == "drop":
            assert idx.remove_instance(n) == len(model.real.pop(n, set()))
            model.spec.pop(n, None)
        elif op == "spec":
            p = data.draw(st.sampled_from(prompts))
            now += data.draw(st.integers(0, 3))
            spec_hs = block_hashes(p, PBS)
            idx.insert_speculative(n, spec_hs, now)
            model.speculate(n, spec_hs, now)
        elif op == "expire":
            now += data.draw(st.integers(0, 4))
            idx.expire_speculative(now)
            model.expire(now)
        else:  # replace with a few real stores
            evs = [random_store(data, prompts) for _ in range(data.draw(st.integers(0, 3)))]
            idx.replace_instance(n, evs)
            model.known(n)
            model.real[n] = set()
            model.spec[n] = {}
            for ev in evs:
                if ev.parent_block_hash is not None and ev.parent_block_hash not in model.real[n]:
                    model.unknown_parent += 1
                model.real[n].update(ev.block_hashes)
        idx.check_invariants()

    assert set(idx.instances()) == set(model.real)
    assert idx.stats.unknown_removed == model.unknown_removed
    assert idx.stats.unknown_parent == model.unknown_parent
    probes = [*prompts, *(p[: len(p) // 2] for p in prompts), data.draw(st.lists(TOKEN, max_size=16))]
    for probe in probes:
        assert dict(idx.match(probe).cached_tokens) == model.cached(block_hashes(probe, PBS))
    for n in model.real:
        assert idx.blocks_of(n) == len(model.real[n])
        assert idx.speculative_blocks(n) == len(model.spec[n])
        assert all(idx.has_block(n, h) == (h in model.real[n]) for h in all_hashes)
        evs = idx.dump(n)
        assert set(held_by_dump(evs)) == model.real[n]
        assert len(held_by_dump(evs)) == len(model.real[n])
        assert_parents_first(evs)
        copy = GlobalIndex(PBS)
        copy.replace_instance(n, evs)
        assert sorted(held_by_dump(copy.dump(n))) == sorted(model.real[n])


# ---------------------------------------------------------------- per-instance log and its compaction


def parents_in_dump(evs: Sequence[BlockStored]) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    for ev in evs:
        prev = ev.parent_block_hash
        for h in ev.block_hashes:
            out[h] = prev
            prev = h
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompt_family(), step=st.integers(1, 5), data=st.data())
def test_compaction_keeps_blocks_and_parents(
    prompts: list[list[int]], step: int, data: st.DataObject
) -> None:
    """With a log bound of 2 x blocks and tiny steps, compaction runs all the time; the index still agrees
    with a model of real blocks *and their parents* (the last store's), and the log stays bounded."""
    with patch.object(index_module, "LOG_SLACK", 0), patch.object(index_module, "COMPACT_STEP", step):
        idx = GlobalIndex(PBS)
        real: dict[str, dict[int, int | None]] = {n: {} for n in NAMES}
        all_hashes = sorted({h for p in prompts for h in block_hashes(p, PBS)})
        for _ in range(data.draw(st.integers(1, 40))):
            n = data.draw(st.sampled_from(NAMES))
            op = data.draw(st.sampled_from(["store", "store", "store", "remove", "remove", "spec", "clear"]))
            if op == "store":
                ev = random_store(data, prompts)
                idx.apply(n, ev)
                prev = ev.parent_block_hash
                for h in ev.block_hashes:
                    real[n][h] = prev
                    prev = h
            elif op == "remove":
                pool = sorted(real[n]) + all_hashes[:2]
                hs = data.draw(st.lists(st.sampled_from(pool), max_size=4, unique=True)) if pool else []
                idx.apply(n, BlockRemoved(tuple(hs)))
                for h in hs:
                    real[n].pop(h, None)
            elif op == "spec":
                spec = data.draw(st.lists(st.sampled_from(all_hashes), max_size=3)) if all_hashes else []
                idx.insert_speculative(n, spec, 0.0)
            else:
                idx.apply(n, AllBlocksCleared())
                real[n] = {}
            idx.check_invariants()
            log = idx._log[idx._id_of[n]]
            assert len(log) <= 2 * idx.blocks_of(n) + 2 * max(8, step) + 8  # bounded, up to one event
        for n in NAMES:
            assert idx.blocks_of(n) == len(real[n])
            evs = idx.dump(n)
            assert_parents_first(evs)
            assert parents_in_dump(evs) == real[n]


def test_log_keeps_true_parent_of_an_orphan_through_compaction() -> None:
    with patch.object(index_module, "LOG_SLACK", 0), patch.object(index_module, "COMPACT_STEP", 1):
        idx = fresh()
        idx.apply("a", stored(P1))
        idx.apply("a", BlockRemoved(tuple(H1[:3])))  # 4 entries for 1 block: over 2 x 1, a pass starts
        log = idx._log[idx._id_of["a"]]
        assert log.compacting
        events = 0
        while log.compacting:  # one entry a step, one step an event
            idx.apply("a", BlockRemoved((777,)))
            events += 1
            idx.check_invariants()
        assert events == 3 and len(log) == 1
        assert idx.dump("a") == [BlockStored((H1[3],), H1[2], (), BS)]


def test_repeated_stores_of_held_blocks_do_not_grow_the_log() -> None:
    with patch.object(index_module, "LOG_SLACK", 4), patch.object(index_module, "COMPACT_STEP", 3):
        idx = fresh()
        for _ in range(50):
            idx.apply("a", stored(P1))
        assert idx.blocks_of("a") == 4
        assert len(idx._log[idx._id_of["a"]]) <= 2 * 4 + 4 + 4
        assert idx.dump("a") == [BlockStored(tuple(H1), None, (), BS)]
        idx.check_invariants()


def test_blocklog_incremental_pass_reads_like_the_whole_log() -> None:
    log = BlockLog()
    log.append_chain([1, 2, 3], None)
    log.append_chain([4, 5], 2)
    log.append_chain([2**64 - 1, 6], 5)  # a hash outside int64 is kept aside
    before = list(log.entries())
    assert before == [(1, None), (2, 1), (3, 2), (4, 2), (5, 4), (2**64 - 1, 5), (6, 2**64 - 1)]
    assert not log.compact_step(lambda hs: [h != 3 for h in hs], 3)  # drops 3, a pass is now running
    assert log.compacting
    log.append_chain([7], 6)
    assert list(log.hashes()) == [1, 2, 4, 5, 2**64 - 1, 6, 7]
    assert list(log.entries()) == [e for e in before if e[0] != 3] + [(7, 6)]
    assert log.latest_parents()[4] == 2
    while not log.compact_step(lambda hs: [True] * len(hs), 2):
        log.check()
    assert list(log.entries()) == [e for e in before if e[0] != 3] + [(7, 6)]
    log.rebuild([(9, None), (10, 9), (11, 3)])
    assert list(log.entries()) == [(9, None), (10, 9), (11, 3)] and len(log) == 3
    log.check()
    log.clear()
    assert len(log) == 0 and list(log.entries()) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.lists(st.integers(1, 12), max_size=6), st.booleans()),
        max_size=25,
    ),
    st.lists(st.integers(1, 12), min_size=1, max_size=10),
)
def test_speculative_insert_with_the_match_as_hint_equals_without(
    ops: list[tuple[str, list[int], bool]], request: list[int]
) -> None:
    """``insert_speculative(..., held_prefix=match)`` (what the routing model passes) changes nothing."""
    idxs = [GlobalIndex(4, ttl=100.0), GlobalIndex(4, ttl=100.0)]
    for idx in idxs:
        for name in "abc":
            idx.add_instance(name)
    for t, (name, hs, real) in enumerate(ops):
        for idx in idxs:
            if real and hs:
                idx.apply(name, BlockStored(tuple(hs), None, (), 4))
            else:
                idx.insert_speculative(name, hs, float(t))
    for name in "abc":
        m = idxs[0].match_hashes(request)
        held = m.cached_tokens.get(name, 0) // 4
        assert idxs[0].insert_speculative(name, request, 99.0, held) == idxs[1].insert_speculative(
            name, request, 99.0
        )
        for n in "abc":
            assert idxs[0].speculative_blocks(n) == idxs[1].speculative_blocks(n)
            assert list(idxs[0]._spec[idxs[0]._id_of[n]].items()) == list(
                idxs[1]._spec[idxs[1]._id_of[n]].items()
            )
        assert idxs[0]._holders == idxs[1]._holders
