"""A paged radix cache over token ids, emitting SGLang's KV events. Pure: no I/O, no clock of its own.

Theory of operation
-------------------
The KV pool holds ``capacity`` tokens. Tokens are either *cached* (pages in the radix tree, shared by every
request with that prefix) or *private* (allocated to one running request and not yet in the tree: the
chunk being prefilled, decode tokens, a trailing partial page). ``used = cached + private`` and
``free = capacity - used``.

The tree stores only full pages of ``page_size`` tokens. Each node holds a run of pages (its ``key``, a
tuple whose length is a multiple of ``page_size``) plus, per page, the chained SHA-256 digest and the
published int64 block hash (:mod:`kvindex.hashing`); children are keyed by their first page. Matching
walks down comparing whole slices (C speed) and splits a node where a match ends inside it, so a match
always ends on a node boundary. Insertion hashes only the pages it adds, chained on the digest of the page
before, and emits one ``BlockStored`` for them (new pages of one insert are always one consecutive run).

Running requests ``lock`` the deepest node of their cached prefix: a lock counts on the node and every
ancestor, so a node with ``lock_ref > 0`` and everything above it is never evicted. ``evictable_tokens``
is the total length of unlocked nodes; because locks propagate upwards, every unlocked node can be
reached by evicting leaves, so that many tokens really can be freed.

Eviction takes whole leaves (as SGLang does), least recently used first. Recency is the pair
``(clock value passed in, logical tick)``; the tick breaks ties and makes the order total. Candidates
live in a lazy min-heap: an entry is pushed whenever a node becomes (or, being one, is touched as) an
unlocked leaf, and an entry is valid only while its tick equals the node's tick and the node is still an
attached unlocked leaf. Stale entries are skipped; the heap is rebuilt when stale entries dominate, so
the work is amortized O(log n) per event, never a scan of the cache per step.

Invariant (tested): applying the drained events in order to a set of block hashes reproduces exactly the
block hashes of the pages in the tree.
"""

from __future__ import annotations

import heapq
import sys
from array import array
from collections.abc import Sequence
from typing import NamedTuple

from kvindex.hashing import chained_digests
from kvindex.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


def _block_hashes_of(digests: Sequence[bytes]) -> list[int]:
    """``[kvindex.hashing.block_hash_of(d) for d in digests]`` (first 8 bytes, big-endian, signed) in one
    C-level conversion: this runs for every page the engine caches."""
    out = array("q")
    out.frombytes(b"".join([d[:8] for d in digests]))
    if sys.byteorder == "little":
        out.byteswap()
    return out.tolist()


class CacheBusyError(RuntimeError):
    """``flush()`` while pages are locked or allocated to running requests."""


class RadixNode:
    """A run of full pages. ``key`` holds the tokens; ``digests``/``hashes`` one entry per page."""

    __slots__ = ("children", "digests", "hashes", "key", "last_access", "lock_ref", "parent", "tick")

    def __init__(self, key: tuple[int, ...], parent: RadixNode | None) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.digests: list[bytes] = []
        self.hashes: list[int] = []
        self.lock_ref = 0
        self.last_access = 0.0
        self.tick = 0

    def __len__(self) -> int:
        return len(self.key)


class MatchResult(NamedTuple):
    """``cached_tokens`` (a multiple of the page size) matched; ``node`` is where the match ends."""

    cached_tokens: int
    node: RadixNode


class InsertResult(NamedTuple):
    """``new_tokens`` newly cached by an insert; ``node`` is where the inserted prefix ends."""

    new_tokens: int
    node: RadixNode


class RadixCache:
    """Paged prefix cache with reference-counted locks, LRU leaf eviction and KV event emission.

    Args:
        capacity: KV pool size in tokens (> 0).
        page_size: tokens per page (> 0); SGLang's ``--page-size``.
    """

    def __init__(self, capacity: int, page_size: int = 16) -> None:
        if capacity <= 0 or page_size <= 0:
            raise ValueError(f"capacity and page_size must be positive, got {capacity}, {page_size}")
        self.capacity = capacity
        self.page_size = page_size
        self._events: list[KVEvent] = []
        self._reset()

    def _reset(self) -> None:
        self.root = RadixNode((), None)
        self.root.lock_ref = 1  # the root is never evicted
        self._cached = 0
        self._evictable = 0
        self._private = 0
        self._locks = 0
        self._nodes = 1
        self._heap: list[tuple[float, int, int, RadixNode]] = []
        self._pushes = 0  # unique third key: heap entries never compare nodes
        self._tick = 0
        self._clock = 0.0

    # ------------------------------------------------------------------------------------ accounting

    @property
    def cached_tokens(self) -> int:
        """Tokens held by pages in the tree."""
        return self._cached

    @property
    def evictable_tokens(self) -> int:
        """Cached tokens in unlocked nodes (freeable by eviction)."""
        return self._evictable

    @property
    def protected_tokens(self) -> int:
        """Cached tokens in locked nodes."""
        return self._cached - self._evictable

    @property
    def private_tokens(self) -> int:
        """Tokens allocated to requests and not (yet) in the tree."""
        return self._private

    @property
    def used(self) -> int:
        """Tokens occupied in the pool: cached + private."""
        return self._cached + self._private

    @property
    def free(self) -> int:
        """Tokens free without evicting anything."""
        return self.capacity - self._cached - self._private

    @property
    def available(self) -> int:
        """Tokens that :meth:`allocate` could provide: free + evictable."""
        return self.free + self._evictable

    def allocate(self, num_tokens: int) -> bool:
        """Reserve ``num_tokens`` private tokens, evicting LRU pages if needed. Mutates.

        Returns False (allocating nothing) if even after eviction there is not enough room.
        """
        free = self.capacity - self._cached - self._private  # == self.free (inlined: once per step)
        if num_tokens > free + self._evictable:
            return False
        if num_tokens > free:
            self.evict(num_tokens - free)
        self._private += num_tokens
        assert self.free >= 0
        return True

    def release(self, num_tokens: int) -> None:
        """Return ``num_tokens`` private tokens to the pool. Mutates."""
        assert 0 <= num_tokens <= self._private, (num_tokens, self._private)
        self._private -= num_tokens

    # -------------------------------------------------------------------------------------- matching

    def _touch(self, node: RadixNode, now: float | None) -> None:
        if now is not None and now > self._clock:
            self._clock = now
        self._tick += 1
        node.last_access = self._clock
        node.tick = self._tick
        self._maybe_push(node)

    def _maybe_push(self, node: RadixNode) -> None:
        if node.lock_ref == 0 and not node.children and node.parent is not None:
            self._pushes += 1
            heapq.heappush(self._heap, (node.last_access, node.tick, self._pushes, node))
            if len(self._heap) > 4 * self._nodes + 1024:
                self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        heap: list[tuple[float, int, int, RadixNode]] = []
        stack = [self.root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n.lock_ref == 0 and n.parent is not None:
                self._pushes += 1
                heap.append((n.last_access, n.tick, self._pushes, n))
        heapq.heapify(heap)
        self._heap = heap

    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Split ``node`` after ``at`` tokens (page-aligned); returns the new upper node. ``node`` keeps
        the lower part so locks held on it stay valid."""
        pages = at // self.page_size
        parent = node.parent
        assert parent is not None and 0 < at < len(node) and at % self.page_size == 0
        upper = RadixNode(node.key[:at], parent)
        upper.digests, upper.hashes = node.digests[:pages], node.hashes[:pages]
        upper.lock_ref, upper.last_access, upper.tick = node.lock_ref, node.last_access, node.tick
        parent.children[node.key[: self.page_size]] = upper
        node.key, node.digests, node.hashes = node.key[at:], node.digests[pages:], node.hashes[pages:]
        node.parent = upper
        upper.children[node.key[: self.page_size]] = node
        self._nodes += 1
        return upper

    def _walk(self, tokens: tuple[int, ...], now: float | None, split: bool) -> tuple[int, RadixNode]:
        """Follow ``tokens`` (full pages only) from the root; returns (matched tokens, last node)."""
        p = self.page_size
        limit = len(tokens) // p * p
        node, pos = self.root, 0
        while pos < limit:
            child = node.children.get(tokens[pos : pos + p])
            if child is None:
                break
            n = len(child)
            if pos + n <= limit and child.key == tokens[pos : pos + n]:
                pos += n
                node = child
                if split:
                    self._touch(node, now)
                continue
            common = p  # the first page matched via the dict key
            while common < n and pos + common + p <= limit:
                if child.key[common : common + p] != tokens[pos + common : pos + common + p]:
                    break
                common += p
            pos += common
            if not split:
                return pos, child
            node = self._split(child, common) if common < n else child
            self._touch(node, now)
            break
        return pos, node

    def match_prefix(self, token_ids: Sequence[int], now: float | None = None) -> MatchResult:
        """Longest cached page-aligned prefix of ``token_ids``. Mutates: splits a node where the match
        ends inside it and marks the matched path as used at ``now`` (for LRU)."""
        pos, node = self._walk(tuple(token_ids), now, split=True)
        return MatchResult(pos, node)

    def peek_prefix(self, token_ids: Sequence[int]) -> int:
        """Cached page-aligned prefix length of ``token_ids`` in tokens. Does not mutate."""
        return self._walk(tuple(token_ids), None, split=False)[0]

    # --------------------------------------------------------------------------------------- locking

    def lock(self, node: RadixNode) -> None:
        """Pin ``node`` and its ancestors against eviction (reference counted). Mutates."""
        self._locks += 1
        n: RadixNode | None = node
        while n is not None and n is not self.root:
            if n.lock_ref == 0:
                self._evictable -= len(n)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one :meth:`lock` of ``node``. Mutates."""
        assert self._locks > 0
        self._locks -= 1
        n: RadixNode | None = node
        while n is not None and n is not self.root:
            assert n.lock_ref > 0
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._evictable += len(n)
                self._maybe_push(n)
            n = n.parent

    # ------------------------------------------------------------------------------------- insertion

    def insert(self, token_ids: Sequence[int], now: float | None = None) -> int:
        """Cache every full page of ``token_ids``; returns the newly cached tokens. Mutates, emits
        ``BlockStored`` for the new pages. The pool must have room (callers move private tokens)."""
        return self.insert_prefix(token_ids, now)[0]

    def insert_prefix(self, token_ids: Sequence[int], now: float | None = None) -> InsertResult:
        """Like :meth:`insert`, also returning the node where the inserted prefix ends (for locking)."""
        p = self.page_size
        tokens = tuple(token_ids[: len(token_ids) // p * p])
        pos, node = self._walk(tokens, now, split=True)
        if pos == len(tokens):
            return InsertResult(0, node)
        new_key = tokens[pos:]
        parent_digest = node.digests[-1] if node.digests else None
        leaf = RadixNode(new_key, node)
        leaf.digests = list(chained_digests(new_key, p, parent_digest))
        leaf.hashes = _block_hashes_of(leaf.digests)
        node.children[new_key[:p]] = leaf
        self._nodes += 1
        self._cached += len(new_key)
        self._evictable += len(new_key)
        assert self.used <= self.capacity, "insert without room: move private tokens first"
        self._touch(leaf, now)  # ``node`` stopped being a leaf: its heap entries go stale (validation)
        self._events.append(
            BlockStored(
                block_hashes=tuple(leaf.hashes),
                parent_block_hash=node.hashes[-1] if node.hashes else None,
                token_ids=new_key,
                block_size=p,
            )
        )
        return InsertResult(len(new_key), leaf)

    # -------------------------------------------------------------------------------------- eviction

    def evict(self, num_tokens: int) -> int:
        """Evict least-recently-used unlocked leaves until ``num_tokens`` are freed or nothing is left.
        Returns the tokens freed (whole nodes, so possibly more than asked). Mutates, emits one
        ``BlockRemoved`` for the evicted pages."""
        freed = 0
        removed: list[int] = []
        while freed < num_tokens and self._heap:  # (_maybe_push may rebuild the heap: no alias)
            _, tick, _, node = heapq.heappop(self._heap)
            parent = node.parent
            if parent is None or node.tick != tick or node.lock_ref or node.children:
                continue  # stale entry
            del parent.children[node.key[: self.page_size]]
            node.parent = None
            self._nodes -= 1
            freed += len(node)
            self._cached -= len(node)
            self._evictable -= len(node)
            removed.extend(node.hashes)
            self._maybe_push(parent)
        if removed:
            self._events.append(BlockRemoved(tuple(removed)))
        return freed

    def flush(self) -> None:
        """Drop every page; emits ``AllBlocksCleared``. Mutates.

        Raises:
            CacheBusyError: a node is locked or tokens are allocated to requests.
        """
        if self._locks or self._private:
            raise CacheBusyError(f"{self._locks} locks and {self._private} private tokens outstanding")
        self._reset()
        self._events.append(AllBlocksCleared())

    # ---------------------------------------------------------------------------------------- events

    def drain_events(self) -> list[KVEvent]:
        """The events emitted since the last call, in order. Mutates (empties the pending list)."""
        out, self._events = self._events, []
        return out

    def block_hashes(self) -> set[int]:
        """Every cached page's block hash. O(cache size): for tests and snapshots, not the hot path."""
        out: set[int] = set()
        stack = [self.root]
        while stack:
            n = stack.pop()
            out.update(n.hashes)
            stack.extend(n.children.values())
        return out
