"""The holder table (kvindex/holders.py): the C table (kvindex/_holders.c) against the pure-Python one, op
for op, on random operations (hypothesis), plus each method's contract on small cases."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex import holders as hmod
from kvindex.blocklog import BlockLog
from kvindex.holders import Holders, PyHolders, new_holders

needs_c = pytest.mark.skipif(hmod.BACKEND != "c", reason="kvindex._holders is not built (no C compiler)")

# Keys: a small pool (so operations collide) plus ints outside int64 (the C table's side dict).
keys = st.sampled_from([0, 1, -1, 7, 2**63 - 1, -(2**63), 2**63, 2**64 + 5, -(2**70), 12345678901234567])
masks = st.integers(min_value=1, max_value=2**64 - 1)
bits = st.integers(min_value=0, max_value=63).map(lambda i: 1 << i)
hash_lists = st.lists(keys, max_size=12)

ops = st.one_of(
    st.tuples(st.just("set"), keys, masks),
    st.tuples(st.just("del"), keys),
    st.tuples(st.just("get"), keys),
    st.tuples(st.just("setdefault"), keys, masks),
    st.tuples(st.just("masks"), hash_lists),
    st.tuples(st.just("walk"), hash_lists, masks),
    st.tuples(st.just("prefix_with"), hash_lists, bits),
    st.tuples(st.just("or_bit"), hash_lists, bits),
    st.tuples(st.just("clear_bit"), hash_lists, bits),
    st.tuples(st.just("contains"), keys),
)


def apply(t: Holders, op: tuple[Any, ...]) -> Any:
    name, *args = op
    try:
        if name == "set":
            t[args[0]] = args[1]
            return None
        if name == "del":
            del t[args[0]]
            return None
        if name == "get":
            return t.get(args[0], "absent")
        if name == "contains":
            return args[0] in t
        return getattr(t, name)(*args)
    except KeyError:
        return "KeyError"


@needs_c
@settings(max_examples=400, deadline=None)
@given(st.lists(ops, max_size=60))
def test_c_table_equals_the_python_table_op_for_op(seq: list[tuple[Any, ...]]) -> None:
    c, py = new_holders(), PyHolders()
    assert type(c).__name__ == "HolderTable"
    for op in seq:
        assert apply(c, op) == apply(py, op), op
        assert len(c) == len(py)
    assert dict(c.items()) == dict(py) and c == py and py == c and (c != py) is False
    assert sorted(c.values()) == sorted(py.values()) and sorted(c) == sorted(py)


@needs_c
def test_c_table_grows_and_deletes_without_losing_a_key() -> None:
    """Tens of thousands of keys through growth and backward-shift deletion, checked against a dict."""
    c, ref = new_holders(), {}
    for k in range(40_000):
        h = (k * 0x9E3779B97F4A7C15) % 2**63
        c[h] = ref[h] = k % 7 + 1
    for k in range(0, 40_000, 3):
        h = (k * 0x9E3779B97F4A7C15) % 2**63
        del c[h]
        del ref[h]
    assert len(c) == len(ref) and dict(c.items()) == ref
    assert all(c.get(h) == m for h, m in ref.items())


@pytest.mark.parametrize("pure", [True, False])
def test_batch_methods_contract(pure: bool) -> None:
    t = new_holders(pure_python=pure)
    assert t.or_bit([1, 2, 2, 3], 0b01) == [1, 2, 3]
    assert t.or_bit([2, 4], 0b10) == [2, 4]
    assert t.masks([1, 2, 4, 9]) == [1, 3, 2, 0]
    assert t.prefix_with([1, 2, 3, 4], 0b01) == 3 and t.prefix_with([], 1) == 0
    assert t.walk([1, 2, 3], 0b11) == (3, [(0b10, 0)])
    assert t.walk([2, 4, 9], 0b11) == (2, [(0b01, 1), (0b10, 2)])
    assert t.walk([2, 4, 9], 0b10) == (2, [(0b10, 2)])
    assert t.walk([2, 2], 0b11) == (2, [])
    assert t.clear_bit([2, 2, 9], 0b01) == [2]
    assert t.clear_bit([4], 0b10) == [4] and 4 not in t
    if not pure:  # PyHolders is a plain dict for single keys
        with pytest.raises(ValueError):
            t[5] = 0
        with pytest.raises(TypeError):
            t.get("x")  # type: ignore[arg-type]
        with pytest.raises(OverflowError):
            t[5] = 2**64


def test_walk_matches_a_plain_loop() -> None:
    """``walk`` against the obvious per-block loop, on a table shaped like an index (shared prefixes)."""
    for pure in (True, False):
        t = new_holders(pure_python=pure)
        chains = [[(c << 20) + j if j >= 5 else j for j in range(300)] for c in range(4)]
        for c, chain in enumerate(chains):
            t.or_bit(chain[: 100 + 50 * c], 1 << c)
        for chain in chains:
            alive, drops, depth = 0b1111, [], len(chain)
            for j, h in enumerate(chain):
                now = t.get(h, 0) & alive
                if now != alive:
                    drops.append((alive ^ now, j))
                    alive = now
                    if not alive:
                        depth = j
                        break
            assert t.walk(chain, 0b1111) == (depth, drops)


def test_index_moves_to_the_python_table_at_the_65th_instance_and_stays_exact() -> None:
    """64-bit masks carry ids 0..63; interning id 64 moves the index to PyHolders with every entry."""
    from kvindex.index import GlobalIndex
    from kvindex.protocol.sglang import BlockStored

    idx = GlobalIndex(4)
    chain = list(range(1000, 1040))
    for k in range(70):
        idx.apply(f"i{k}", BlockStored(tuple(chain[: k % 40 + 1]), None, (), 4))
        if k == 63:
            assert isinstance(idx._holders, PyHolders) == (hmod.BACKEND == "python")
    assert isinstance(idx._holders, PyHolders)
    idx.check_invariants()
    cached = idx.match_hashes(chain).cached_tokens
    assert all(cached[f"i{k}"] == 4 * (k % 40 + 1) for k in range(70))


class _EntryByEntryLog(BlockLog):
    """The Python compaction path whatever the input (the reference for the numpy one)."""

    _compact_vectorised = BlockLog._compact_entries


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 30), min_size=1, max_size=8), st.one_of(st.none(), st.integers(0, 30))
        ),
        min_size=1,
        max_size=12,
    ),
    st.sets(st.integers(0, 30)),
    st.integers(1, 9),
)
def test_vectorised_compaction_equals_entry_by_entry(
    events: list[tuple[list[int], int | None]], dead: set[int], budget: int
) -> None:
    """BlockLog.compact_step's numpy path keeps exactly the entries and explicit parents the
    entry-by-entry path keeps, whatever the chunking (appends between steps included)."""
    logs = [BlockLog(), _EntryByEntryLog()]
    half = len(events) // 2
    for hashes, parent in events[:half]:
        for log in logs:
            log.append_chain(hashes, parent)

    def live(hs: Any) -> list[bool]:
        return [int(h) not in dead for h in hs]

    done = [False, False]
    rest = iter(events[half:])
    while not all(done):
        for k, log in enumerate(logs):
            if not done[k]:
                done[k] = log.compact_step(live, budget)
        nxt = next(rest, None)
        if nxt is not None and not any(done):
            for log in logs:
                log.append_chain(*nxt)
    a, b = logs
    a.check()
    assert list(a.entries()) == list(b.entries())
    assert list(a.hashes()) == list(b.hashes()) and a._log.parents == b._log.parents


@pytest.mark.parametrize("spec_size", [3, 50])
def test_live_flags_for_compaction_equal_the_list_path(spec_size: int) -> None:
    """GlobalIndex._live on an int64 array (compaction) against its list path, with a speculative set
    smaller and larger than the chunk (np.isin, or a look-up of the held entries only)."""
    import numpy as np

    from kvindex.index import GlobalIndex
    from kvindex.protocol.sglang import BlockStored

    idx = GlobalIndex(4, max_speculative_per_instance=1000)
    idx.apply("a", BlockStored(tuple(range(100, 120)), None, (), 4))
    idx.insert_speculative("a", list(range(120, 120 + spec_size)), 0.0)  # held by bit, not really
    chunk = list(range(110, 130))  # 20 entries: fewer than 50 speculative ones, more than 3
    i = idx._id_of["a"]
    as_array = idx._live(i, np.array(chunk, dtype=np.int64))
    assert [bool(x) for x in as_array] == [bool(x) for x in idx._live(i, chunk)]
    assert sum(bool(x) for x in as_array) == 10  # 110..119 really held; 120.. speculative, 12x not held
