"""The router's global prefix index: which instances hold which chained KV block. Pure: no I/O, no clock.

Theory of operation
-------------------
A published block hash (:mod:`kvindex.hashing`) is chained on its parent, so one hash names a whole token
prefix. The index is therefore a *flat* map, not a tree: ``holders[h]`` is an int bitmask over small
instance ids (instance names are interned to ``0..n-1``; a freed id is reused, lowest first, so the masks
stay small). Matching a prompt hashes its full pages and walks them from the start with an ``alive`` mask
(every known instance at first), ANDing in each block's holders; the depth at which an instance's bit
drops is its cached prefix in blocks. The walk stops as soon as ``alive`` is 0, so it costs
O(longest match) table look-ups whatever the number of instances.

Data layout (chosen for memory: ~84 bytes of RSS per resident (instance, block) pair at 10 million of
them, against 154 for the previous per-instance sets and global parent map; ``docs/kvindex.md``
has the measurements):

* ``holders`` (:mod:`kvindex.holders`: a C open-addressing table of 64-bit hashes and masks, ~16-27
  bytes a hash, or a dict with the same batch methods) -- the ONLY per-hash structure. A bit means
  "holds it, really or speculatively". Each pass over a request's blocks (the match walk, the
  speculative insert, an event's store or remove) is one call into the table.
* ``spec[id]``: the instance's speculative entries (hash -> insertion time in seconds of the caller's
  clock, in insertion order, so expiry and the per-instance cap pop from the front). Small: capped.
  An instance *really* holds ``h`` iff its bit is set and ``h`` is not in ``spec[id]``.
* ``count[id]``: how many hashes the instance really holds (kept up to date, so ``blocks_of`` is O(1)).
* ``log[id]``: a :class:`~kvindex.blocklog.BlockLog`, 8 bytes a stored block: every hash the instance
  stored, in event order, with each one's parent. It replaces per-instance sets and a global parent map:
  clearing or removing an instance walks its log (O(its blocks), not O(index)), and a dump reads parents
  from it. Removed blocks leave stale entries; once the log is over twice the instance's real blocks
  (plus :data:`LOG_SLACK`) it is compacted incrementally, :data:`COMPACT_STEP` entries per event, so it
  stays O(blocks), compaction is amortised O(1) per block and no single event pays for a whole log.

A real ``BlockStored`` of a speculative hash confirms it: it leaves ``spec[id]`` (its bit stays).
Parents are per instance (the last ``BlockStored`` of a hash on that instance wins); chaining makes them
agree across instances on good input.

Invariants (tests check them; every mutation must keep them):

1. bit ``id`` of ``holders[h]`` is set  <=>  ``h in spec[id]`` or ``h`` really held, and every really
   held ``h`` has an entry in ``log[id]``; no zero mask is stored.
2. ``count[id]`` is the number of hashes with bit ``id`` set that are not in ``spec[id]``.
3. ``spec[id]`` is ordered by insertion time when callers pass a non-decreasing ``now`` (else expiry can
   only come late, never early).

Events come from the network: nothing here raises on their content. Odd events are counted in
:class:`IndexStats` and skipped (or applied, where skipping would lose more than it saves).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from kvindex.blocklog import BlockLog
from kvindex.hashing import block_hashes
from kvindex.index_core import IndexCore, IndexStats
from kvindex.protocol.sglang import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["COMPACT_STEP", "LOG_SLACK", "GlobalIndex", "MatchResult"]


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


LOG_SLACK = 1024
"""Stale log entries an instance may carry beyond its real block count before its log is compacted."""
COMPACT_STEP = 4096
"""Log entries one event's compaction step checks at most (bounds the pause: ~1-2 ms at 10 M blocks)."""
_MATCH_CHUNK = 64


class GlobalIndex(IndexCore):
    """Block hash -> holding instances, with prefix matching, speculative entries and per-instance dumps.

    Single-owner, not thread-safe. ``block_size`` is in tokens per block (> 0), ``ttl`` in seconds (> 0),
    ``max_speculative_per_instance`` in blocks (>= 0). Raises ``ValueError`` on a bad argument.
    """

    __slots__ = ()

    # ----------------------------------------------------------------------------------------- events

    # Bulk paths first pull a chunk of lines into cache from C (see the note on speed in
    # :mod:`kvindex.index_core`), then do per-block Python logic on warm lines.

    def _live(self, i: int, hashes: Sequence[int]) -> Sequence[object]:
        """Per hash, truthy iff instance ``i`` really holds it (one call into the holder table; ``hashes``
        may be a numpy int64 array, as compaction passes, which returns a bool array)."""
        bit = 1 << i
        spec = self._spec[i]
        if isinstance(hashes, np.ndarray):
            held = np.frombuffer(self._holders.flags(hashes, bit), dtype=bool)
            if not spec:
                return held
            if len(spec) > len(hashes):  # a big speculative set: look only the held entries up in it
                live = held.copy()
                idx = np.flatnonzero(held)
                for j, h in zip(idx.tolist(), hashes[idx].tolist(), strict=True):
                    if h in spec:
                        live[j] = False
                return live
            try:
                pending = np.fromiter(spec, dtype=np.int64, count=len(spec))
            except OverflowError:  # a speculative hash outside int64 (bad input): entry by entry
                return [
                    bool(f) and h not in spec for h, f in zip(hashes.tolist(), held.tolist(), strict=True)
                ]
            return held & ~np.isin(hashes, pending)
        masks = self._holders.masks(hashes)
        if spec:
            return [m & bit and h not in spec for h, m in zip(hashes, masks, strict=True)]
        return list(map(bit.__and__, masks))

    def _maybe_compact(self, i: int, appended: int = 0) -> None:
        """One incremental compaction step of ``i``'s log if it is over its bound or a pass is running.

        A step checks :data:`COMPACT_STEP` entries plus twice what the event just appended, so a pass
        always gains on the appends and ends.
        """
        log = self._log[i]
        if not log.compacting and len(log) <= 2 * self._count[i] + LOG_SLACK:
            return
        if not log.compact_step(partial(self._live, i), COMPACT_STEP + 2 * appended):
            return
        if len(log) <= 2 * self._count[i] + LOG_SLACK:
            self._overs[i] = 0
            return
        # The pass ended over the bound: blocks removed while it ran (the next pass takes them), or, if
        # that happens twice running, duplicates of live hashes (stored again and again), which only a
        # full, deduplicating rebuild drops.
        self._overs[i] += 1
        if self._overs[i] >= 2:
            log.rebuild(self._real_parents(i).items())
            self._overs[i] = 0

    def _store(self, i: int, hashes: Sequence[int], parent: int | None, block_size: int) -> None:
        stats = self.stats
        if block_size != self._block_size:
            stats.block_size_mismatch += 1
            return
        bit = 1 << i
        holders = self._holders
        spec = self._spec[i]
        if parent is not None and not (holders.get(parent, 0) & bit and parent not in spec):
            stats.unknown_parent += 1  # applied anyway: SGLang can evict a parent before its child
        log = self._log[i]
        log.append_chain(hashes, parent)
        # The hot loop of ingestion, in one C call: the bit set on every block (a new hash inserted).
        added = len(holders.or_bit(hashes, bit))
        if spec:
            for h in filter(spec.__contains__, hashes):  # lazy: a duplicate is not seen twice
                del spec[h]
                stats.speculative_confirmed += 1
                added += 1
        self._count[i] += added
        stats.events_applied += 1
        if log.compacting or len(log) > 2 * self._count[i] + LOG_SLACK:
            self._maybe_compact(i, len(hashes))

    def _remove(self, i: int, hashes: Sequence[int]) -> None:
        spec = self._spec[i]
        cleared = self._holders.clear_bit(hashes, 1 << i)  # in one C call; a duplicate clears once
        unconfirmed = 0
        if spec:
            for h in filter(spec.__contains__, cleared):  # not really held: its speculative entry goes
                del spec[h]
                unconfirmed += 1
        removed = len(cleared) - unconfirmed
        self._count[i] -= removed
        self.stats.unknown_removed += len(hashes) - removed
        self.stats.events_applied += 1
        self._maybe_compact(i)

    def _apply(self, i: int, ev: KVEvent) -> None:
        if isinstance(ev, BlockStored):
            self._store(i, ev.block_hashes, ev.parent_block_hash, ev.block_size)
        elif isinstance(ev, BlockRemoved):
            self._remove(i, ev.block_hashes)
        elif isinstance(ev, AllBlocksCleared):
            self._drop_all(i)
            self.stats.events_applied += 1
        else:
            self.stats.unknown_event += 1

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
        new_log = BlockLog()
        delta = IndexStats()
        for ev in events:
            if isinstance(ev, BlockStored):
                if ev.block_size != bs:
                    delta.block_size_mismatch += 1
                    continue
                prev = ev.parent_block_hash
                if prev is not None and prev not in new:
                    delta.unknown_parent += 1
                new_log.append_chain(ev.block_hashes, prev)
                new.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    if h in new:
                        new.discard(h)
                    else:
                        delta.unknown_removed += 1
            elif isinstance(ev, AllBlocksCleared):
                new.clear()
                new_log.clear()
            else:
                delta.unknown_event += 1
                continue
            delta.events_applied += 1
        # Swap: nothing below can raise.
        i = self._intern(name)
        bit = 1 << i
        self._unset_many([h for h in self._log[i].hashes() if h not in new], bit)
        self._unset_many([h for h in self._spec[i] if h not in new], bit)
        self._holders.or_bit(list(new), bit)
        self._log[i] = new_log
        self._overs[i] = 0
        self._spec[i] = OrderedDict()
        self._count[i] = len(new)
        self.stats.add(delta)
        self._maybe_compact(i)

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
        alive = self._all_mask
        dropped_at: dict[int, int] = {}
        depth = 0
        if alive:
            # One C call walks the blocks, ANDing each one's holders into ``alive``; Python then runs once
            # per instance dropping out, not once per block.
            depth, drops = self._holders.walk(hashes, alive)
            for gone, at in drops:
                while gone:
                    low = gone & -gone
                    dropped_at[low.bit_length() - 1] = at
                    gone ^= low
        # Instances still alive hold every hash walked; every other one has its drop depth recorded.
        bs = self._block_size
        cached = {name: dropped_at.get(i, depth) * bs for name, i in self._id_of.items()}
        return MatchResult(cached, tuple(hashes), prompt_tokens, bs)
