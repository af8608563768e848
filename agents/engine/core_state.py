"""The emulated engine core's state, apart from the scheduling that changes it. Pure.

:class:`Seq` is one request's mutable state; :class:`EngineState` holds the queues, the radix cache and
the cumulative counters, the KV bookkeeping that scheduling and completion share (:meth:`EngineState._release`,
:meth:`EngineState._commit`) and the read-only queries (``load_stat``, ``num_running`` ...). The scheduler
is :class:`agents.engine.core.EngineCore`, a subclass; its module's docstring has the theory of operation.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Sequence
from typing import Literal

from agents.engine.core_types import EngineConfig, Request, Step
from agents.engine.profiles import Profile
from agents.engine.radix_cache import RadixCache, RadixNode
from kvindex.protocol import KVEvent, LoadStat

__all__ = ["EngineState", "Seq"]


class Seq:
    """Mutable per-request state. ``kv_len`` = tokens with KV in the pool = ``locked_len`` + private."""

    __slots__ = ("admitted", "cached_tokens", "est_uncached", "fill", "first_done", "kv_len", "locked_len",
                 "max_new", "natural_len", "node", "output", "prefilled", "req", "rng", "state", "uid")  # fmt: skip

    def __init__(self, req: Request, uid: int, max_new: int, natural_len: int, est_uncached: int) -> None:
        self.req, self.uid, self.max_new, self.natural_len = req, uid, max_new, natural_len
        self.est_uncached = est_uncached
        self.fill: tuple[int, ...] = req.prompt_ids  # what to prefill: prompt + output so far
        self.output: list[int] = []
        self.state: Literal["waiting", "prefilling", "decoding"] = "waiting"
        self.node: RadixNode | None = None
        self.locked_len = self.kv_len = self.prefilled = self.cached_tokens = 0
        self.admitted = self.first_done = False
        self.rng: random.Random | None = None


class EngineState:
    """The state of one emulated SGLang engine (one DP rank): requests, queues, cache, counters."""

    def __init__(self, config: EngineConfig, profile: Profile) -> None:
        self.config, self.profile = config, profile
        capacity = config.max_total_tokens or profile.kv_capacity_tokens()
        self.cache = RadixCache(capacity, config.page_size)
        self.max_total_num_tokens = capacity
        self._seqs: dict[str, Seq] = {}
        self._by_uid: dict[int, Seq] = {}
        self._waiting: deque[Seq] = deque()
        self._admitted: dict[int, Seq] = {}  # admission order (oldest first)
        self._prefilling: list[Seq] = []
        self._uids = itertools.count()
        self._inflight: Step | None = None
        self._ratio = config.init_new_token_ratio
        self._ratio_decay = (config.init_new_token_ratio - config.min_new_token_ratio) / max(
            1, config.new_token_ratio_decay_steps
        )
        # cumulative counters
        self.total_prefill_uncached_tokens = 0
        self.total_prefill_busy_us = 0
        self.admitted_prompt_tokens = 0
        self.admitted_cached_tokens = 0
        self.num_retractions = 0

    # ------------------------------------------------------------------------------------ KV bookkeeping

    def _release(self, s: Seq) -> None:
        """Unlock and free everything ``s`` holds; it leaves the running set."""
        if s.node is not None:
            self.cache.unlock(s.node)
        self.cache.release(s.kv_len - s.locked_len)
        s.node, s.locked_len, s.kv_len, s.prefilled = None, 0, 0, 0
        self._admitted.pop(s.uid, None)
        if s.state == "prefilling":
            self._prefilling.remove(s)

    def _commit(self, s: Seq, upto: int, now: float) -> None:
        """Insert ``s``'s first ``upto`` tokens (full pages) in the cache and move its lock there."""
        p = self.config.page_size
        aligned = upto // p * p
        if aligned <= s.locked_len:
            return
        seq = s.fill if aligned <= len(s.fill) else s.req.prompt_ids + tuple(s.output)
        # The private slots of [locked_len, aligned) become tree pages (or duplicates, freed).
        self.cache.release(aligned - s.locked_len)
        _, node = self.cache.insert_prefix(seq[:aligned], now)
        self.cache.lock(node)
        if s.node is not None:
            self.cache.unlock(s.node)
        s.node, s.locked_len = node, aligned

    # ---------------------------------------------------------------------------------------- queries

    def drain_events(self) -> list[KVEvent]:
        """KV events since the last call (evictions at schedule, inserts at complete, flushes). Mutates."""
        return self.cache.drain_events()

    def flush_cache(self) -> bool:
        """Drop the whole cache (emits ``AllBlocksCleared``). False, doing nothing, if any request is
        waiting or running (as SGLang's ``/flush_cache``)."""
        if self._seqs or self._inflight is not None:
            return False
        self.cache.flush()
        return True

    @property
    def num_running(self) -> int:
        """Admitted requests (prefilling or decoding)."""
        return len(self._admitted)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._seqs)

    @property
    def cache_hit_rate(self) -> float:
        """Cached / prompt tokens over every admission so far (0 before the first)."""
        return (
            self.admitted_cached_tokens / self.admitted_prompt_tokens if self.admitted_prompt_tokens else 0.0
        )

    def load_stat(self) -> LoadStat:
        """SGLang LoadStat of this engine. ``num_tokens`` = KV tokens pinned by running requests
        (capacity - free - evictable, SGLang's "used"); ``num_total_tokens`` = every occupied KV token
        including evictable cached pages; ``num_waiting_uncached_tokens`` = prompt tokens still to
        prefill (waiting ones estimated against the cache at arrival). O(waiting + running)."""
        c = self.cache
        queued = sum(s.est_uncached for s in self._waiting)
        queued += sum(len(s.fill) - s.prefilled for s in self._prefilling)
        return LoadStat(
            num_running_reqs=len(self._admitted),
            num_waiting_reqs=len(self._waiting),
            num_tokens=c.capacity - c.free - c.evictable_tokens,
            max_total_num_tokens=c.capacity,
            attn_dp_rank=0,
            num_waiting_uncached_tokens=queued,
            num_total_tokens=c.used,
            max_running_requests=self.config.max_running_requests,
            total_prefill_uncached_tokens=self.total_prefill_uncached_tokens,
            total_prefill_busy_us=self.total_prefill_busy_us,
        )

    def prefix_lengths(self) -> Sequence[int]:
        """KV tokens held by each running request (for tests)."""
        return [s.kv_len for s in self._admitted.values()]
