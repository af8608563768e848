"""What a router without agents believes an engine holds: the blocks it routed there, in a bounded LRU.

sglang-router keeps such a tree (over text) for each worker; so does :class:`RoutedBlocks`, over block
hashes, for one static instance (``python -m router --worker-urls ...``: no agent reports the engine's
KV events). Each request routed to the instance is recorded as held, and the blocks that fall out of
the LRU come back as a ``BlockRemoved`` the index applies, so the index stays as large as the engine's
cache, never larger. It drifts from the engine's real cache (the engine evicts by its own LRU, restarts,
is flushed): that is what the agents' exact index fixes.

Recency is kept leaf-first, like a radix cache: a request's blocks are touched from its last page to its
first, so a shared prefix is always more recent than the suffixes hanging off it, and eviction takes
suffixes before the prefix they hang from (a prefix evicted first would make every longer match stop
at it). The per-request work runs in C (``map`` over ``OrderedDict`` methods): no Python bytecode per
block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import repeat

from kvindex.protocol.sglang import BlockRemoved, BlockStored, KVEvent

__all__ = ["RoutedBlocks"]


class RoutedBlocks:
    """A bounded LRU of the block hashes routed to one instance (module docstring). Single owner.

    Args:
        capacity_blocks: blocks held at most (> 0); the engine's KV capacity over its page size.
        block_size: tokens per block, stamped on the ``BlockStored`` events.

    Raises:
        ValueError: ``capacity_blocks`` or ``block_size`` is not positive.
    """

    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.capacity = capacity_blocks
        self.block_size = block_size
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.evicted = 0
        """Blocks dropped for capacity so far."""

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._lru

    def record(self, hashes: Sequence[int], held_prefix: int = 0) -> list[KVEvent]:
        """A request whose chained block hashes are ``hashes`` (root first) was routed here: hold them.
        Mutates.

        ``held_prefix``: how many of the first hashes are known to be held (the index's match for this
        instance, where the index holds exactly this LRU's blocks): they are moved, not looked up.

        Raises:
            KeyError: ``held_prefix`` counts a block that is not held (a caller's bug; the LRU is then
                left with the request's new blocks recorded and not all of its blocks moved).

        Returns the events that bring an index entry of this instance up to date: one ``BlockStored``
        per run of blocks not held before (parent: the block before the run), then one ``BlockRemoved``
        of the blocks evicted to stay within capacity (never blocks of this request). A request longer
        than the capacity is recorded up to the capacity.
        """
        if len(hashes) > self.capacity:
            hashes = hashes[: self.capacity]
        k = max(0, min(held_prefix, len(hashes)))
        lru = self._lru
        rest = hashes[k:]
        held = list(map(lru.__contains__, rest))
        events: list[KVEvent] = []
        if not all(held):
            events = self._runs(hashes, k, held)
            lru.update(zip(rest, repeat(None)))
        # Every block moves to the end, leaf first, so the request's root ends the most recent (one C
        # loop; a KeyError here means a wrong ``held_prefix``).
        deque(map(lru.move_to_end, reversed(hashes)), maxlen=0)
        over = len(lru) - self.capacity
        if over > 0:
            gone = [lru.popitem(last=False)[0] for _ in range(over)]
            self.evicted += over
            events.append(BlockRemoved(tuple(gone)))
        return events

    def _runs(self, hashes: Sequence[int], offset: int, held: list[bool]) -> list[KVEvent]:
        """``BlockStored`` runs of the blocks of ``hashes[offset:]`` not ``held``."""
        first = held.index(False)
        if True not in held[first:]:  # the usual shape: a held prefix, then new blocks to the end
            return [self._stored(hashes, offset + first, len(hashes))]
        out: list[KVEvent] = []
        start = -1
        held = [True] * offset + held
        for k, h in enumerate(held):  # Python per block, only when held and new blocks interleave
            if not h and start < 0:
                start = k
            elif h and start >= 0:
                out.append(self._stored(hashes, start, k))
                start = -1
        if start >= 0:
            out.append(self._stored(hashes, start, len(hashes)))
        return out

    def _stored(self, hashes: Sequence[int], a: int, b: int) -> BlockStored:
        parent = hashes[a - 1] if a > 0 else None
        return BlockStored(tuple(hashes[a:b]), parent, (), self.block_size)

    def clear(self) -> None:
        """Forget every block (the engine was flushed or restarted). Mutates."""
        self._lru.clear()
