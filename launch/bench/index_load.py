"""The workload of :mod:`launch.bench.index_bench`: a real trace turned into the agents' event-batch payloads. Pure but for
reading the trace file.

A trace request (Mooncake format: one id per 512-token block, prefix-chained) is stored on one instance,
picked by a hash of its first TWO block ids: every Mooncake request starts with the same block (a shared
system prompt), which so lands on every instance, while the turns of a conversation (which share their
first two ids and more) stick to one instance, as a cache-aware router makes them. Token ids follow
:mod:`launch.trace`'s rule (block ``h`` -> ``default_rng(h).integers(0, 32000, 512)``) and every full page
gets its real SGLang chained hash. An instance stores only the pages it does not hold yet, as SGLang's
radix cache does, so ``BlockStored`` events carry exactly the trace's reuse. New pages are cut into events
of at most :data:`CHUNK_TOKENS` tokens, one event per batch (SGLang publishes per prefill chunk), each
encoded as the agent's :class:`~kvindex.protocol.EventBatch` message without token ids (as agents publish
by default; ``--publish-token-ids`` adds them): the bytes the router receives.

Size: ``blocks`` counts resident (instance, block) pairs. One pass over the Mooncake trace holds ~5.7 M
pairs of 16 tokens; to go further the trace is replayed again as an independent *tenant* (every block id
shifted by one offset: a new system prompt and new conversations with exactly the trace's reuse
statistics), until ``blocks`` is reached; the last event is cut to land on it exactly. No evictions.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from kvindex.hashing import block_hashes_of, chained_digests_packed
from kvindex.protocol import BlockRemoved, BlockStored, EventBatch, decode_message, encode_message
from launch.trace import DEFAULT_VOCAB_SIZE, TRACE_BLOCK_TOKENS, TraceRequest

__all__ = ["CHUNK_TOKENS", "Workload", "block_tokens", "build_workload", "eviction_payloads"]

CHUNK_TOKENS = 8192
"""Tokens per ``BlockStored`` event at most (SGLang's default ``--chunked-prefill-size``)."""

U32Array = np.ndarray[Any, np.dtype[np.uint32]]
I64Array = np.ndarray[Any, np.dtype[np.int64]]


@lru_cache(maxsize=4096)
def block_tokens(block_id: int) -> U32Array:
    """Trace block ``block_id``'s 512 token ids, by launch.trace's rule (tests check they agree)."""
    rng = np.random.default_rng(block_id)
    return rng.integers(0, DEFAULT_VOCAB_SIZE, TRACE_BLOCK_TOKENS).astype("<u4")


@dataclass(slots=True)
class Workload:
    """Encoded payloads ``(instance name, EventBatch message bytes)``, in send order, and what they hold.

    ``query_requests`` are trace requests of the first tenant that were stored whole and have at least
    the prompt length asked for (cache hits for a match benchmark).
    """

    payloads: list[tuple[str, bytes]]
    names: list[str]
    residencies: int
    tenants: int
    requests: int
    events: int
    query_requests: list[TraceRequest]


class _Builder:
    """Replays trace requests onto instances and encodes the pages each instance newly stores."""

    def __init__(self, instances: int, blocks: int, block_size: int) -> None:
        self.target = blocks
        self.bs = block_size
        self.pages = TRACE_BLOCK_TOKENS // block_size
        self.names = [f"engine-{k}" for k in range(instances)]
        self.held: list[dict[int, int]] = [{} for _ in range(instances)]  # trace block -> pages held
        self.hashes: dict[int, I64Array] = {}
        self.last_digest: dict[int, bytes] = {}
        self.payloads: list[tuple[str, bytes]] = []
        self.residencies = 0
        self.events = 0

    def _page_hashes(self, ids: Sequence[int], k: int) -> I64Array:
        h = ids[k]
        out = self.hashes.get(h)
        if out is None:  # ids are prefix-chained: block k-1 was hashed before block k
            parent = self.last_digest[ids[k - 1]] if k else None
            digests = chained_digests_packed(block_tokens(h).tobytes(), self.bs, parent)
            out = np.array(block_hashes_of(digests), dtype=np.int64)
            self.hashes[h] = out
            self.last_digest[h] = digests[-1]
        return out

    def replay(self, req: TraceRequest, ids: Sequence[int], ts: float) -> bool:
        """Store ``req`` (block ids ``ids``) on its instance; False once the target is reached."""
        inst = zlib.crc32(repr(tuple(ids[:2])).encode()) % len(self.names)
        held = self.held[inst]
        run_h: list[int] = []
        run_parent: int | None = None
        n = len(ids)
        for k, h in enumerate(ids):
            need = self.pages if k < n - 1 else (req.input_length - TRACE_BLOCK_TOKENS * (n - 1)) // self.bs
            have = held.get(h, 0)
            if need <= have:
                continue
            need = min(need, have + self.target - self.residencies - len(run_h))
            hs = self._page_hashes(ids, k)
            parent = int(hs[have - 1]) if have else (int(self._page_hashes(ids, k - 1)[-1]) if k else None)
            if run_h and parent != run_h[-1]:
                self._emit(inst, run_h, run_parent, ts)
                run_h = []
            if not run_h:
                run_parent = parent
            run_h.extend(hs[have:need].tolist())
            held[h] = need
            if self.residencies + len(run_h) >= self.target:
                break
        if run_h:
            self._emit(inst, run_h, run_parent, ts)
        return self.residencies < self.target

    def _emit(self, inst: int, hashes: list[int], parent: int | None, ts: float) -> None:
        per = CHUNK_TOKENS // self.bs
        for a in range(0, len(hashes), per):
            hs = hashes[a : a + per]
            ev = BlockStored(tuple(hs), parent, (), self.bs)  # agents publish no token ids by default
            name = self.names[inst]
            self.payloads.append((name, encode_message(EventBatch(name, 0, self.events, ts, (ev,)))))
            parent = hs[-1]
            self.events += 1
        self.residencies += len(hashes)


def build_workload(
    reqs: Sequence[TraceRequest], instances: int, blocks: int, block_size: int, prompt_tokens: int
) -> Workload:
    """Replay ``reqs`` (then shifted copies: new tenants) until ``blocks`` pairs are resident.

    Raises ``ValueError`` if ``block_size`` does not divide 512 or the trace stores no full block.
    """
    if block_size <= 0 or TRACE_BLOCK_TOKENS % block_size:
        raise ValueError(f"block_size must divide {TRACE_BLOCK_TOKENS}, got {block_size}")
    b = _Builder(instances, blocks, block_size)
    stride = 1 + max(max(r.hash_ids, default=0) for r in reqs)
    query: list[TraceRequest] = []
    tenant = replayed = 0
    going = True
    while going:
        for req in reqs:
            ids = [h + tenant * stride for h in req.hash_ids] if tenant else req.hash_ids
            going = b.replay(req, ids, req.arrival + tenant * 3600.0)
            replayed += 1
            if going and tenant == 0 and req.input_length >= prompt_tokens:
                query.append(req)
            if not going:
                break
        tenant += 1
        if going and b.residencies == 0:
            raise ValueError("the trace stores no full block")
    if not query:  # tiny workloads: prompts whose prefix mostly misses
        query = [r for r in reqs if r.input_length >= prompt_tokens][:1000]
    return Workload(b.payloads, b.names, b.residencies, tenant, replayed, b.events, query)


def eviction_payloads(wl: Workload, fraction: float) -> tuple[list[tuple[str, bytes]], int]:
    """``BlockRemoved`` payloads evicting the oldest ``fraction`` of every instance's stored blocks.

    Each stored event is undone by one removal event, leaves first (as LRU eviction goes); instances take
    turns, as concurrent engines would. Returns the payloads and the number of blocks they remove.
    """
    per_inst: dict[str, list[bytes]] = {n: [] for n in wl.names}
    stored: dict[str, int] = dict.fromkeys(wl.names, 0)
    batches = [(name, _stored_hashes(payload)) for name, payload in wl.payloads]
    for name, runs in batches:
        stored[name] += sum(len(hs) for hs in runs)
    budget = {n: int(stored[n] * fraction) for n in wl.names}
    for name, runs in batches:
        for hs in runs:
            take = min(len(hs), budget[name])
            if take <= 0:
                continue
            budget[name] -= take
            gone = BlockRemoved(tuple(reversed(hs[len(hs) - take :])))
            seq = len(per_inst[name])
            per_inst[name].append(encode_message(EventBatch(name, 0, seq, 0.0, (gone,))))
    out: list[tuple[str, bytes]] = []
    queues = [(n, q) for n, q in per_inst.items() if q]
    for k in range(max((len(q) for _n, q in queues), default=0)):
        out.extend((n, q[k]) for n, q in queues if k < len(q))
    removed = sum(int(stored[n] * fraction) - budget[n] for n in wl.names)
    return out, removed


def _stored_hashes(payload: bytes) -> list[tuple[int, ...]]:
    msg = decode_message(payload)
    assert isinstance(msg, EventBatch)
    return [e.block_hashes for e in msg.events if isinstance(e, BlockStored)]
