"""The agent's exact copy of ONE engine's cached blocks, able to answer a full snapshot. Pure: no I/O.

The agent applies every event its engine publishes (after gap repair) to a :class:`BlockMirror`; a router
that joins late, restarts or lost more than the engine's replay buffer asks the agent for a snapshot, which
is :meth:`BlockMirror.snapshot_events`: every block as ``BlockStored`` events, parents first, with token ids
and parent hashes, so that ``GlobalIndex.replace_instance`` or another mirror rebuilt from them is equal.

The mirror keeps, per block hash, its parent hash and its tokens (a ``block_size``-long tuple, or ``()``
when the event carried none). All blocks share one block size: fixed by the constructor or by the first
``BlockStored`` seen. Tolerance rules are the index's: odd events are counted in :class:`MirrorStats`
and skipped (or applied, for an unknown parent), never raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kvindex.chains import prefix_chains
from kvindex.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["BlockMirror", "MirrorStats"]


@dataclass(slots=True)
class MirrorStats:
    """Counters of odd input (event or block counts, monotonic)."""

    block_size_mismatch: int = 0
    """``BlockStored`` events skipped because their ``block_size`` differs from the mirror's."""
    unknown_parent: int = 0
    """``BlockStored`` events applied although their parent was not in the mirror."""
    unknown_removed: int = 0
    """Hashes in ``BlockRemoved`` events that were not in the mirror; skipped."""
    token_mismatch: int = 0
    """``BlockStored`` events whose ``token_ids`` were neither empty nor blocks x block_size long; their
    blocks are stored without tokens."""
    unknown_event: int = 0
    """Objects that are none of the three event types; skipped."""
    events_applied: int = 0
    """Events applied, skipped ones excluded."""


class BlockMirror:
    """Block hash -> (parent hash, token ids) of one engine's cache. Single-owner, not thread-safe.

    ``block_size`` is in tokens per block; ``None`` lets the first ``BlockStored`` fix it. Raises
    ``ValueError`` if it is given and not positive.
    """

    __slots__ = ("_block_size", "_parent", "_tokens", "stats")

    def __init__(self, block_size: int | None = None) -> None:
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._block_size = block_size
        self._parent: dict[int, int | None] = {}
        self._tokens: dict[int, tuple[int, ...]] = {}
        self.stats = MirrorStats()

    @property
    def block_size(self) -> int | None:
        """Tokens per block; ``None`` until given or fixed by the first ``BlockStored``."""
        return self._block_size

    def __len__(self) -> int:
        """Number of cached blocks."""
        return len(self._parent)

    def __contains__(self, block_hash: object) -> bool:
        """Whether ``block_hash`` is cached."""
        return block_hash in self._parent

    def __iter__(self) -> Iterator[int]:
        """The cached block hashes, in insertion order."""
        return iter(self._parent)

    def __eq__(self, other: object) -> bool:
        """Same blocks with the same parents and tokens (and the same block size unless both are empty)."""
        if not isinstance(other, BlockMirror):
            return NotImplemented
        if self._parent != other._parent or self._tokens != other._tokens:
            return False
        return not self._parent or self._block_size == other._block_size

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"BlockMirror(block_size={self._block_size}, blocks={len(self._parent)})"

    def parent_of(self, block_hash: int) -> int | None:
        """The parent hash of a cached block (``None`` at the root). Raises ``KeyError`` if not cached."""
        return self._parent[block_hash]

    def tokens_of(self, block_hash: int) -> tuple[int, ...]:
        """The token ids of a cached block (``()`` if unknown). Raises ``KeyError`` if not cached."""
        return self._tokens[block_hash]

    def clear(self) -> None:
        """Drop every block (keeps the block size and the counters). Mutates."""
        self._parent.clear()
        self._tokens.clear()

    def apply(self, event: KVEvent) -> None:
        """Apply one engine event. Mutates; never raises on event content.

        ``BlockStored``: each hash is cached with its parent (``parent_block_hash`` for the first, the hash
        before it for the others) and its slice of ``token_ids``; skipped and counted if its ``block_size``
        is not the mirror's; applied but counted if its parent is not cached. ``BlockRemoved``: uncaches the
        hashes, counting those not cached. ``AllBlocksCleared``: :meth:`clear`.
        """
        stats = self.stats
        if isinstance(event, BlockStored):
            bs = event.block_size
            if self._block_size is None and bs > 0:
                self._block_size = bs
            if bs != self._block_size:
                stats.block_size_mismatch += 1
                return
            parent = self._parent
            tokens = self._tokens
            prev = event.parent_block_hash
            if prev is not None and prev not in parent:
                stats.unknown_parent += 1
            toks = event.token_ids
            if toks and len(toks) != len(event.block_hashes) * bs:
                stats.token_mismatch += 1
                toks = ()
            for k, h in enumerate(event.block_hashes):
                parent[h] = prev
                tokens[h] = toks[k * bs : (k + 1) * bs] if toks else ()
                prev = h
        elif isinstance(event, BlockRemoved):
            for h in event.block_hashes:
                if h in self._parent:
                    del self._parent[h]
                    del self._tokens[h]
                else:
                    stats.unknown_removed += 1
        elif isinstance(event, AllBlocksCleared):
            self.clear()
        else:
            stats.unknown_event += 1
            return
        stats.events_applied += 1

    def apply_batch(self, events: Iterable[KVEvent]) -> None:
        """Apply ``events`` in order, as :meth:`apply` does. Mutates; never raises on event content."""
        for ev in events:
            self.apply(ev)

    def snapshot_events(self) -> list[BlockStored]:
        """Every cached block as ``BlockStored`` events, each parent before its children. Pure.

        A run of blocks where each is the only cached child of the one before goes in one event (split
        where blocks with and without tokens meet, so each event's ``token_ids`` is empty or complete).
        Applying the events to an empty mirror, or ``GlobalIndex.replace_instance``, rebuilds this state.
        """
        bs = self._block_size
        if bs is None:
            return []
        tokens = self._tokens
        out: list[BlockStored] = []
        for first_parent, chain in prefix_chains(self._parent, self._parent):
            parent = first_parent
            start = 0
            for k in range(1, len(chain) + 1):
                if k == len(chain) or bool(tokens[chain[k]]) != bool(tokens[chain[start]]):
                    run = chain[start:k]
                    toks = tuple(t for h in run for t in tokens[h])
                    out.append(BlockStored(tuple(run), parent, toks, bs))
                    parent = run[-1]
                    start = k
        return out
