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

Data layout (chosen for memory: ~84 bytes of RSS per resident (instance, block) pair at 10 million of
them, against 154 for the previous per-instance sets and global parent map; ``docs/kvindex.md``
has the measurements):

* ``holders: dict[int, int]`` -- the ONLY per-hash structure. A bit means "holds it, really or
  speculatively". A sole holder's mask is the shared ``1 << id`` int, so a block held once costs its dict
  slot and its key int, nothing else.
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

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from operator import and_, eq

from kvindex.blocklog import BlockLog
from kvindex.hashing import block_hashes
from kvindex.index_core import CHUNK, IndexCore, IndexStats
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
        """Per hash, truthy iff instance ``i`` really holds it (look-ups from C: misses overlap)."""
        bit = 1 << i
        masks = list(map(self._holders.get, hashes, repeat(0)))
        spec = self._spec[i]
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
        # The hot loop of ingestion, in C: setdefault inserts every new block with the shared ``bit``
        # int as its mask (a sole holder costs no int object); new keys are counted by the dict's growth.
        n0 = len(holders)
        masks = list(map(holders.setdefault, hashes, repeat(bit)))
        added = 0
        if not all(map(bit.__and__, masks)):  # some blocks were held by other instances only
            for h in hashes:
                m = holders[h]  # re-read: a hash may occur twice
                if not m & bit:
                    holders[h] = m | bit
                    added += 1
        if spec:
            for h in filter(spec.__contains__, hashes):  # lazy: a duplicate is not seen twice
                del spec[h]
                stats.speculative_confirmed += 1
                added += 1
        self._count[i] += len(holders) - n0 + added
        stats.events_applied += 1
        if log.compacting or len(log) > 2 * self._count[i] + LOG_SLACK:
            self._maybe_compact(i, len(hashes))

    def _remove(self, i: int, hashes: Sequence[int]) -> None:
        bit = 1 << i
        holders = self._holders
        get = holders.get
        spec = self._spec[i]
        removed = unknown = 0
        for a in range(0, len(hashes), CHUNK):
            chunk = hashes[a : a + CHUNK]
            deque(map(get, chunk), maxlen=0)  # warm the cache, misses overlapped
            for h in chunk:
                m = get(h)
                if m is None or not m & bit:
                    unknown += 1
                    continue
                if spec and h in spec:  # not really held: counted, but its speculative entry goes too
                    del spec[h]
                    unknown += 1
                else:
                    removed += 1
                m ^= bit
                if m:
                    holders[h] = m
                else:
                    del holders[h]
        self._count[i] -= removed
        self.stats.unknown_removed += unknown
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
        holders = self._holders
        fresh = list(new)
        masks = list(map(holders.setdefault, fresh, repeat(bit)))
        if not all(map(bit.__and__, masks)):
            for h in fresh:
                m = holders[h]
                if not m & bit:
                    holders[h] = m | bit
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
        get = self._holders.get
        alive = self._all_mask
        dropped_at: dict[int, int] = {}
        depth = 0
        n = len(hashes)
        size = _MATCH_CHUNK
        # Look-ups a chunk at a time from C (misses overlap; chunks double, so a prompt that matches
        # nothing costs one small chunk). Inside a chunk the walk runs in C too: the next hash where the
        # set of instances still matching shrinks is found with map + list.index, so Python runs once per
        # instance dropping out, not once per block.
        while depth < n and alive:
            masks = list(map(get, hashes[depth : depth + size], repeat(0)))
            j = 0
            while alive:
                try:
                    if alive & (alive - 1):  # several instances still match: all of them must hold it
                        k = j + list(map(eq, map(and_, masks[j:], repeat(alive)), repeat(alive))).index(False)
                    else:  # one instance (the usual case past the first block): it must hold it
                        k = j + list(map(and_, masks[j:], repeat(alive))).index(0)
                except ValueError:  # every instance still matching holds the rest of the chunk
                    break
                new = alive & masks[k]
                gone = alive ^ new
                while gone:
                    low = gone & -gone
                    dropped_at[low.bit_length() - 1] = depth + k
                    gone ^= low
                alive = new
                j = k + 1
            if not alive:
                depth += k
                break
            depth += len(masks)
            size *= 2
        # Instances still alive hold every hash walked; every other one has its drop depth recorded.
        bs = self._block_size
        cached = {name: dropped_at.get(i, depth) * bs for name, i in self._id_of.items()}
        return MatchResult(cached, tuple(hashes), prompt_tokens, bs)
