"""Token ids and router block hashes of trace requests, built once per trace block. Pure.

A replay turns every request into ``input_length`` token ids (:func:`launch.trace.prompt_tokens`) and the
router hashes them in ``page_size`` pages (:mod:`kvindex.hashing`). For an hour of Mooncake trace that is
145 M tokens and 9 M SHA-256 pages, most of them repeated: requests that share a ``hash_id`` at block
position ``k`` share the whole prefix up to ``k``. :class:`PromptFactory` therefore

* synthesises each 512-token trace block once (same formula as :mod:`launch.trace`, so the ids are
  identical to what ``launch replay`` sends) into a tuple whose int objects are shared by every block
  (tuple comparisons in the engine's radix cache then short-cut on identity), kept in a bounded LRU;
* hashes each block once per *chain position*: an entry keyed by (parent entry, block id) keeps the
  block's page hashes and the last page digest, so a request's hashes are the concatenation of its blocks'
  entries (the last, partial block uses a prefix of its entry). Bit-identical to hashing the whole prompt
  (tests check it). Needs ``page_size`` to divide 512; otherwise every prompt is hashed whole.

Memory: an entry costs ~8 bytes per page hash (``array('q')``); the full Mooncake hour has ~183 k distinct
blocks, ~60 MB at 16-token pages.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from operator import itemgetter

import numpy as np

from kvindex.hashing import block_hashes, block_hashes_of, chained_digests
from launch.trace import DEFAULT_VOCAB_SIZE, TRACE_BLOCK_TOKENS, TraceError, TraceRequest

__all__ = ["PromptFactory"]


class PromptFactory:
    """Prompt token ids and full-page block hashes of :class:`TraceRequest` s, memoised per block.

    Args:
        page_size: the cluster block size in tokens (the router's and the engines' page size).
        vocab_size: token ids are drawn in ``[0, vocab_size)`` (as ``launch replay --vocab-size``).
        max_cached_blocks: synthesised blocks kept (LRU); ~4 KB each.
    """

    def __init__(
        self, page_size: int, vocab_size: int = DEFAULT_VOCAB_SIZE, max_cached_blocks: int = 65536
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self.vocab_size = vocab_size
        self._ints = list(range(vocab_size))  # shared int objects for every token id
        self._blocks: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._max_blocks = max(1, max_cached_blocks)
        self._aligned = TRACE_BLOCK_TOKENS % page_size == 0
        # (parent entry id, block id) -> (entry id, last page digest, page hashes of the full block)
        self._chain: dict[tuple[int, int], tuple[int, bytes, array[int]]] = {}
        self.blocks_synthesised = 0
        self.blocks_hashed = 0

    def block(self, block_id: int) -> tuple[int, ...]:
        """The 512 token ids of trace block ``block_id`` (as :func:`launch.trace.prompt_tokens`)."""
        got = self._blocks.get(block_id)
        if got is not None:
            self._blocks.move_to_end(block_id)
            return got
        raw = np.random.default_rng(block_id).integers(0, self.vocab_size, TRACE_BLOCK_TOKENS).tolist()
        toks: tuple[int, ...] = itemgetter(*raw)(self._ints)  # one C call; shared int objects
        self.blocks_synthesised += 1
        self._blocks[block_id] = toks
        if len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)
        return toks

    def _needed(self, req: TraceRequest) -> tuple[int, ...]:
        need = -(-req.input_length // TRACE_BLOCK_TOKENS)
        if len(req.hash_ids) < need:
            raise TraceError(
                f"request {req.index}: {len(req.hash_ids)} hash_ids for {req.input_length} tokens"
            )
        return req.hash_ids[:need]

    def tokens(self, req: TraceRequest) -> tuple[int, ...]:
        """The request's ``input_length`` prompt token ids. Raises :class:`TraceError` (too few ids)."""
        out: list[int] = []
        for h in self._needed(req):
            out.extend(self.block(h))
        del out[req.input_length :]
        return tuple(out)

    def hashes(self, req: TraceRequest, tokens: tuple[int, ...] | None = None) -> array[int]:
        """Published int64 hashes of every full ``page_size`` page of the request's prompt, in order.

        ``tokens`` (the request's :meth:`tokens`) is used only when ``page_size`` does not divide 512.
        """
        p = self.page_size
        if not self._aligned:
            toks = self.tokens(req) if tokens is None else tokens
            return array("q", block_hashes(toks, p))
        out = array("q")
        parent_id, parent_digest = 0, None
        remaining = req.input_length
        for h in self._needed(req):
            entry = self._chain.get((parent_id, h))
            if entry is None:
                digests = chained_digests(self.block(h), p, parent_digest)
                entry = (len(self._chain) + 1, digests[-1], array("q", block_hashes_of(digests)))
                self._chain[(parent_id, h)] = entry
                self.blocks_hashed += 1
            parent_id, parent_digest, page_hashes = entry
            if remaining >= TRACE_BLOCK_TOKENS:
                out.extend(page_hashes)
            else:
                out.extend(page_hashes[: remaining // p])
            remaining -= TRACE_BLOCK_TOKENS
        return out
