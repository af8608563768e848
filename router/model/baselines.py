"""The peers' routing policies, each as its own authors define it. Pure: functions of the views and match.

Every peer reads its own signals; here each reads the closest field of :class:`InstanceView` (the mapping
is stated per class). Where a peer's tie-break is "the first in a fixed order" (a Rust or Python ``min``
over workers), the fixed order is instance names. Randomised policies draw from their own seeded
``random.Random`` (``seed`` None = OS entropy), so a simulation is reproducible.

Sources (read for the formulas, nothing copied):

* ``vllm_v1``: vLLM V1 data-parallel load balancing, ``vllm/v1/engine/core_client.py``
  (``DPLBAsyncMPClient.get_core_engine_for_request``): ``score = waiting * 4 + running``, the first
  engine with the least score; the client adds each dispatch to the chosen engine's *waiting* count until
  the next stats update (here: the router's unreported dispatches count as waiting).
* ``bailian``: the production scheduler of the LMetric paper, as its authors list it
  (blitz-serving/blitz-router ``docs/dsl/policies.md``, ``bailian-impl-q``): a random draw weighted by
  ``a*hit% + b*(1 - bs / max bs) + g*(1 - tokens / max tokens)``, a = b = g = 1/3 (alpha, beta, gamma).
* ``dynamo``: NVIDIA Dynamo's KV router (``lib/llm/src/kv_router``, ``DefaultWorkerSelector``):
  ``logit = overlap_score_weight * prefill_blocks + decode_blocks``, argmin at the default
  ``router_temperature`` 0, defaults ``overlap_score_weight`` = 1.0 (``--kv-overlap-score-weight``).
* ``sglang_cache_aware``: sgl-router ``src/policies/cache_aware.rs`` with its defaults
  ``cache_threshold`` 0.3, ``balance_abs_threshold`` 64, ``balance_rel_threshold`` 1.5.
* ``power_of_two``: two distinct instances drawn uniformly, the less loaded wins (Mitzenmacher's "power of
  two choices"; sgl-router ``power_of_two.rs`` keeps the first on a tie).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from router.model.policy_base import Decision, InstanceView, Policy, argmin_first, by_name, decide, new_tokens

__all__ = ["Bailian", "Dynamo", "PowerOfTwo", "RandomChoice", "SglangCacheAware", "VllmV1"]


class VllmV1(Policy):
    """argmin ``4 * waiting + running``, the first such instance in name order.

    ``waiting`` = reported waiting + the router's unreported dispatches (vLLM's client counts its own
    dispatches as waiting until the coordinator's next stats); ``running`` as reported.
    """

    name = "vllm_v1"

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        score = {v.name: float(4 * (v.waiting + v.unreported) + v.running) for v in ordered}
        best, reason = argmin_first(ordered, score)
        return decide(self, best, prompt_tokens, cached, score[best.name], reason)


def bailian_weights(
    views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
) -> list[float]:
    """Bailian's weight per view (same order): ``(hit% + (1 - bs/max_bs) + (1 - tokens/max_tokens)) / 3``.

    ``hit%`` = cached prefix / prompt tokens (0 for an empty prompt); ``bs`` = batch size (running +
    waiting + unreported dispatches); ``tokens`` = ``kv_used_tokens + queued_prefill_tokens`` (KV held by
    its running requests plus prompt tokens still to prefill: every token the instance is working on).
    ``max_bs``/``max_tokens`` are the maxima over the candidate instances, as the authors' listing
    (``With M_bs = Max .bs``) defines them: the least loaded instance scores 1 on a term, the most loaded
    0, whatever the absolute level. (Normalising by the instances' caps instead, 128 requests and ~1.3 M
    KV tokens per H20, would leave both load terms near 1 at any realistic load, so the draw would follow
    the hit ratio alone.) A term whose maximum is 0 (no load anywhere) is 1 for every instance.
    """
    toks = [v.kv_used_tokens + v.queued_prefill_tokens for v in views]
    max_bs = max(v.batch_size for v in views)
    max_tok = max(toks)
    out = []
    for v, t in zip(views, toks, strict=True):
        hit = min(cached.get(v.name, 0), prompt_tokens) / prompt_tokens if prompt_tokens > 0 else 0.0
        load = 1.0 - v.batch_size / max_bs if max_bs > 0 else 1.0
        tok = 1.0 - t / max_tok if max_tok > 0 else 1.0
        out.append((hit + load + tok) / 3.0)
    return out


class Bailian(Policy):
    """A random draw weighted by :func:`bailian_weights`; uniform if every weight is 0."""

    name = "bailian"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        weights = bailian_weights(ordered, prompt_tokens, cached)
        total = sum(weights)
        if total <= 0.0:
            k = self._rng.randrange(len(ordered))
            return decide(self, ordered[k], prompt_tokens, cached, 0.0, "random")
        r = self._rng.random() * total
        acc = 0.0
        k = max(i for i, w in enumerate(weights) if w > 0.0)  # if round-off leaves r >= the final sum
        for i, w in enumerate(weights):
            acc += w
            if r < acc:
                k = i
                break
        reason = "only" if len(ordered) == 1 else "sampled"
        return decide(self, ordered[k], prompt_tokens, cached, weights[k], reason)


def dynamo_logit(
    view: InstanceView, prompt_tokens: int, cached_tokens: int, overlap_weight: float = 1.0
) -> float:
    """Dynamo's cost of sending the request to ``view`` (lower is better), in blocks of ``block_size``.

    * ``prefill_blocks`` = (prefill tokens queued there + the request's uncached tokens) / block size:
      Dynamo's ``prefill_tokens`` is ``new_tokens(isl, overlap) + active_tokens`` (tokens of requests
      still prefilling on the worker), ``potential_prefill_block = prefill_tokens / block_size``. So
      ``max(prefill_blocks - overlap_blocks, 0)`` of the request plus the queue's, in float blocks.
    * ``decode_blocks`` = KV blocks of the worker's active requests if this one joins: ``ceil((KV pinned
      by its running requests + tokens its queued requests will prefill) / block size)`` (Dynamo counts
      the blocks of every request it has routed there and not seen finish) + the request's blocks not
      already cached there.

    ``block_size`` 0 (unknown) counts in tokens.
    """
    bsz = view.block_size if view.block_size > 0 else 1
    n = new_tokens(prompt_tokens, cached_tokens)
    prefill_blocks = (view.queued_prefill_tokens + n) / bsz
    request_blocks = -(-prompt_tokens // bsz)
    overlap_blocks = min(cached_tokens, prompt_tokens) // bsz
    active_blocks = -(-(view.kv_used_tokens + view.queued_prefill_tokens) // bsz)
    decode_blocks = active_blocks + max(request_blocks - overlap_blocks, 0)
    return overlap_weight * prefill_blocks + decode_blocks


class Dynamo(Policy):
    """argmin :func:`dynamo_logit` (temperature 0). Ties: Dynamo takes the smallest indexer tree, then
    HashMap order; a view has no per-instance block count, so ties (identical float logits: identical
    states) are drawn uniformly from the seeded generator."""

    name = "dynamo"
    OVERLAP_SCORE_WEIGHT = 1.0
    """``--kv-overlap-score-weight`` default ("prefill_load_scale")."""

    def __init__(self, seed: int | None = None, overlap_score_weight: float = OVERLAP_SCORE_WEIGHT) -> None:
        self._rng = random.Random(seed)
        self.overlap_score_weight = overlap_score_weight

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        w = self.overlap_score_weight
        logit = {v.name: dynamo_logit(v, prompt_tokens, cached.get(v.name, 0), w) for v in ordered}
        best = min(logit.values())
        tied = [v for v in ordered if logit[v.name] == best]
        if len(tied) == 1:
            return decide(
                self, tied[0], prompt_tokens, cached, best, "only" if len(ordered) == 1 else "score"
            )
        return decide(self, self._rng.choice(tied), prompt_tokens, cached, best, "random")


class SglangCacheAware(Policy):
    """sgl-router's ``cache_aware``. Load = the router's in-flight requests to the instance.

    1. Imbalanced (``max_load - min_load > 64`` and ``max_load > 1.5 * min_load``): the least loaded.
    2. Otherwise, if the longest cached prefix over all instances covers more than 30 % of the prompt:
       the instance holding it.
    3. Otherwise the instance with the smallest tree ("most available cache capacity").

    Differences, by construction: SGLang's router matches the request *text* character by character in
    its own approximate tree, which records what it routed and never sees the engines' evictions; we
    match token blocks in the global index built from the engines' KV events (so the match ratio is
    cached tokens / prompt tokens, at block granularity, and reflects real evictions). Its tree size is
    modelled by :attr:`InstanceView.routed_tokens` (uncached prompt tokens routed there so far; SGLang's
    size cap, 2**26 characters a worker by default, is not reached in our windows). Ties (several
    holders of the longest prefix, equal loads or tree sizes) go to the first in name order, as
    ``min_by_key`` and the tree's first tenant do.
    """

    name = "sglang_cache_aware"
    CACHE_THRESHOLD = 0.3
    BALANCE_ABS_THRESHOLD = 64
    BALANCE_REL_THRESHOLD = 1.5

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        loads = {v.name: float(v.inflight) for v in ordered}
        hi, lo = max(loads.values()), min(loads.values())
        if hi - lo > self.BALANCE_ABS_THRESHOLD and hi > lo * self.BALANCE_REL_THRESHOLD:
            best, _ = argmin_first(ordered, loads)
            return decide(self, best, prompt_tokens, cached, loads[best.name], "imbalanced")
        match = {v.name: min(cached.get(v.name, 0), prompt_tokens) for v in ordered}
        longest = max(match.values())
        rate = longest / prompt_tokens if prompt_tokens > 0 else 0.0
        if rate > self.CACHE_THRESHOLD:
            best = next(v for v in ordered if match[v.name] == longest)
            return decide(self, best, prompt_tokens, cached, rate, "cache_match")
        size = {v.name: float(v.routed_tokens) for v in ordered}
        best, _ = argmin_first(ordered, size)
        return decide(self, best, prompt_tokens, cached, size[best.name], "smallest_tree")


class RandomChoice(Policy):
    """Uniformly random instance."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        best = ordered[self._rng.randrange(len(ordered))]
        return decide(self, best, prompt_tokens, cached, 0.0, "only" if len(ordered) == 1 else "random")


class PowerOfTwo(Policy):
    """Two distinct instances drawn uniformly; the one with the smaller load wins, the first drawn on a
    tie. Load = batch size (running + waiting + the router's unreported dispatches): the queue length
    the power-of-two-choices result is about, and what the engines report."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        if len(ordered) == 1:
            return decide(self, ordered[0], prompt_tokens, cached, float(ordered[0].batch_size), "only")
        i, j = self._rng.sample(range(len(ordered)), 2)
        a, b = ordered[i], ordered[j]
        best = a if a.batch_size <= b.batch_size else b
        return decide(self, best, prompt_tokens, cached, float(best.batch_size), "two_choices")
