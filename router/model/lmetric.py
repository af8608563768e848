"""LMetric, ``linear`` and round robin: pure functions of per-instance views. No I/O, no clock, no globals.

Shared by the live router and the simulator: a policy sees only :class:`InstanceView` values (built by the
caller from load reports plus the caller's own not-yet-reported dispatches) and the cached prefix of the
request on each instance (from the global index), and returns a frozen :class:`Decision`
(:mod:`router.model.policy_base`). The peers' policies are in :mod:`router.model.baselines`; this module holds
LMetric, the tunable ``linear`` combination it is measured against and round robin; the registry is in
:mod:`router.model.policies`.

LMetric (blitz-serving/blitz-router, ``router/src/policies/lmetric.rs``)::

    route(req)     = argmin_i  (queued_prefill_tokens_i + new_tokens_i) * (batch_size_i + 1)
    new_tokens_i   = prompt_tokens - cached_prefix_tokens_i
    batch_size_i   = running_i + waiting_i   (plus the router's own dispatches not yet in a report)

The first factor is the prefill work queued ahead of (and including) the request, the second the number of
requests it shares the GPU with; ``+ 1`` keeps idle instances comparable by prefill work alone. No weights,
no thresholds. Ties: lower batch size, then fewer new tokens, then a rotation over the tied instances.

Where the product fails (derived in ``docs/lmetric.md``; each case is detected online, counted in
``Decision.failure_cases`` and the router's metrics, and mitigated without a tuned weight):

* ``at_max_running``: an instance whose batch (running + waiting + unreported dispatches) fills its
  ``max_running_requests`` cannot start the request before one of its requests finishes, a wait neither
  factor measures (a cache hit makes its product small while the request would queue behind whole
  decodes). Mitigation: such instances are skipped while an instance below its cap exists. Flagged when
  the skip mattered (a skipped instance scored at least as well as the chosen one).
* ``all_at_max_running``: every instance is at its cap; nothing to skip to, plain LMetric decides.
* ``fully_cached`` (the zero product): nothing queued and the whole prompt cached makes the product 0
  whatever the batch size, so it cannot rank that instance's load against another's. Flagged when the
  chosen instance's product is 0 and another candidate runs a smaller batch. Mitigation: among
  zero-product instances the load factor decides (lower batch first; it cannot be weighed against a
  positive product without a weight), and the cap above bounds how far one instance can pile up.

* ``batch_over_prefill``: the chosen instance has more prefill work (queued + new tokens) than another
  candidate and wins on its smaller batch. Where engines run prefill ahead of decodes (SGLang's default,
  no mixed chunk), a new request's TTFT is its instance's prefill work / prefill rate whatever the batch,
  so this choice costs the request TTFT to spare other requests' TPOT. Detected and counted only: how
  many prefill tokens one batch slot is worth is exactly the weight LMetric does without.

* ``stalls_fresh`` (an R1 case that costs TPOT): the product chose an instance with more prefill work
  (queued + new tokens) than another candidate for its smaller batch, but that batch holds *fresh*
  requests (prefill work queued there, or dispatches no load report covers yet). Under prefill-first
  scheduling those requests get their first token and then stall for this request's whole prefill:
  a long prompt queued right behind a short answer stretches that answer's few decode steps by seconds,
  and those few requests carry most of the mean TPOT (docs/lmetric.md, "The TPOT loss"). Mitigation:
  when a candidate with less prefill work holds no fresh request, the least product among those wins
  (it is better for the request's own TTFT and stalls only requests already decoding). No weight: the
  switch happens only when the alternative is better on prefill work and holds no fresh request.

``lmetric_plain`` is the authors' formula with no mitigation, kept for the ablation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Final

from router.model.policy_base import Decision, InstanceView, Param, Policy, by_name, new_tokens

__all__ = [
    "ALL_AT_MAX_RUNNING",
    "AT_MAX_RUNNING",
    "BATCH_OVER_PREFILL",
    "FAILURE_KINDS",
    "FULLY_CACHED",
    "LINEAR_A",
    "LINEAR_B",
    "STALLS_FRESH",
    "LMetric",
    "Linear",
    "RoundRobin",
    "lmetric_score",
]

AT_MAX_RUNNING: Final = "at_max_running"
ALL_AT_MAX_RUNNING: Final = "all_at_max_running"
FULLY_CACHED: Final = "fully_cached"
BATCH_OVER_PREFILL: Final = "batch_over_prefill"
STALLS_FRESH: Final = "stalls_fresh"
FAILURE_KINDS: Final = (AT_MAX_RUNNING, ALL_AT_MAX_RUNNING, FULLY_CACHED, BATCH_OVER_PREFILL, STALLS_FRESH)

LINEAR_A: Final = 1.0
LINEAR_B: Final = 1000.0
"""Defaults of ``--linear-a``/``--linear-b``: a batch slot costs as much as 1000 prefill tokens."""


def lmetric_score(view: InstanceView, new: int) -> int:
    """LMetric's product ``(queued_prefill_tokens + new) * (batch_size + 1)`` (blitz-router lmetric.rs)."""
    return (view.queued_prefill_tokens + new) * (view.batch_size + 1)


_Key = tuple[float, int, int]  # (score, batch size, new tokens): the order of the tie-breaks


class _Argmin(Policy):
    """argmin of a per-instance score with LMetric's tie-breaks (batch size, new tokens, rotation)."""

    def __init__(self) -> None:
        self._rotation = 0

    def _score(self, view: InstanceView, new: int) -> float:
        raise NotImplementedError

    def _keys(
        self, ordered: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> list[tuple[_Key, InstanceView]]:
        out = []
        for v in ordered:
            n = new_tokens(prompt_tokens, cached.get(v.name, 0))
            out.append(((self._score(v, n), v.batch_size, n), v))
        return out

    def _pick(self, candidates: list[tuple[_Key, InstanceView]]) -> tuple[_Key, InstanceView, str]:
        best_key = min(k for k, _ in candidates)
        tied = [v for k, v in candidates if k == best_key]
        if len(tied) > 1:
            chosen = tied[self._rotation % len(tied)]
            self._rotation += 1
            return best_key, chosen, "rotation"
        others = [k for k, _ in candidates if k != best_key]
        return best_key, tied[0], "only" if not others else _deciding_criterion(best_key, min(others))

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        key, chosen, reason = self._pick(self._keys(by_name(views), prompt_tokens, cached))
        n = key[2]
        return Decision(chosen.name, self.name, float(key[0]), n, prompt_tokens - n, reason)


class LMetric(_Argmin):
    """argmin of :func:`lmetric_score` with the failure-case mitigations of the module docstring
    (``mitigate=False``: the authors' plain formula, detection only)."""

    name = "lmetric"

    def __init__(self, mitigate: bool = True) -> None:
        super().__init__()
        self.mitigate = mitigate
        if not mitigate:
            self.name = "lmetric_plain"

    def _score(self, view: InstanceView, new: int) -> float:
        return lmetric_score(view, new)

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        scored = self._keys(by_name(views), prompt_tokens, cached)
        failures: list[str] = []
        below = [s for s in scored if not s[1].at_max_running]
        at_cap = [s for s in scored if s[1].at_max_running]
        if not below:
            failures.append(ALL_AT_MAX_RUNNING)
            candidates, skipped = scored, []
        elif self.mitigate:
            candidates, skipped = below, at_cap
        else:  # detection only: every instance competes
            candidates, skipped = scored, []
        key, chosen, reason = self._pick(candidates)
        if self.mitigate and _holds_fresh(chosen):
            # R1 onto fresh requests: the product took more prefill work for a smaller batch, but that
            # batch holds requests not decoding yet, which the request's prefill stalls right after their
            # first token. An instance with less prefill work and no fresh request wins on both counts.
            prefill = chosen.queued_prefill_tokens + key[2]
            calm = [
                (k, v)
                for k, v in candidates
                if v.queued_prefill_tokens + k[2] < prefill and not _holds_fresh(v)
            ]
            if calm:
                failures.append(STALLS_FRESH)
                key, chosen, _ = self._pick(calm)
                reason = "fresh_guard"
        if below and at_cap and min(k for k, _ in at_cap)[0] <= key[0]:
            failures.append(AT_MAX_RUNNING)  # the product preferred (or chose) an instance at its cap
        if key[0] == 0 and any(k[1] < key[1] for k, _ in candidates):
            failures.append(FULLY_CACHED)
        prefill = chosen.queued_prefill_tokens + key[2]
        if any(v.queued_prefill_tokens + k[2] < prefill for k, v in candidates):
            failures.append(BATCH_OVER_PREFILL)
        n = key[2]
        return Decision(
            instance=chosen.name,
            policy=self.name,
            score=float(key[0]),
            new_tokens=n,
            cached_tokens=prompt_tokens - n,
            reason=reason,
            failure_cases=tuple(failures),
            skipped=tuple(v.name for _, v in skipped),
        )


class Linear(_Argmin):
    """argmin ``a · (queued_prefill_tokens + new_tokens) + b · batch_size``: LMetric's two factors added
    with weights instead of multiplied (what a tuned combinator looks like). Same tie-breaks as LMetric,
    no mitigation. ``b / a`` is the number of prefill tokens one more request in the batch is worth."""

    name = "linear"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "a": Param(LINEAR_A, "weight of prefill tokens (queued + the request's uncached)"),
        "b": Param(LINEAR_B, "weight of batch size (running + waiting + unreported)"),
    }
    a: float
    b: float

    def __init__(self, a: float = LINEAR_A, b: float = LINEAR_B) -> None:
        super().__init__()
        values = {k: p.default for k, p in self.PARAMS.items()} | {"a": a, "b": b}
        self.check_params(values, "--linear-")
        self.configure(values)

    @classmethod
    def check_params(cls, values: Mapping[str, float], flag_prefix: str) -> None:
        super().check_params(values, flag_prefix)
        if values["a"] + values["b"] <= 0:
            raise ValueError(f"{flag_prefix}a and {flag_prefix}b must not both be 0")

    def _score(self, view: InstanceView, new: int) -> float:
        return self.a * (view.queued_prefill_tokens + new) + self.b * view.batch_size


def _holds_fresh(view: InstanceView) -> bool:
    """Whether ``view`` holds requests that have not started decoding: prefill work queued (waiting or
    being prefilled) or dispatches the router made that no load report covers yet."""
    return view.queued_prefill_tokens > 0 or view.unreported > 0


def _deciding_criterion(best: _Key, runner_up: _Key) -> str:
    if best[0] != runner_up[0]:
        return "score"
    if best[1] != runner_up[1]:
        return "batch_size"
    return "new_tokens"


class RoundRobin(Policy):
    """Rotation over the live instances in name order, ignoring load and cache."""

    name = "round_robin"

    def __init__(self) -> None:
        self._rotation = 0

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        ordered = by_name(views)
        chosen = ordered[self._rotation % len(ordered)]
        self._rotation += 1
        n = new_tokens(prompt_tokens, cached.get(chosen.name, 0))
        return Decision(
            instance=chosen.name,
            policy=self.name,
            score=0.0,
            new_tokens=n,
            cached_tokens=prompt_tokens - n,
            reason="only" if len(ordered) == 1 else "rotation",
        )
