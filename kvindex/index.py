"""The router's global prefix index: which instances hold which chained KV block. Pure: no I/O, no clock.

Theory of operation
-------------------
A published block hash (:mod:`kvindex.hashing`) is chained on its parent, so one hash names a whole token
prefix. The index is therefore a *flat* map, not a tree: ``holders[h]`` is an int bitmask over small
instance ids (instance names are interned to ``0..n-1``; a freed id is reused, lowest first, so the masks
stay small). Matching a prompt hashes its full pages and walks them from the start with an ``alive`` mask
(every known instance at first), ANDing in each block's holders; the depth at which an instance's bit
drops is its cached prefix in blocks. The walk stops as soon as ``alive`` is 0, so it costs
O(longest match) dict look-ups whatever the number of instances.

Per instance id the index keeps ``real[id]`` (hashes its engine reported stored and not yet removed) and
``spec[id]`` (speculative entries the router inserted at routing time: hash -> insertion time in seconds
of the caller's clock, in insertion order, so expiry and the per-instance cap pop from the front). A real
``BlockStored`` of a speculative hash confirms it: the hash moves from ``spec`` to ``real``.
Per hash it keeps ``parent[h]`` (from ``BlockStored``) so that :meth:`GlobalIndex.dump` can emit an
instance's blocks as events, parents first. Chaining makes a block's parent a function of the block, so one
parent map serves every instance; should bad input disagree, the last store wins.

Invariants (tests check them; every mutation must keep them):

1. bit ``id`` of ``holders[h]`` is set  <=>  ``h in real[id] or h in spec[id]``; no zero mask is stored.
2. ``real[id]`` and ``spec[id]`` are disjoint.
3. ``parent[h]`` exists for every ``h`` in some ``real[id]``; it is dropped once ``holders[h]`` is empty.
4. ``spec[id]`` is ordered by insertion time when callers pass a non-decreasing ``now`` (else expiry can
   only come late, never early).

Events come from the network: nothing here raises on their content. Odd events are counted in
:class:`IndexStats` and skipped (or applied, where skipping would lose more than it saves).

Memory: per (block, holder) one dict entry in ``holders`` and ``parent`` (shared by all holders) and one
set entry in the holder's ``real`` set; no per-block objects beyond the hash ints themselves (a sole
holder's mask is the shared ``1 << id`` int). Measured on CPython 3.11: ~185 bytes per (block, holder),
hash ints included, with 64 instances and ~1.1 holders per block.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

from kvindex.hashing import block_hashes
from kvindex.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["GlobalIndex", "IndexStats", "MatchResult", "prefix_chains"]


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


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Per-instance cached prefix of one request.

    ``cached_tokens`` maps EVERY known instance to the number of prompt tokens covered by the longest run
    of leading blocks it holds (really or speculatively): blocks x block_size, 0 if none. ``hashes`` are
    the request's full-page block hashes, in prompt order, for reuse (e.g. speculative insertion).
    ``prompt_tokens`` is the prompt length in tokens when the match was done on tokens, else ``None``;
    ``block_size`` is the index's, in tokens.
    """

    cached_tokens: Mapping[str, int]
    hashes: tuple[int, ...]
    prompt_tokens: int | None = None
    block_size: int = 0


def prefix_chains(
    blocks: Collection[int], parent_of: Mapping[int, int | None]
) -> list[tuple[int | None, list[int]]]:
    """Order ``blocks`` so that every parent comes before its children, merging single-child runs.

    Returns ``(parent_of_first, chain)`` pairs; within a chain each block is the parent of the next and
    the only child (among ``blocks``) of the previous, the way SGLang merges consecutive pages into one
    ``BlockStored``. A block whose parent is ``None`` or not in ``blocks`` starts a chain. Blocks caught
    in a parent cycle (bad input only) are still emitted, each exactly once. Does not mutate; raises
    ``KeyError`` if a block has no entry in ``parent_of``.
    """
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for h in blocks:
        p = parent_of[h]
        if p is not None and p != h and p in blocks:
            children.setdefault(p, []).append(h)
        else:
            roots.append(h)
    out: list[tuple[int | None, list[int]]] = []
    seen: set[int] = set()

    def walk(start: int) -> None:
        stack = [start]
        while stack:
            h = stack.pop()
            if h in seen:
                continue
            seen.add(h)
            chain = [h]
            kids = children.get(h)
            while kids is not None and len(kids) == 1 and kids[0] not in seen:
                h = kids[0]
                seen.add(h)
                chain.append(h)
                kids = children.get(h)
            out.append((parent_of[chain[0]], chain))
            if kids:
                stack.extend(k for k in reversed(kids) if k not in seen)

    for r in roots:
        walk(r)
    if len(seen) < len(blocks):  # parent cycles: break each at an arbitrary block
        for h in blocks:
            if h not in seen:
                walk(h)
    return out


class GlobalIndex:
    """Block hash -> holding instances, with prefix matching, speculative entries and per-instance dumps.

    Single-owner, not thread-safe. ``block_size`` is in tokens per block (> 0), ``ttl`` in seconds (> 0),
    ``max_speculative_per_instance`` in blocks (>= 0). Raises ``ValueError`` on a bad argument.
    """

    __slots__ = (
        "_all_mask",
        "_block_size",
        "_free",
        "_holders",
        "_id_of",
        "_max_spec",
        "_names",
        "_parent",
        "_real",
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
        self._holders: dict[int, int] = {}
        self._parent: dict[int, int | None] = {}
        self._id_of: dict[str, int] = {}
        self._names: list[str | None] = []
        self._free: list[int] = []  # min-heap of reusable ids
        self._real: list[set[int]] = []
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
            self._names.append(name)
            self._real.append(set())
            self._spec.append(OrderedDict())
        self._id_of[name] = i
        self._all_mask |= 1 << i
        return i

    def add_instance(self, name: str) -> None:
        """Make ``name`` known (it then appears in every match, with 0 tokens). Idempotent. Mutates."""
        self._intern(name)

    def remove_instance(self, name: str) -> int:
        """Forget ``name`` with all its real and speculative entries. Mutates; never raises.

        Returns the number of real blocks dropped (0 for an unknown name).
        """
        i = self._id_of.pop(name, None)
        if i is None:
            return 0
        bit = 1 << i
        dropped = len(self._real[i])
        self._drop_all(i, bit)
        self._names[i] = None
        self._all_mask &= ~bit
        heapq.heappush(self._free, i)
        return dropped

    def instances(self) -> tuple[str, ...]:
        """Known instance names, in id order. Does not mutate."""
        return tuple(n for n in self._names if n is not None)

    def blocks_of(self, name: str) -> int:
        """Number of real (not speculative) blocks ``name`` holds; 0 if unknown. Does not mutate."""
        i = self._id_of.get(name)
        return 0 if i is None else len(self._real[i])

    def has_block(self, name: str, block_hash: int) -> bool:
        """Whether ``name`` really holds ``block_hash`` (speculative entries excluded). Does not mutate."""
        i = self._id_of.get(name)
        return i is not None and block_hash in self._real[i]

    def has_speculative(self, name: str, block_hash: int) -> bool:
        """Whether ``name`` holds ``block_hash`` as an unconfirmed speculative entry. Does not mutate."""
        i = self._id_of.get(name)
        return i is not None and block_hash in self._spec[i]

    def total_blocks(self) -> int:
        """Distinct hashes held by any instance, really or speculatively. Does not mutate."""
        return len(self._holders)

    # ----------------------------------------------------------------------------------------- events

    def _unset(self, h: int, bit: int) -> None:
        m = self._holders[h] & ~bit
        if m:
            self._holders[h] = m
        else:
            del self._holders[h]
            self._parent.pop(h, None)

    def _drop_all(self, i: int, bit: int) -> None:
        unset = self._unset
        for h in self._real[i]:
            unset(h, bit)
        for h in self._spec[i]:
            unset(h, bit)
        self._real[i] = set()
        self._spec[i] = OrderedDict()

    def _apply(self, i: int, ev: KVEvent) -> None:
        stats = self.stats
        if isinstance(ev, BlockStored):
            if ev.block_size != self._block_size:
                stats.block_size_mismatch += 1
                return
            bit = 1 << i
            real = self._real[i]
            spec = self._spec[i]
            holders = self._holders
            parent = self._parent
            prev = ev.parent_block_hash
            if prev is not None and prev not in real:
                stats.unknown_parent += 1  # applied anyway: SGLang can evict a parent before its child
            for h in ev.block_hashes:
                m = holders.get(h)
                holders[h] = bit if m is None else m | bit  # one shared int for sole holders: saves memory
                parent[h] = prev
                real.add(h)
                if spec and h in spec:
                    del spec[h]
                    stats.speculative_confirmed += 1
                prev = h
        elif isinstance(ev, BlockRemoved):
            bit = 1 << i
            real = self._real[i]
            spec = self._spec[i]
            for h in ev.block_hashes:
                if h in real:
                    real.discard(h)
                    self._unset(h, bit)
                else:
                    stats.unknown_removed += 1
                    if h in spec:
                        del spec[h]
                        self._unset(h, bit)
        elif isinstance(ev, AllBlocksCleared):
            self._drop_all(i, 1 << i)
        else:
            stats.unknown_event += 1
            return
        stats.events_applied += 1

    def apply(self, name: str, event: KVEvent) -> None:
        """Apply one engine event of instance ``name`` (auto-added if unknown). Mutates; never raises.

        ``BlockStored``: ``name`` now really holds each hash (confirming speculative ones); the first hash's
        parent is ``parent_block_hash``, each later one's the hash before it. Skipped and counted if its
        ``block_size`` is not the index's; applied but counted if its parent is not held by ``name``.
        ``BlockRemoved``: drops the hashes ``name`` holds (and speculative entries for them); counts the
        others. ``AllBlocksCleared``: drops everything ``name`` holds, speculative entries included.
        """
        self._apply(self._intern(name), event)

    def apply_batch(self, name: str, events: Iterable[KVEvent]) -> None:
        """Apply ``events`` in order, as :meth:`apply` does. Mutates; never raises on event content."""
        i = self._intern(name)
        for ev in events:
            self._apply(i, ev)

    def replace_instance(self, name: str, events: Iterable[KVEvent]) -> None:
        """Replace all that ``name`` holds with the state ``events`` build from empty (e.g. a snapshot).

        Atomic: the new state is built aside and swapped in only once ``events`` is exhausted, so an
        exception while iterating leaves the index untouched. Drops all of ``name``'s speculative entries.
        Counts odd events like :meth:`apply`. Mutates; raises only what iterating ``events`` raises.
        """
        bs = self._block_size
        new: set[int] = set()
        new_parent: dict[int, int | None] = {}
        delta = IndexStats()
        for ev in events:
            if isinstance(ev, BlockStored):
                if ev.block_size != bs:
                    delta.block_size_mismatch += 1
                    continue
                prev = ev.parent_block_hash
                if prev is not None and prev not in new:
                    delta.unknown_parent += 1
                for h in ev.block_hashes:
                    new.add(h)
                    new_parent[h] = prev
                    prev = h
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    if h in new:
                        new.discard(h)
                        del new_parent[h]
                    else:
                        delta.unknown_removed += 1
            elif isinstance(ev, AllBlocksCleared):
                new.clear()
                new_parent.clear()
            else:
                delta.unknown_event += 1
                continue
            delta.events_applied += 1
        # Swap: nothing below can raise.
        i = self._intern(name)
        bit = 1 << i
        unset = self._unset
        for h in self._real[i]:
            if h not in new:
                unset(h, bit)
        for h in self._spec[i]:
            if h not in new:
                unset(h, bit)
        holders = self._holders
        parent = self._parent
        for h in new:
            m = holders.get(h)
            holders[h] = bit if m is None else m | bit
            parent[h] = new_parent[h]
        self._real[i] = new
        self._spec[i] = OrderedDict()
        self.stats.add(delta)

    # --------------------------------------------------------------------------------------- matching

    def match(self, token_ids: Sequence[int]) -> MatchResult:
        """Per-instance cached prefix of a prompt of ``token_ids`` (see :class:`MatchResult`). Pure.

        Raises ``struct.error`` if a token id does not fit in uint32 (from :mod:`kvindex.hashing`).
        """
        hashes = block_hashes(token_ids, self._block_size)
        return self.match_hashes(hashes, len(token_ids))

    def match_hashes(self, hashes: Sequence[int], prompt_tokens: int | None = None) -> MatchResult:
        """Per-instance cached prefix of a request whose full-page block hashes are ``hashes``. Pure.

        Speculative entries count like real ones. ``prompt_tokens`` is passed through to the result.
        """
        get = self._holders.get
        alive = self._all_mask
        dropped_at: dict[int, int] = {}
        depth = 0
        for h in hashes:
            if not alive:
                break
            new = alive & get(h, 0)
            if new != alive:
                gone = alive ^ new
                while gone:
                    low = gone & -gone
                    dropped_at[low.bit_length() - 1] = depth
                    gone ^= low
                alive = new
            depth += 1
        # Instances still alive hold every hash walked; every other one has its drop depth recorded.
        bs = self._block_size
        cached = {name: dropped_at.get(i, depth) * bs for name, i in self._id_of.items()}
        return MatchResult(cached, tuple(hashes), prompt_tokens, bs)

    # ------------------------------------------------------------------------------------ speculative

    def insert_speculative(self, name: str, hashes: Sequence[int], now: float) -> int:
        """Record that ``name`` will soon hold ``hashes`` (auto-added if unknown). Mutates; never raises.

        ``now`` is the caller's clock in seconds (non-decreasing across calls). Hashes ``name`` really holds
        are skipped; an existing speculative entry is refreshed to ``now``. If ``name`` then has more than
        ``max_speculative_per_instance`` entries, its oldest are evicted (``stats.speculative_evicted``).
        Returns the number of entries newly added.
        """
        i = self._intern(name)
        bit = 1 << i
        real = self._real[i]
        spec = self._spec[i]
        holders = self._holders
        added = 0
        for h in hashes:
            if h in real:
                continue
            if h in spec:
                spec.move_to_end(h)
            else:
                holders[h] = holders.get(h, 0) | bit
                added += 1
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
        blocks. Returns ``[]`` for an unknown name.
        """
        i = self._id_of.get(name)
        if i is None:
            return []
        bs = self._block_size
        return [
            BlockStored(tuple(chain), parent, (), bs)
            for parent, chain in prefix_chains(self._real[i], self._parent)
        ]

    def check_invariants(self) -> None:
        """Assert the invariants in the module docstring (O(total blocks); for tests). Pure.

        Raises ``AssertionError`` if one is broken.
        """
        expect: dict[int, int] = {}
        for i, name in enumerate(self._names):
            if name is None:
                assert not self._real[i] and not self._spec[i], f"freed id {i} holds blocks"
                continue
            assert self._id_of[name] == i
            assert not (self._real[i] & self._spec[i].keys()), f"{name}: real and speculative overlap"
            for h in self._real[i]:
                expect[h] = expect.get(h, 0) | (1 << i)
                assert h in self._parent, f"{name}: block {h} without parent entry"
            for h in self._spec[i]:
                expect[h] = expect.get(h, 0) | (1 << i)
        assert expect == self._holders, "holders masks disagree with per-instance sets"
        assert self._all_mask == sum(1 << i for i in self._id_of.values())
