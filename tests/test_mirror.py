"""BlockMirror: unit tests and a snapshot round-trip property test against a brute-force model (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.hashing import block_hashes
from kvindex.index import GlobalIndex
from kvindex.mirror import BlockMirror
from kvindex.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

BS = 4


def stored(tokens: Sequence[int], start: int = 0, end: int | None = None, bs: int = BS) -> BlockStored:
    """A real BlockStored for pages ``start..end-1`` of ``tokens``, with chained hashes and parent."""
    hs = block_hashes(tokens, bs)
    end = len(hs) if end is None else end
    parent = hs[start - 1] if start > 0 else None
    return BlockStored(tuple(hs[start:end]), parent, tuple(tokens[start * bs : end * bs]), bs)


P1 = list(range(1, 17))
P2 = [*range(1, 9), 90, 91, 92, 93, 94, 95, 96, 97]
H1 = block_hashes(P1, BS)
H2 = block_hashes(P2, BS)


def rebuilt(m: BlockMirror) -> BlockMirror:
    out = BlockMirror()
    out.apply_batch(m.snapshot_events())
    return out


def assert_parents_first(evs: Sequence[BlockStored], blocks: BlockMirror) -> None:
    seen: set[int] = set()
    for ev in evs:
        p = ev.parent_block_hash
        assert p is None or p not in blocks or p in seen
        seen.update(ev.block_hashes)
    assert len(seen) == len(blocks) == sum(len(ev.block_hashes) for ev in evs)


def test_store_slices_tokens_and_chains_parents() -> None:
    m = BlockMirror()
    assert m.block_size is None
    m.apply(stored(P1))
    assert m.block_size == BS
    assert len(m) == 4
    assert H1[2] in m and 42 not in m
    assert list(m) == H1
    assert m.parent_of(H1[0]) is None
    assert [m.parent_of(h) for h in H1[1:]] == H1[:-1]
    assert m.tokens_of(H1[2]) == (9, 10, 11, 12)
    with pytest.raises(KeyError):
        m.parent_of(42)
    assert m.stats.events_applied == 1


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        BlockMirror(0)
    assert BlockMirror(16).block_size == 16


def test_tolerance_counters() -> None:
    m = BlockMirror(BS)
    m.apply(stored(P1, bs=8))
    assert m.stats.block_size_mismatch == 1 and len(m) == 0
    m.apply(stored(P1, 2))
    assert m.stats.unknown_parent == 1 and len(m) == 2
    m.apply(BlockRemoved((H1[3], 999)))
    assert m.stats.unknown_removed == 1 and len(m) == 1
    m.apply(BlockStored((H1[0], H1[1]), None, (1, 2, 3), BS))
    assert m.stats.token_mismatch == 1
    assert m.tokens_of(H1[0]) == () and m.parent_of(H1[1]) == H1[0]
    bogus: Any = object()
    m.apply(bogus)
    assert m.stats.unknown_event == 1
    assert m.stats.events_applied == 3
    m.apply(AllBlocksCleared())
    assert len(m) == 0 and m.block_size == BS


def test_empty_token_ids_store_empty_tuples() -> None:
    m = BlockMirror()
    m.apply(BlockStored(tuple(H1[:2]), None, (), BS))
    assert m.tokens_of(H1[0]) == () == m.tokens_of(H1[1])
    assert m.stats.token_mismatch == 0
    assert rebuilt(m) == m


def test_clear_and_equality() -> None:
    a, b = BlockMirror(), BlockMirror()
    a.apply(stored(P1))
    assert a != b
    b.apply_batch([stored(P1, 0, 2), stored(P1, 2)])
    assert a == b
    b.apply(BlockRemoved((H1[3],)))
    assert a != b
    a.clear()
    b.clear()
    assert a == b == BlockMirror(8)  # empty mirrors are equal whatever their block size
    assert a != "not a mirror"


def test_snapshot_merges_single_child_runs() -> None:
    m = BlockMirror()
    m.apply_batch([stored(P1), stored(P2, 2)])
    evs = m.snapshot_events()
    assert sorted(len(ev.block_hashes) for ev in evs) == [2, 2, 2]
    assert evs[0].block_hashes == tuple(H1[:2]) and evs[0].parent_block_hash is None
    assert evs[0].token_ids == tuple(P1[:8])
    assert_parents_first(evs, m)
    for ev in evs:
        assert len(ev.token_ids) == len(ev.block_hashes) * BS
    assert rebuilt(m) == m
    assert BlockMirror().snapshot_events() == []


def test_snapshot_splits_runs_where_tokens_are_missing() -> None:
    m = BlockMirror()
    m.apply(stored(P1, 0, 2))
    m.apply(BlockStored(tuple(H1[2:]), H1[1], (), BS))
    evs = m.snapshot_events()
    assert [len(ev.token_ids) for ev in evs] == [8, 0]
    assert rebuilt(m) == m


def test_snapshot_of_orphans_and_index_replace() -> None:
    m = BlockMirror()
    m.apply_batch([stored(P1), BlockRemoved((H1[1],))])  # H1[2..3] now orphans
    evs = m.snapshot_events()
    assert_parents_first(evs, m)
    r = rebuilt(m)
    assert r == m
    assert r.stats.unknown_parent == 1
    idx = GlobalIndex(BS)
    idx.replace_instance("a", evs)
    assert sorted(h for ev in idx.dump("a") for h in ev.block_hashes) == sorted(m)
    assert idx.match(P1).cached_tokens == {"a": 4}


# ------------------------------------------------------------------------------------ property test

PBS = 2
TOKEN = st.integers(0, 2)


@st.composite
def prompt_family(draw: st.DrawFn) -> list[list[int]]:
    trunk = draw(st.lists(TOKEN, max_size=12))
    out = []
    for _ in range(draw(st.integers(2, 4))):
        cut = draw(st.integers(0, len(trunk)))
        out.append(trunk[:cut] + draw(st.lists(TOKEN, max_size=8)))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompt_family(), data=st.data())
def test_mirror_snapshot_round_trip_matches_model(prompts: list[list[int]], data: st.DataObject) -> None:
    m = BlockMirror(PBS)
    model: dict[int, tuple[int | None, tuple[int, ...]]] = {}  # hash -> (parent, tokens)
    for _ in range(data.draw(st.integers(1, 30))):
        op = data.draw(st.sampled_from(["store", "store", "store", "remove", "clear"]))
        ev: KVEvent
        if op == "store":
            p = data.draw(st.sampled_from(prompts))
            n = len(block_hashes(p, PBS))
            start = data.draw(st.integers(0, n))
            ev = stored(p, start, data.draw(st.integers(start, n)), bs=PBS)
            prev = ev.parent_block_hash
            for k, h in enumerate(ev.block_hashes):
                model[h] = (prev, ev.token_ids[k * PBS : (k + 1) * PBS])
                prev = h
        elif op == "remove":
            pool = sorted(model) + block_hashes(prompts[0], PBS)[:1]
            hs = data.draw(st.lists(st.sampled_from(pool), max_size=4, unique=True)) if pool else []
            ev = BlockRemoved(tuple(hs))
            for h in hs:
                model.pop(h, None)
        else:
            ev = AllBlocksCleared()
            model.clear()
        m.apply(ev)

    assert {h: (m.parent_of(h), m.tokens_of(h)) for h in m} == model
    evs = m.snapshot_events()
    assert_parents_first(evs, m)
    for ev in evs:
        # Chained hashes of a snapshot event's tokens are its block hashes when its chain starts at the root.
        if ev.parent_block_hash is None:
            assert tuple(block_hashes(ev.token_ids, PBS)) == ev.block_hashes
    assert rebuilt(m) == m
    idx = GlobalIndex(PBS)
    idx.replace_instance("a", evs)
    assert sorted(h for ev in idx.dump("a") for h in ev.block_hashes) == sorted(model)
    for p in prompts:
        ph = block_hashes(p, PBS)
        k = 0
        while k < len(ph) and ph[k] in model:
            k += 1
        assert idx.match(p).cached_tokens == {"a": k * PBS}
