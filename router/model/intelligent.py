"""The second seed: Parayil et al., "Intelligent Router for LLM Workloads" (arXiv 2408.13510). Pure.

The paper (no public code) routes with a Double DQN whose actions are "send to instance i" or "hold the
request at the router", guided during training by a heuristic *mixing penalty*, and feeds it a predicted
response-length bucket. Here:

* :func:`mixing_penalty` and :class:`MixingPenalty` (``mixing_penalty``): the heuristic alone, argmin.
  Per instance: *prefill impact* = (the request's uncached tokens / the chunk a prefill step takes) x
  (the KV already held by decoding requests there / the instance's KV capacity), plus 1 when the
  uncached tokens exceed one chunk and anything is decoding there (the paper's "penalty above a
  threshold"; the threshold is SGLang's default ``--chunked-prefill-size``, 8192, an engine setting);
  *decode impact* = resident requests (batch size) / ``max_running_requests``. Combined 50/50, as the
  paper's weights. The paper's exact equations are not published: these are our reading, documented
  and varied in docs/results.md.
* :class:`IntelligentRouter` (``intelligent_router``): the Q-network's argmax over instances (in name
  order) and *hold*, minus ``guidance`` x the mixing penalty of each action (HuRL-style guidance; the
  trainer decays ``guidance`` over episodes). The network is a plain MLP (state -> 64 -> 64 -> actions,
  ReLU) evaluated with numpy from weight arrays (:class:`QNet`); training is in ``launch/rl`` (scikit-
  learn), never here. Two layouts: the paper's (the whole :func:`state_vector` in, one Q per action
  out, for a fixed instance count) and ours, the one ``launch/rl`` trains (*shared*: one network scores
  each action from its row of :func:`candidate_matrix`, so every instance is handled alike and the
  network is the same size for 4 or 16 instances; a documented deviation). Without weights it is :class:`MixingPenalty` with a hold action that is never
  taken. *Hold* is a suggestion (``Decision.reason == "hold"``, ``instance`` = the best instance): the
  simulator holds the request 0.02 s and asks again; the live router routes it to that instance.

The state (:func:`state_vector`) is what the views carry, mapped onto the paper's: router queue length
(requests held), the request's prompt tokens and predicted output bucket, and per instance the running
(decoding side) and waiting + unreported (prompt side) requests, queued prefill tokens, free KV capacity
and the request's cached share there. The paper's per-instance histograms of resident requests' prompt
and decode buckets and the earliest completion time are not in our views (the router does not track
each resident request's lengths); we use these totals instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import numpy.typing as npt

from router.model.policy_base import Decision, InstanceView, Param, Policy, by_name, decide, new_tokens

__all__ = [
    "BUCKET_EDGES",
    "IntelligentRouter",
    "LengthPredictor",
    "MixingPenalty",
    "QNet",
    "candidate_matrix",
    "mixing_penalty",
    "output_bucket",
    "state_vector",
]

CHUNK_TOKENS: Final = 8192
"""SGLang's default ``--chunked-prefill-size``: a prompt longer than this takes several prefill steps."""
BUCKET_EDGES: Final = (64, 256, 1024)
"""Response-length buckets (output tokens): < 64, 64-255, 256-1023, >= 1024 (the paper's are unstated)."""
N_BUCKETS: Final = len(BUCKET_EDGES) + 1
HOLD_PENALTY: Final = 1.0
"""The mixing penalty of holding while some instance is below its cap (0 when all are at it)."""


def output_bucket(output_tokens: int) -> int:
    """The bucket (0..3) of a response of ``output_tokens`` tokens."""
    return sum(1 for e in BUCKET_EDGES if output_tokens >= e)


def mixing_penalty(view: InstanceView, prompt_tokens: int, cached_tokens: int, alpha: float = 0.5) -> float:
    """The paper's heuristic for sending the request to ``view`` (lower is better): ``alpha`` x prefill
    impact + (1 - ``alpha``) x decode impact (module docstring). Unitless."""
    n = new_tokens(prompt_tokens, cached_tokens)
    decoding = view.kv_used_tokens / view.kv_capacity_tokens if view.kv_capacity_tokens else 0.0
    prefill = (n / CHUNK_TOKENS) * decoding + (1.0 if n > CHUNK_TOKENS and view.running > 0 else 0.0)
    cap = view.max_running_requests or 128
    decode = view.batch_size / cap
    return alpha * prefill + (1.0 - alpha) * decode


class MixingPenalty(Policy):
    """argmin :func:`mixing_penalty`, the first in name order on a tie."""

    name = "mixing_penalty"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "alpha": Param(0.5, "weight of the prefill impact against the decode impact (paper: 0.5)"),
    }
    alpha: float = 0.5

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        pens = [mixing_penalty(v, prompt_tokens, cached.get(v.name, 0), self.alpha) for v in ordered]
        k = min(range(len(ordered)), key=lambda i: pens[i])
        reason = "only" if len(ordered) == 1 else "score"
        return decide(self, ordered[k], prompt_tokens, cached, pens[k], reason)


@dataclass(frozen=True)
class QNet:
    """An MLP's weights: ``weights[k]`` (in x out) and ``biases[k]``; ReLU between layers, linear out.

    ``shared`` False (the paper's layout): input :func:`state_vector`, one output per action, trained
    for ``n_instances`` instances (its actions: those and hold, in that order). ``shared`` True (our
    layout, ``launch/rl``): one output, the Q-value of one action from that action's row of
    :func:`candidate_matrix`; the same weights score every instance and hold, for any cluster size
    (``n_instances`` is then informational)."""

    weights: tuple[npt.NDArray[np.float64], ...]
    biases: tuple[npt.NDArray[np.float64], ...]
    n_instances: int
    shared: bool = False

    def q(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Q-values of state(s) ``x`` (one row per state)."""
        h = x
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if k < last:
                h = np.maximum(h, 0.0)
        return h


@dataclass(frozen=True)
class LengthPredictor:
    """Response-length bucket from the prompt length alone (what the router knows): the most frequent
    bucket per ``log2(prompt tokens)`` bin, learned from a trace's first part (``launch/rl``)."""

    table: tuple[int, ...]  # bin -> bucket

    def predict(self, prompt_tokens: int) -> int:
        b = min(max(int(math.log2(max(prompt_tokens, 1))), 0), len(self.table) - 1)
        return self.table[b]


def state_vector(
    views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int], bucket: int, held: int
) -> npt.NDArray[np.float64]:
    """The DQN's state (module docstring) for ``views`` in name order. Every entry roughly in [0, 1]."""
    g = [min(held, 50) / 50.0, math.log1p(prompt_tokens) / 12.0]
    g += [1.0 if bucket == k else 0.0 for k in range(N_BUCKETS)]
    per: list[float] = []
    for v in by_name(views):
        cap = v.max_running_requests or 128
        free = 1.0 - v.kv_used_tokens / v.kv_capacity_tokens if v.kv_capacity_tokens else 1.0
        share = min(cached.get(v.name, 0), prompt_tokens) / prompt_tokens if prompt_tokens else 0.0
        per += [
            v.running / cap,
            (v.waiting + v.unreported) / cap,
            math.log1p(v.queued_prefill_tokens) / 12.0,
            free,
            share,
        ]
    return np.asarray(g + per, dtype=np.float64)


N_GLOBAL: Final = 11
N_CANDIDATE: Final = 12
N_FEATURES: Final = N_GLOBAL + N_CANDIDATE
"""Columns of :func:`candidate_matrix`."""


def candidate_matrix(
    views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int], bucket: int, held: int
) -> npt.NDArray[np.float64]:
    """The shared Q-network's input: one row per action (``views`` in name order, then hold), each the
    request's and the cluster's features (the same in every row) followed by that action's own.

    Global (11): held / 50, log prompt tokens / 12, output bucket one-hot (4), the cluster means of the
    per-instance running / cap, (waiting + unreported) / cap, log queued prefill tokens / 12 and KV used
    share, and the largest cached share. Per action (12): a hold flag; for an instance its running / cap,
    (waiting + unreported) / cap, log queued prefill / 12, KV used share, the request's cached share,
    log uncached tokens / 12, the mixing penalty (capped at 2) / 2, and the first three and the cached
    share minus their cluster means; for hold the flag and zeros. Every entry roughly in [-1, 1].
    Permuting the instances permutes the rows, so a network over rows treats them symmetrically."""
    ordered = by_name(views)
    inst = np.empty((len(ordered), N_CANDIDATE), dtype=np.float64)
    for k, v in enumerate(ordered):
        cap = v.max_running_requests or 128
        used = v.kv_used_tokens / v.kv_capacity_tokens if v.kv_capacity_tokens else 0.0
        c = min(cached.get(v.name, 0), prompt_tokens)
        inst[k, :8] = (
            0.0,
            v.running / cap,
            (v.waiting + v.unreported) / cap,
            math.log1p(v.queued_prefill_tokens) / 12.0,
            used,
            c / prompt_tokens if prompt_tokens else 0.0,
            math.log1p(prompt_tokens - c) / 12.0,
            min(mixing_penalty(v, prompt_tokens, c), 2.0) / 2.0,
        )
    means = inst[:, 1:5].mean(axis=0)
    inst[:, 8:11] = inst[:, 1:4] - means[:3]
    inst[:, 11] = inst[:, 5] - inst[:, 5].mean()
    g = [min(held, 50) / 50.0, math.log1p(prompt_tokens) / 12.0]
    g += [1.0 if bucket == k else 0.0 for k in range(N_BUCKETS)]
    g += [*means.tolist(), float(inst[:, 5].max())]
    hold = np.zeros((1, N_CANDIDATE))
    hold[0, 0] = 1.0
    rows = np.vstack([inst, hold])
    return np.hstack([np.broadcast_to(np.asarray(g), (len(rows), N_GLOBAL)), rows])


class IntelligentRouter(Policy):
    """The Double-DQN router (module docstring). ``net`` None: mixing penalty only. ``predictor`` gives
    the output bucket from the prompt length; :attr:`next_bucket` (set by a simulator for the oracle
    variant) overrides it for the next request. :attr:`held` is the router queue length the caller
    reports (the simulator's held requests)."""

    name = "intelligent_router"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "guidance": Param(0.0, "weight of the mixing-penalty guidance subtracted from Q at routing"),
    }
    guidance: float = 0.0

    def __init__(self, net: QNet | None = None, predictor: LengthPredictor | None = None) -> None:
        self.net = net
        self.predictor = predictor
        self.next_bucket: int | None = None
        self.held = 0
        self.allow_hold = True
        self.last_state: npt.NDArray[np.float64] | None = None
        self.last_action = -1

    def bucket(self, prompt_tokens: int) -> int:
        if self.next_bucket is not None:
            return self.next_bucket
        return self.predictor.predict(prompt_tokens) if self.predictor is not None else 1

    def action_scores(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> npt.NDArray[np.float64]:
        """Q - guidance x penalty per action (instances in name order, then hold). Sets
        :attr:`last_state` (the state vector, or the candidate matrix for a shared network). Mutates
        only that."""
        ordered = by_name(views)
        pens = [mixing_penalty(v, prompt_tokens, cached.get(v.name, 0)) for v in ordered]
        all_cap = all(v.at_max_running for v in ordered)
        pens.append(0.0 if all_cap else HOLD_PENALTY)
        net, bucket = self.net, self.bucket(prompt_tokens)
        if net is not None and net.shared:
            state = candidate_matrix(ordered, prompt_tokens, cached, bucket, self.held)
            q, g = net.q(state)[:, 0], self.guidance
        else:
            state = state_vector(ordered, prompt_tokens, cached, bucket, self.held)
            if net is None or net.n_instances != len(ordered):
                q, g = np.zeros(len(ordered) + 1), 1.0
            else:
                q, g = net.q(state[None, :])[0], self.guidance
        self.last_state = state
        return q - g * np.asarray(pens)

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        scores = self.action_scores(ordered, prompt_tokens, cached)
        if not self.allow_hold or self.net is None:
            scores[-1] = -np.inf
        a = int(np.argmax(scores))
        return self.decide_action(ordered, prompt_tokens, cached, a, scores)

    def decide_action(
        self,
        ordered: Sequence[InstanceView],
        prompt_tokens: int,
        cached: Mapping[str, int],
        a: int,
        scores: npt.NDArray[np.float64],
    ) -> Decision:
        """The :class:`Decision` of action ``a`` (``len(ordered)`` = hold: the best instance, reason
        ``hold``). Records :attr:`last_action`."""
        self.last_action = a
        self.next_bucket = None
        if a == len(ordered):
            best = int(np.argmax(scores[:-1]))
            return decide(self, ordered[best], prompt_tokens, cached, float(scores[a]), "hold")
        reason = "only" if len(ordered) == 1 else "score"
        return decide(self, ordered[a], prompt_tokens, cached, float(scores[a]), reason)
