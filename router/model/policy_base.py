"""What every routing policy sees and returns: :class:`InstanceView`, :class:`Decision`, :class:`Policy`. Pure.

A policy is a function of a snapshot: the views of the candidate instances (built by the caller, the live
router in ``router/model/table.py`` or the simulator in ``launch/sim/router_model.py``, from the last load
reports plus the caller's own dispatches not yet reported) and the request's cached prefix on each
instance (from the global index). Its only state is a tie-breaking rotation counter or a seeded
``random.Random``, so two runs fed the same inputs (and seed) decide the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What a policy knows about one live instance. Requests and tokens are counts.

    ``batch_size`` is running + waiting including the caller's dispatches the engine has not reported yet
    (:attr:`unreported`), ``queued_prefill_tokens`` likewise (uncached prompt tokens not prefilled yet).
    ``running`` and ``waiting`` are as last reported. ``inflight`` is requests the caller has open to it.
    ``kv_used_tokens`` is the KV pinned by its running requests (SGLang's ``num_tokens``).
    ``max_running_requests``, ``kv_capacity_tokens`` and ``block_size`` (the router's index block size)
    are 0 when unknown. ``routed_tokens`` counts the prompt tokens the caller has sent it that it did not
    hold when routed (cumulative; the analogue of the size of SGLang router's per-worker tree).
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
    block_size: int = 0
    routed_tokens: int = 0

    @property
    def unreported(self) -> int:
        """The caller's dispatches not yet covered by a load report (never negative)."""
        return max(self.batch_size - self.running - self.waiting, 0)

    @property
    def at_max_running(self) -> bool:
        """Whether a new request could not start here before a running one finishes: its batch (running,
        waiting and unreported dispatches) already fills ``max_running_requests`` (only when known)."""
        return 0 < self.max_running_requests <= self.batch_size


@dataclass(frozen=True, slots=True)
class Decision:
    """One routing decision.

    ``score`` is the policy's value for the chosen instance (LMetric's product in token-requests, a
    baseline's own score; 0 where the policy has none). ``new_tokens``/``cached_tokens`` are the request's
    uncached/cached prompt tokens there. ``reason`` says what decided: ``only`` (one candidate),
    ``score``, a tie-break (``batch_size``, ``new_tokens``, ``rotation``, ``first``, ``random``), or a
    policy's own branch (``imbalanced``, ``cache_match``, ``smallest_tree``, ``sampled``,
    ``two_choices``). ``failure_cases`` holds the failure kinds detected for this request
    (:data:`router.model.lmetric.FAILURE_KINDS`); ``skipped`` the instances a mitigation excluded.
    """

    instance: str
    policy: str
    score: float
    new_tokens: int
    cached_tokens: int
    reason: str
    failure_cases: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Param:
    """One numeric parameter of a policy: its ``default``, a ``help`` line (the flag's), and the smallest
    value allowed (``minimum``, inclusive). The flag is ``--POLICY-PARAM`` (``--linear-b``), its value the
    policy object's attribute of the parameter's name (:meth:`Policy.configure`)."""

    default: float
    help: str
    minimum: float = 0.0


class Policy(ABC):
    """A routing policy. ``choose`` mutates only the policy's tie-breaking rotation or random state.

    ``PARAMS`` declares the policy's numeric parameters (name -> :class:`Param`); every driver's
    ``--POLICY-PARAM`` flags, ``ModelConfig.policy_params`` and ``make_policy`` are made from it, and
    :meth:`configure` sets each as an attribute of the same name. Declaring a parameter is the whole change.
    """

    name: str = "policy"
    PARAMS: ClassVar[Mapping[str, Param]] = {}

    @classmethod
    def check_params(cls, values: Mapping[str, float], flag_prefix: str) -> None:
        """Raise ``ValueError`` (naming the flag, ``flag_prefix`` + the parameter) unless ``values`` (every
        parameter of ``PARAMS``) are in range. Overridden where parameters constrain each other."""
        for key, spec in cls.PARAMS.items():
            v = values[key]
            if not v >= spec.minimum:  # also refuses NaN
                raise ValueError(
                    f"{flag_prefix}{key.replace('_', '-')} must be >= {spec.minimum:g}, got {v:g}"
                )

    def configure(self, values: Mapping[str, float]) -> None:
        """Set every parameter as an attribute (``values`` already checked). Mutates."""
        for key, v in values.items():
            setattr(self, key, float(v))

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


def by_name(views: Sequence[InstanceView]) -> list[InstanceView]:
    """``views`` in name order (a stable order for rotations and first-minimum rules). Raises
    ``ValueError`` if empty."""
    if not views:
        raise ValueError("no instance to choose from")
    return sorted(views, key=lambda v: v.name)


def decide(
    policy: Policy,
    view: InstanceView,
    prompt_tokens: int,
    cached: Mapping[str, int],
    score: float,
    reason: str,
    failure_cases: tuple[str, ...] = (),
    skipped: tuple[str, ...] = (),
) -> Decision:
    """The :class:`Decision` choosing ``view`` (new and cached tokens filled in from ``cached``)."""
    n = new_tokens(prompt_tokens, cached.get(view.name, 0))
    return Decision(view.name, policy.name, score, n, prompt_tokens - n, reason, failure_cases, skipped)


def argmin_first(ordered: Sequence[InstanceView], key: Mapping[str, float]) -> tuple[InstanceView, str]:
    """The first of ``ordered`` with the least ``key[name]`` and the reason (``only``, ``score`` or
    ``first``: a tie won by coming first), as ``min`` over a fixed order does in vLLM and SGLang."""
    best = min(ordered, key=lambda v: key[v.name])
    if len(ordered) == 1:
        return best, "only"
    tied = sum(1 for v in ordered if key[v.name] == key[best.name])
    return best, "score" if tied == 1 else "first"
