"""The emulated engine's scheduler: continuous batching over a paged radix cache, clock-driven. Pure.

Theory of operation
-------------------
The owner drives the core with a clock it supplies (real or virtual)::

    core.add_request(req, now)            # queue (FCFS); raises RequestRejected
    step = core.schedule(now)             # None when idle; else a batch and its modelled duration
    ... wait step.duration (real sleep, or advance a virtual clock) ...
    outputs = core.complete(step, now)    # tokens produced by the step, finished requests
    events = core.drain_events()          # KV events of the step (evictions, inserts)

Only one step is in flight at a time. Scheduling follows SGLang's default policy:

* A step is a prefill ("extend") batch whenever there is prefill work: first the request whose prompt is
  being prefilled in chunks, then waiting requests in arrival order while the running count is below
  ``max_running_requests`` and their KV fits. At admission the prompt (minus its last token, so at least
  one token is computed) is matched in the radix cache, the matched node is locked (``cached_tokens``),
  and room is made by evicting least-recently-used unlocked pages. At most ``chunked_prefill_size``
  uncached tokens are computed per step; a longer prompt is cut at a page boundary and continues next
  step. Admission keeps a decode reserve of ``remaining max_new_tokens * new_token_ratio`` for every
  running request (the ratio decays from 0.7 to 0.1 over 600 decode steps and resets on retraction).
* Otherwise a decode step advances every fully prefilled request by one token. With ``mixed_chunk`` the
  decoding requests ride along in prefill steps (the chunk budget shrinks by their number).
* If a decode step cannot get one KV slot per request, the most recently admitted request is retracted to
  the front of the queue (its pages released; it later re-prefills prompt + output so far).
* After each chunk the computed full pages are inserted in the cache and the lock moves to the new node,
  so a concurrent request with the same prefix hits them; at finish the whole sequence (prompt + output,
  full pages whose KV exists) is inserted and unlocked. KV accounting is per token (SGLang's paged
  allocator rounds private tokens up to pages; the difference is < one page per request).

Outputs are deterministic: token ids are pseudo-random printable ASCII (32..126) from ``Random(rid)``,
which the built-in byte tokenizer decodes to text. With ``ignore_eos`` a request generates exactly
``max_new_tokens`` (finish "length"); otherwise it stops at a natural length ``1 + crc32(prompt as
uint32 LE) % max_new_tokens`` (finish "stop" if that is below ``max_new_tokens``). ``max_new_tokens`` 0
finishes right after prefill with no token.
"""

from __future__ import annotations

import random
import zlib
from array import array

from agents.engine.core_state import EngineState, Seq
from agents.engine.core_types import (
    EngineConfig,
    FinishReason,
    Request,
    RequestRejected,
    Step,
    StepEntry,
    StepKind,
    TokenOutput,
)

__all__ = [
    "EngineConfig",
    "EngineCore",
    "FinishReason",
    "Request",
    "RequestRejected",
    "Step",
    "StepEntry",
    "StepKind",
    "TokenOutput",
]

_CLIP_MAX_NEW_TOKENS = 4096  # SGLang's cap on max_new_tokens when estimating the decode reserve


class EngineCore(EngineState):
    """Scheduler + radix cache + step-time model of one emulated SGLang engine (one DP rank)."""

    # --------------------------------------------------------------------------------------- requests

    def add_request(self, req: Request, now: float) -> None:
        """Queue ``req`` (FCFS). ``max_new_tokens`` is clamped so prompt + output fits the KV pool.

        Raises:
            RequestRejected: empty prompt, duplicate rid, prompt (+ max_new_tokens) reaching the context
                length, or prompt reaching the KV capacity.
        """
        n, ctx, cap = len(req.prompt_ids), self.config.context_length, self.max_total_num_tokens
        if n == 0:
            raise RequestRejected("the prompt is empty")
        if req.rid in self._seqs:
            raise RequestRejected(f"request id {req.rid!r} is already in flight")
        if n >= ctx:
            raise RequestRejected(
                f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens)."
            )
        # SGLang allows prompt + max_new_tokens == context length (tokenizer_manager
        # ``_validate_one_request``: rejects only a sum greater than it, a prompt of ``>=``).
        if n + req.max_new_tokens > ctx:
            raise RequestRejected(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
                f"You requested a total of {n + req.max_new_tokens} tokens: {n} tokens from the input "
                f"messages and {req.max_new_tokens} tokens for the completion."
            )
        if n >= cap:
            raise RequestRejected(
                f"The input ({n} tokens) is longer than the KV cache capacity ({cap} tokens)."
            )
        max_new = max(0, min(req.max_new_tokens, cap - n))
        natural = 1 + zlib.crc32(array("I", req.prompt_ids).tobytes()) % max(1, max_new)
        est = n - self.cache.peek_prefix(req.prompt_ids[: n - 1])
        s = Seq(req, next(self._uids), max_new, natural, est)
        self._seqs[req.rid] = s
        self._by_uid[s.uid] = s
        self._waiting.append(s)

    def abort(self, rid: str) -> bool:
        """Drop request ``rid`` wherever it is and free its KV now (a step in flight skips it).

        Returns False if the rid is unknown (already finished)."""
        s = self._seqs.pop(rid, None)
        if s is None:
            return False
        del self._by_uid[s.uid]
        if s.state == "waiting":
            self._waiting.remove(s)
        else:
            self._release(s)
        return True

    # -------------------------------------------------------------------------------------- scheduling

    def schedule(self, now: float) -> Step | None:
        """Pick the next batch at clock ``now`` and reserve its KV. None only when idle (nothing waiting or
        running), so a simulator may then jump to the next arrival.

        Raises:
            RuntimeError: a step is already in flight (call :meth:`complete` first).
        """
        if self._inflight is not None:
            raise RuntimeError("a step is already in flight")
        if not self._waiting and not self._prefilling:
            # Decode-only fast path (the bulk of all steps): no prefill work, so both branches below
            # would build the same decode batch; same ratio decay, same duration to the last bit.
            step = self._decode_step(now)
            if step is not None:
                return step
        budget = self.config.chunked_prefill_size
        if budget <= 0:
            budget = self.max_total_num_tokens
        entries: list[StepEntry] = []
        if self.config.mixed_chunk and (self._waiting or self._prefilling):
            decodes = self._alloc_decodes()
            entries = self._build_prefill(now, budget - len(decodes))
            entries += decodes
        else:
            entries = self._build_prefill(now, budget)
            if not entries:
                entries = self._alloc_decodes()
                if not entries and self._waiting:  # every decode was retracted: admit afresh
                    entries = self._build_prefill(now, budget)
        if not entries:
            return None
        has_prefill = any(e.prefill for e in entries)
        kind: StepKind = "decode" if not has_prefill else ("mixed" if not entries[-1].prefill else "prefill")
        if kind == "decode":
            self._ratio = max(self.config.min_new_token_ratio, self._ratio - self._ratio_decay)
        duration = self.profile.step_time((e.new_tokens, e.context_tokens) for e in entries)
        self._inflight = Step(kind, tuple(entries), now, duration)
        return self._inflight

    def _decode_step(self, now: float) -> Step | None:
        """The decode step :meth:`schedule` builds when nothing waits or prefills, or None if retraction
        left waiting requests (then the general path admits them afresh)."""
        entries = self._alloc_decodes()
        if not entries:
            return None  # nothing to decode (or all retracted): the general path decides
        self._ratio = max(self.config.min_new_token_ratio, self._ratio - self._ratio_decay)
        n = len(entries)
        ctx_total = 0
        for e in entries:
            ctx_total += e.context_tokens
        # step_time's sums for n sequences of (1 new, ctx) each; exact integers, so the float equals the
        # one the generic loop accumulates.
        duration = self.profile.step_time_from_sums(n, float(ctx_total + n), ctx_total + n)
        self._inflight = Step("decode", tuple(entries), now, duration)
        return self._inflight

    def run_quiet_decodes(self, now: float, horizon: float) -> list[float]:
        """Run back to back, from clock ``now``, the decode steps :meth:`schedule` + :meth:`complete` would
        run next, for as long as each is *quiet*: nothing waits or prefills, its KV slots come from free
        pool space (no eviction, so no KV event), no request finishes in it, and it ends before
        ``horizon`` (``now + duration < horizon``, the clock advancing step by step as a caller's would).
        Mutates; returns the steps' durations in order (empty when the next step is not quiet: then call
        :meth:`schedule` as usual).

        Equivalent, in every state change (tokens drawn, KV, new-token ratio) and in the clock, to the
        ``schedule``/``complete`` calls it replaces, minus their :class:`TokenOutput` s: those would carry
        one ordinary token each (never a first token, never a finish). For simulators, which need only
        first tokens and finishes; the live server streams every token and does not call this.
        """
        if self._inflight is not None or self._waiting or self._prefilling or not self._admitted:
            return []
        seqs = list(self._admitted.values())  # all decoding: nothing prefills
        n = len(seqs)
        room = min(
            (s.max_new if s.req.ignore_eos else min(s.max_new, s.natural_len)) - len(s.output) for s in seqs
        )
        cache = self.cache
        max_steps = min(room - 1, (cache.capacity - cache.cached_tokens - cache.private_tokens) // n)
        if max_steps <= 0:
            return []
        ctx = 0
        for s in seqs:
            ctx += s.kv_len
        step_time = self.profile.step_time_from_sums
        ratio, floor, decay = self._ratio, self.config.min_new_token_ratio, self._ratio_decay
        durations: list[float] = []
        t = now
        while len(durations) < max_steps:
            d = step_time(n, float(ctx + n), ctx + n)  # as _decode_step computes it
            if t + d >= horizon:
                break
            t += d
            ratio = max(floor, ratio - decay)
            durations.append(d)
            ctx += n
        m = len(durations)
        if not m:
            return durations
        self._ratio = ratio
        allocated = cache.allocate(m * n)  # == m allocations of n slots, none of them evicting
        assert allocated
        for s in seqs:
            rng = s.rng
            if rng is None:
                rng = s.rng = random.Random(s.req.rid)
            bits, out = rng.getrandbits, s.output
            for _ in range(m):  # == _next_token's draw, m times
                tok = bits(7)
                while tok >= 95:
                    tok = bits(7)
                out.append(tok + 32)
            s.kv_len += m
        return durations

    def _reserve(self, s: Seq) -> int:
        return int(min(s.max_new - len(s.output), _CLIP_MAX_NEW_TOKENS) * self._ratio)

    def _chunk(self, s: Seq, budget: int) -> int:
        remaining = len(s.fill) - s.prefilled
        if remaining <= budget:
            return remaining
        return budget // self.config.page_size * self.config.page_size

    def _build_prefill(self, now: float, budget: int) -> list[StepEntry]:
        cache = self.cache
        entries: list[StepEntry] = []
        for s in self._prefilling:  # the chunked request(s) continue first
            chunk = self._chunk(s, budget)
            if chunk <= 0 or not cache.allocate(chunk):
                return entries
            entries.append(StepEntry(s.req.rid, s.uid, chunk, s.prefilled, True))
            s.kv_len += chunk
            budget -= chunk
        cap = self.config.max_running_requests
        if not self._waiting or budget <= 0 or len(self._admitted) >= cap:
            return entries  # the admission loop below would not run: skip the O(running) reserve sum
        reserved = sum(self._reserve(s) for s in self._admitted.values())
        while self._waiting and budget > 0 and len(self._admitted) < cap:
            alone = not self._admitted and not entries
            if not alone and cache.available - reserved <= 0:
                break
            s = self._waiting[0]
            m = cache.match_prefix(s.fill[: len(s.fill) - 1], now)
            cache.lock(m.node)
            s.node, s.locked_len, s.kv_len, s.prefilled = (
                m.node,
                m.cached_tokens,
                m.cached_tokens,
                m.cached_tokens,
            )
            chunk = self._chunk(s, budget)
            need = chunk + (self._reserve(s) if chunk == len(s.fill) - s.prefilled else 0)
            if chunk <= 0 or (not alone and need > cache.available - reserved) or not cache.allocate(chunk):
                cache.unlock(m.node)
                s.node, s.locked_len, s.kv_len, s.prefilled = None, 0, 0, 0
                break
            self._waiting.popleft()
            s.kv_len += chunk
            s.state = "prefilling"
            self._admitted[s.uid] = s
            self._prefilling.append(s)
            if not s.admitted:
                s.admitted, s.cached_tokens = True, m.cached_tokens
                self.admitted_prompt_tokens += len(s.fill)
                self.admitted_cached_tokens += m.cached_tokens
            entries.append(StepEntry(s.req.rid, s.uid, chunk, s.prefilled, True))
            budget -= chunk
            reserved += self._reserve(s)
        return entries

    def _alloc_decodes(self) -> list[StepEntry]:
        decs = [s for s in self._admitted.values() if s.state == "decoding"]
        while decs and not self.cache.allocate(len(decs)):
            victim = self._admitted[next(reversed(self._admitted))]
            self._retract(victim)
            if victim in decs:
                decs.remove(victim)
        out = []
        for s in decs:
            out.append(StepEntry(s.req.rid, s.uid, 1, s.kv_len, False))
            s.kv_len += 1
        return out

    def _retract(self, s: Seq) -> None:
        self._release(s)
        s.state, s.fill = "waiting", s.req.prompt_ids + tuple(s.output)
        s.est_uncached = len(s.fill)
        self._waiting.appendleft(s)
        self._ratio = self.config.init_new_token_ratio
        self.num_retractions += 1

    # -------------------------------------------------------------------------------------- completion

    def complete(self, step: Step, now: float) -> list[TokenOutput]:
        """Apply ``step``'s effects at clock ``now`` (its end): progress, tokens, finishes, cache inserts.

        Raises:
            RuntimeError: ``step`` is not the step in flight.
        """
        if step is not self._inflight:
            raise RuntimeError("complete() of a step that is not in flight")
        self._inflight = None
        if step.kind != "decode":
            self.total_prefill_busy_us += round(step.duration * 1e6)
        outs: list[TokenOutput] = []
        for e in step.entries:
            s = self._by_uid.get(e.uid)
            if s is None:  # aborted while in flight
                continue
            if e.prefill:
                s.prefilled += e.new_tokens
                self.total_prefill_uncached_tokens += e.new_tokens
                if s.prefilled < len(s.fill):
                    self._commit(s, s.prefilled, now)
                    continue
                self._prefilling.remove(s)
                s.state = "decoding"
                if s.max_new == 0:
                    outs.append(self._finish(s, "length", (), now))
                    continue
                out = self._next_token(s, now)
                if not out.finished:  # prompt pages become shareable (SGLang's cache_unfinished_req)
                    self._commit(s, s.kv_len, now)
            else:
                out = self._next_token(s, now)
            outs.append(out)
        return outs

    def _next_token(self, s: Seq, now: float) -> TokenOutput:
        rng = s.rng
        if rng is None:
            rng = s.rng = random.Random(s.req.rid)
        # == rng.randint(32, 126) (CPython draws randrange(95) as getrandbits(7) until < 95), inlined
        # because it runs once per generated token.
        tok = rng.getrandbits(7)
        while tok >= 95:
            tok = rng.getrandbits(7)
        tok += 32
        s.output.append(tok)
        n = len(s.output)
        if n >= s.max_new:
            return self._finish(s, "length", (tok,), now)
        if not s.req.ignore_eos and n >= s.natural_len:
            return self._finish(s, "stop", (tok,), now)
        first = not s.first_done
        s.first_done = True
        return TokenOutput(s.req.rid, (tok,), len(s.req.prompt_ids), n, s.cached_tokens, first, None)

    def _finish(self, s: Seq, reason: FinishReason, toks: tuple[int, ...], now: float) -> TokenOutput:
        first = not s.first_done
        s.first_done = True
        self._commit(s, s.kv_len, now)
        self._release(s)
        del self._seqs[s.req.rid], self._by_uid[s.uid]
        return TokenOutput(
            s.req.rid, toks, len(s.req.prompt_ids), len(s.output), s.cached_tokens, first, reason
        )
