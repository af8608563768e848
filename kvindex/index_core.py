"""The global index's storage (:class:`IndexCore`, the base of :class:`kvindex.index.GlobalIndex`) and its
counters (:class:`IndexStats`). Pure: no I/O, no clock.

The data layout and the invariants every mutation keeps are in :mod:`kvindex.index`'s docstring. Here:
interning instance names to small ids, clearing mask bits, dropping an instance, the speculative entries
(insert, refresh, cap, expiry), dumps and the invariant check. Applying engine events (and compacting the
logs they grow) and matching are in :mod:`kvindex.index`.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import repeat

from kvindex.blocklog import BlockLog
from kvindex.chains import prefix_chains
from kvindex.holders import C_MAX_IDS, Holders, PyHolders, new_holders
from kvindex.protocol.sglang import BlockStored

__all__ = ["CHUNK", "IndexCore", "IndexStats"]


@dataclass(slots=True)
class IndexStats:
    """Counters of odd input and of speculative-entry outcomes (all event or block counts, monotonic)."""

    block_size_mismatch: int = 0
    """``BlockStored`` events skipped because their ``block_size`` differs from the index's."""
    unknown_parent: int = 0
    """``BlockStored`` events applied although their parent was not held (really) by that instance."""
    unknown_removed: int = 0
    """Hashes in ``BlockRemoved`` events the instance did not hold (really); skipped."""
    unknown_event: int = 0
    """Objects that are none of the three event types; skipped."""
    speculative_expired: int = 0
    """Speculative entries dropped by :meth:`GlobalIndex.expire_speculative`."""
    speculative_evicted: int = 0
    """Speculative entries dropped, oldest first, because an instance went over its cap."""
    speculative_confirmed: int = 0
    """Speculative entries that a real ``BlockStored`` turned into real entries."""
    events_applied: int = 0
    """Events applied (including via :meth:`GlobalIndex.replace_instance`), skipped ones excluded."""

    def add(self, other: IndexStats) -> None:
        """Add ``other``'s counters to these (mutates ``self``)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


CHUNK = 1024
"""Hashes looked up from C at a time before the per-block Python work on them (see the note on speed)."""


class IndexCore:
    """The storage of :class:`kvindex.index.GlobalIndex` and what needs no event: instance ids, holder
    masks, logs and speculative entries (the data layout and invariants are in :mod:`kvindex.index`);
    instance membership, speculative entries, dumps and the invariant check.

    Single-owner, not thread-safe. ``block_size`` is in tokens per block (> 0), ``ttl`` in seconds (> 0),
    ``max_speculative_per_instance`` in blocks (>= 0). Raises ``ValueError`` on a bad argument.
    """

    __slots__ = (
        "_all_mask",
        "_block_size",
        "_count",
        "_free",
        "_holders",
        "_id_of",
        "_log",
        "_max_spec",
        "_names",
        "_overs",
        "_spec",
        "_ttl",
        "stats",
    )

    def __init__(self, block_size: int, ttl: float = 5.0, max_speculative_per_instance: int = 65536) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if max_speculative_per_instance < 0:
            raise ValueError(f"max_speculative_per_instance must be >= 0, got {max_speculative_per_instance}")
        self._block_size = block_size
        self._ttl = float(ttl)
        self._max_spec = max_speculative_per_instance
        self._holders: Holders = new_holders()
        self._id_of: dict[str, int] = {}
        self._names: list[str | None] = []
        self._free: list[int] = []  # min-heap of reusable ids
        self._count: list[int] = []
        self._log: list[BlockLog] = []
        self._overs: list[int] = []  # per id: compaction passes in a row that ended over the bound
        self._spec: list[OrderedDict[int, float]] = []
        self._all_mask = 0
        self.stats = IndexStats()

    # ------------------------------------------------------------------------------------- properties

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def ttl(self) -> float:
        """Lifetime of an unconfirmed speculative entry, in seconds."""
        return self._ttl

    # -------------------------------------------------------------------------------------- instances

    def _intern(self, name: str) -> int:
        i = self._id_of.get(name)
        if i is not None:
            return i
        if self._free:
            i = heapq.heappop(self._free)
            self._names[i] = name
        else:
            i = len(self._names)
            if i >= C_MAX_IDS and not isinstance(self._holders, PyHolders):
                # The C table's masks are 64 bits: the 65th concurrent instance moves the index to the
                # pure-Python table, once (O(hashes)).
                self._holders = PyHolders(self._holders.items())
            self._names.append(name)
            self._count.append(0)
            self._log.append(BlockLog())
            self._overs.append(0)
            self._spec.append(OrderedDict())
        self._id_of[name] = i
        self._all_mask |= 1 << i
        return i

    def add_instance(self, name: str) -> None:
        """Make ``name`` known (it then appears in every match, with 0 tokens). Idempotent. Mutates."""
        self._intern(name)

    def remove_instance(self, name: str) -> int:
        """Forget ``name`` with all its real and speculative entries. Mutates; never raises.

        Returns the number of real blocks dropped (0 for an unknown name). O(blocks ``name`` stored).
        """
        i = self._id_of.pop(name, None)
        if i is None:
            return 0
        dropped = self._count[i]
        self._drop_all(i)
        self._names[i] = None
        self._all_mask &= ~(1 << i)
        heapq.heappush(self._free, i)
        return dropped

    def instances(self) -> tuple[str, ...]:
        """Known instance names, in id order. Does not mutate."""
        return tuple(n for n in self._names if n is not None)

    def blocks_of(self, name: str) -> int:
        """Number of real (not speculative) blocks ``name`` holds; 0 if unknown. Does not mutate."""
        i = self._id_of.get(name)
        return 0 if i is None else self._count[i]

    def _really_holds(self, i: int, h: int) -> bool:
        return bool(self._holders.get(h, 0) >> i & 1) and h not in self._spec[i]

    def has_block(self, name: str, block_hash: int) -> bool:
        """Whether ``name`` really holds ``block_hash`` (speculative entries excluded). Does not mutate."""
        i = self._id_of.get(name)
        return i is not None and self._really_holds(i, block_hash)

    def has_speculative(self, name: str, block_hash: int) -> bool:
        """Whether ``name`` holds ``block_hash`` as an unconfirmed speculative entry. Does not mutate."""
        i = self._id_of.get(name)
        return i is not None and block_hash in self._spec[i]

    def total_blocks(self) -> int:
        """Distinct hashes held by any instance, really or speculatively. Does not mutate."""
        return len(self._holders)

    # ---------------------------------------------------------------------------------------- helpers

    # A note on speed: at 10 M entries a dict probe is a few cache misses (~250-400 ns on the reference
    # VM). Probes issued from a C-level loop (``map``) overlap their misses, a Python-level loop's cannot:
    # so bulk paths first run ``map(holders.get/setdefault, ...)`` over a chunk -- doing the work, or just
    # pulling the lines into cache -- and only then do per-block Python logic on warm lines.

    def _unset(self, h: int, bit: int) -> None:
        """Clear ``bit`` of ``holders[h]`` if it is set (dropping an emptied mask)."""
        m = self._holders.get(h)
        if m is not None and m & bit:
            m ^= bit
            if m:
                self._holders[h] = m
            else:
                del self._holders[h]

    def _unset_many(self, hashes: Sequence[int], bit: int) -> None:
        """:meth:`_unset` of every hash, duplicates allowed."""
        self._holders.clear_bit(hashes, bit)

    def _drop_all(self, i: int) -> None:
        """Everything instance ``i`` holds, real (found through its log) and speculative, goes."""
        bit = 1 << i
        self._unset_many(self._log[i].hashes(), bit)
        self._unset_many(list(self._spec[i]), bit)
        self._log[i].clear()
        self._overs[i] = 0
        self._spec[i] = OrderedDict()
        self._count[i] = 0

    def _real_parents(self, i: int) -> dict[int, int | None]:
        """Hash -> parent of every block instance ``i`` really holds, from its log. O(log entries)."""
        parents = self._log[i].latest_parents()
        bit = 1 << i
        spec = self._spec[i]
        hs = list(parents)
        masks = self._holders.masks(hs)
        return {h: parents[h] for h, m in zip(hs, masks, strict=True) if m & bit and h not in spec}

    # ------------------------------------------------------------------------------------ speculative

    def insert_speculative(
        self, name: str, hashes: Sequence[int], now: float, held_prefix: int | None = None
    ) -> int:
        """Record that ``name`` will soon hold ``hashes`` (auto-added if unknown). Mutates; never raises.

        ``now`` is the caller's clock in seconds (non-decreasing across calls). Hashes ``name`` really holds
        are skipped; an existing speculative entry is refreshed to ``now``. If ``name`` then has more than
        ``max_speculative_per_instance`` entries, its oldest are evicted (``stats.speculative_evicted``).
        Returns the number of entries newly added.

        ``held_prefix``: how many of the first ``hashes`` ``name`` holds (really or speculatively), when
        the caller knows it (``match_hashes`` just said so: ``cached_tokens[name] // block_size``); they
        are then not looked up again. Must be right: a wrong count leaves entries missing or unrefreshed.
        """
        i = self._intern(name)
        bit = 1 << i
        spec = self._spec[i]
        holders = self._holders
        # The prefix ``name`` already holds (usually most of the request: the policy chose it for its
        # match) needs only its speculative entries refreshed; the rest gets ``bit`` in one C call.
        k = holders.prefix_with(hashes, bit) if held_prefix is None else held_prefix
        if spec and k:
            for h in filter(spec.__contains__, hashes[:k]):
                spec.move_to_end(h)
                spec[h] = now
        rest = hashes[k:]
        newly = holders.or_bit(rest, bit)
        added = len(newly)
        if added == len(rest):  # all new (the usual case): no duplicate, nothing held
            spec.update(zip(rest, repeat(now)))
        else:  # in order: a new hash enters, a speculative one is refreshed, a real one is left alone
            fresh = set(newly)
            for h in rest:
                if h in fresh:
                    fresh.discard(h)
                    spec[h] = now
                elif h in spec:
                    spec.move_to_end(h)
                    spec[h] = now
        over = len(spec) - self._max_spec
        if over > 0:
            self.stats.speculative_evicted += over
            for _ in range(over):
                h, _t = spec.popitem(last=False)
                self._unset(h, bit)
        return added

    def expire_speculative(self, now: float) -> int:
        """Drop speculative entries inserted more than ``ttl`` seconds before ``now``. Mutates; never raises.

        Returns the number dropped (also added to ``stats.speculative_expired``).
        """
        cutoff = now - self._ttl
        expired = 0
        for i, spec in enumerate(self._spec):
            bit = 1 << i
            while spec:
                h, t = next(iter(spec.items()))
                if t >= cutoff:
                    break
                del spec[h]
                self._unset(h, bit)
                expired += 1
        self.stats.speculative_expired += expired
        return expired

    def speculative_blocks(self, name: str | None = None) -> int:
        """Unconfirmed speculative entries of ``name`` (0 if unknown), or of all instances. Pure."""
        if name is None:
            return sum(len(s) for s in self._spec)
        i = self._id_of.get(name)
        return 0 if i is None else len(self._spec[i])

    # ------------------------------------------------------------------------------------------- dump

    def dump(self, name: str) -> list[BlockStored]:
        """``name``'s real blocks as ``BlockStored`` events, parents before children. Pure.

        Single-child runs are merged into one event; ``token_ids`` are empty (the index keeps no tokens);
        ``block_size`` is the index's. ``replace_instance(name, dump(name))`` reproduces ``name``'s real
        blocks. Returns ``[]`` for an unknown name. O(blocks ``name`` stored).
        """
        i = self._id_of.get(name)
        if i is None:
            return []
        bs = self._block_size
        parents = self._real_parents(i)
        return [
            BlockStored(tuple(chain), parent, (), bs) for parent, chain in prefix_chains(parents, parents)
        ]

    def check_invariants(self) -> None:
        """Assert the invariants in :mod:`kvindex.index`'s docstring (O(total blocks); for tests). Pure.

        Raises ``AssertionError`` if one is broken.
        """
        expect: dict[int, int] = {}
        for i, name in enumerate(self._names):
            log = self._log[i]
            log.check()
            if name is None:
                assert not len(log) and not self._spec[i] and not self._count[i], f"freed id {i} holds blocks"
                continue
            assert self._id_of[name] == i
            bit = 1 << i
            spec = self._spec[i]
            real = {h for h in log.hashes() if self._holders.get(h, 0) & bit and h not in spec}
            assert self._count[i] == len(real), f"{name}: count {self._count[i]} != {len(real)} real blocks"
            for h in (*real, *spec):
                expect[h] = expect.get(h, 0) | bit
        assert expect == dict(self._holders.items()), (
            "holders masks disagree with logs and speculative entries"
        )
        assert 0 not in self._holders.values(), "zero mask stored"
        assert self._all_mask == sum(1 << i for i in self._id_of.values())
