"""Routing policies: pure functions of per-instance views. No I/O, no clock, no globals.

Shared by the live router and the simulator: a policy sees only :class:`InstanceView` values (built by the
caller from load reports plus the caller's own not-yet-reported dispatches) and the cached prefix of the
request on each instance (from the global index), and returns a frozen :class:`Decision`. A policy object
keeps only a rotation counter (for fair tie-breaking), so two runs fed the same inputs decide the same.

LMetric (blitz-serving/blitz-router, ``router/src/policies/lmetric.rs``)::

    route(req)     = argmin_i  (queued_prefill_tokens_i + new_tokens_i) * (batch_size_i + 1)
    new_tokens_i   = prompt_tokens - cached_prefix_tokens_i
    batch_size_i   = running_i + waiting_i   (plus the router's own dispatches not yet in a report)

The first factor is the prefill work queued ahead of (and including) the request, the second the number of
requests it shares the GPU with; ``+ 1`` keeps idle instances comparable by prefill work alone. No weights,
no thresholds. Ties: lower batch size, then fewer new tokens, then a rotation over the tied instances.

Where the product fails (our analysis; each case is detected online, counted, and where possible
mitigated):

* ``at_max_running``: an instance whose running requests reached its ``max_running_requests`` cannot start
  the request until another finishes, a wait the product does not see (a cache hit makes its product
  small while the request would queue behind whole decodes). Mitigation: such instances are skipped while
  an instance below its cap exists. Flagged when the skip mattered (a skipped instance scored at least as
  well as the chosen one).
* ``all_at_max_running``: every instance is at its cap; nothing to skip to, plain LMetric decides.
* ``fully_cached``: ``new_tokens == 0`` on the chosen instance; the request's own term vanishes, and with
  nothing queued the product is 0 whatever the batch size, so a hot prefix can pile requests onto one
  instance. Detected and counted only (no mitigation yet).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

AT_MAX_RUNNING: Final = "at_max_running"
ALL_AT_MAX_RUNNING: Final = "all_at_max_running"
FULLY_CACHED: Final = "fully_cached"
FAILURE_KINDS: Final = (AT_MAX_RUNNING, ALL_AT_MAX_RUNNING, FULLY_CACHED)


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What a policy knows about one live instance. Requests and tokens are counts.

    ``batch_size`` is running + waiting including the caller's dispatches the engine has not reported yet,
    ``queued_prefill_tokens`` likewise (uncached prompt tokens not prefilled yet). ``running`` and
    ``waiting`` are as last reported. ``inflight`` is requests the caller has open to it.
    ``max_running_requests`` and ``kv_capacity_tokens`` are 0 when unknown.
    """

    name: str
    batch_size: int = 0
    queued_prefill_tokens: int = 0
    running: int = 0
    waiting: int = 0
    inflight: int = 0
    max_running_requests: int = 0
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0

    @property
    def at_max_running(self) -> bool:
        """Whether the instance runs as many requests as it may (only when its cap is known)."""
        return 0 < self.max_running_requests <= self.running


@dataclass(frozen=True, slots=True)
class Decision:
    """One routing decision.

    ``score`` is the policy's value for the chosen instance (LMetric's product, in token-requests; 0 for
    round robin). ``new_tokens``/``cached_tokens`` are the request's uncached/cached prompt tokens there.
    ``reason`` says what decided: ``only`` (one candidate), ``score``, ``batch_size``, ``new_tokens``,
    ``rotation`` (a full tie, or round robin). ``failure_cases`` holds the :data:`FAILURE_KINDS` detected
    for this request; ``skipped`` the instances a mitigation excluded.
    """

    instance: str
    policy: str
    score: float
    new_tokens: int
    cached_tokens: int
    reason: str
    failure_cases: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


class Policy(ABC):
    """A routing policy. ``choose`` mutates only the policy's rotation counter."""

    name: str = "policy"

    @abstractmethod
    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        """Pick one of ``views`` for a request of ``prompt_tokens`` tokens.

        ``cached`` maps instance names to the request's cached prefix there in tokens (missing = 0).
        Raises ``ValueError`` if ``views`` is empty.
        """


def new_tokens(prompt_tokens: int, cached_tokens: int) -> int:
    """Prompt tokens an instance must still prefill (never negative)."""
    return max(prompt_tokens - cached_tokens, 0)


def lmetric_score(view: InstanceView, new: int) -> int:
    """LMetric's product ``(queued_prefill_tokens + new) * (batch_size + 1)`` (blitz-router lmetric.rs)."""
    return (view.queued_prefill_tokens + new) * (view.batch_size + 1)


class LMetric(Policy):
    """argmin of :func:`lmetric_score`, skipping instances at their max running requests (module doc)."""

    name = "lmetric"

    def __init__(self) -> None:
        self._rotation = 0

    def choose(
        self, views: Sequence[InstanceView], prompt_tokens: int, cached: Mapping[str, int]
    ) -> Decision:
        if not views:
            raise ValueError("no instance to choose from")
        ordered = sorted(views, key=lambda v: v.name)  # a stable order for the rotation
        scored = []
        for v in ordered:
            n = new_tokens(prompt_tokens, cached.get(v.name, 0))
            scored.append(((lmetric_score(v, n), v.batch_size, n), v))
        failures: list[str] = []
        candidates = [s for s in scored if not s[1].at_max_running]
        skipped = [s for s in scored if s[1].at_max_running]
        if not candidates:
            candidates, skipped = scored, []
            failures.append(ALL_AT_MAX_RUNNING)
        best_key = min(k for k, _ in candidates)
        if skipped and min(k for k, _ in skipped)[0] <= best_key[0]:
            failures.append(AT_MAX_RUNNING)
        tied = [v for k, v in candidates if k == best_key]
        if len(tied) > 1:
            chosen = tied[self._rotation % len(tied)]
            self._rotation += 1
            reason = "rotation"
        else:
            chosen = tied[0]
            others = [k for k, _ in candidates if k != best_key]
            reason = "only" if not others else _deciding_criterion(best_key, min(others))
        n = best_key[2]
        if n == 0:
            failures.append(FULLY_CACHED)
        return Decision(
            instance=chosen.name,
            policy=self.name,
            score=float(best_key[0]),
            new_tokens=n,
            cached_tokens=prompt_tokens - n,
            reason=reason,
            failure_cases=tuple(failures),
            skipped=tuple(v.name for _, v in skipped),
        )


def _deciding_criterion(best: tuple[int, int, int], runner_up: tuple[int, int, int]) -> str:
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
        if not views:
            raise ValueError("no instance to choose from")
        ordered = sorted(views, key=lambda v: v.name)
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
            failure_cases=(FULLY_CACHED,) if n == 0 else (),
        )


POLICIES: dict[str, Callable[[], Policy]] = {LMetric.name: LMetric, RoundRobin.name: RoundRobin}
"""Policy factories by name (``--policy``). Add a policy by registering its factory here."""


def make_policy(name: str) -> Policy:
    """A fresh policy object for ``name``. Raises ``ValueError`` for an unknown name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
