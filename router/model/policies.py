"""Routing policies: pure functions of per-instance views. No I/O, no clock, no globals.

Shared by the live router and the simulator: a policy sees only :class:`InstanceView` values (built by the
caller from load reports plus the caller's own not-yet-reported dispatches) and the cached prefix of the
request on each instance (from the global index), and returns a frozen :class:`Decision`
(:mod:`router.model.policy_base`). The peers' policies are in :mod:`router.model.baselines`; this module holds
LMetric, the tunable ``linear`` combination it is measured against, round robin and the registry.

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

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from router.model.baselines import Bailian, Dynamo, PowerOfTwo, RandomChoice, SglangCacheAware, VllmV1
from router.model.intelligent import IntelligentRouter, MixingPenalty
from router.model.policy_base import Decision, InstanceView, Param, Policy, by_name, new_tokens

__all__ = [
    "ALL_AT_MAX_RUNNING",
    "AT_MAX_RUNNING",
    "BATCH_OVER_PREFILL",
    "FAILURE_KINDS",
    "FULLY_CACHED",
    "POLICIES",
    "Decision",
    "InstanceView",
    "LMetric",
    "Linear",
    "Param",
    "ParamFlag",
    "Policy",
    "PolicyParams",
    "RoundRobin",
    "add_param_arguments",
    "lmetric_score",
    "make_policy",
    "new_tokens",
    "param_args",
    "param_flags",
    "params_for",
    "params_from_namespace",
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


PolicyFactory = Callable[[int | None], Policy]
"""``factory(seed)``: a fresh policy; randomised ones draw from ``seed`` (None: OS entropy)."""


@dataclass(frozen=True, slots=True)
class Registered:
    """A registry entry: the policy's class (its ``PARAMS``) and how to make one."""

    cls: type[Policy]
    factory: PolicyFactory


POLICIES: dict[str, Registered] = {
    "lmetric": Registered(LMetric, lambda seed: LMetric()),
    "vllm_v1": Registered(VllmV1, lambda seed: VllmV1()),
    "bailian": Registered(Bailian, Bailian),
    "dynamo": Registered(Dynamo, Dynamo),
    "sglang_cache_aware": Registered(SglangCacheAware, lambda seed: SglangCacheAware()),
    "round_robin": Registered(RoundRobin, lambda seed: RoundRobin()),
    "random": Registered(RandomChoice, RandomChoice),
    "power_of_two": Registered(PowerOfTwo, PowerOfTwo),
    "linear": Registered(Linear, lambda seed: Linear()),
    "lmetric_plain": Registered(LMetric, lambda seed: LMetric(mitigate=False)),
    "mixing_penalty": Registered(MixingPenalty, lambda seed: MixingPenalty()),
    "intelligent_router": Registered(IntelligentRouter, lambda seed: IntelligentRouter()),
}
"""Policies by name (``--policy``). Add a policy by registering its class and factory here; its
parameters (``PARAMS``) then become flags of every driver."""

PUBLISHED: Final = (
    "lmetric",
    "vllm_v1",
    "bailian",
    "dynamo",
    "sglang_cache_aware",
    "round_robin",
    "random",
    "power_of_two",
)
"""The policies of published systems (LMetric and every baseline), in table order."""


PolicyParams = tuple[tuple[str, str, float], ...]
"""Policy parameters as ``ModelConfig.policy_params`` holds them: ``(policy, param, value)`` triples
(hashable; only the values given, defaults are the classes')."""


def _flag(policy: str, param: str) -> str:
    return f"--{policy.replace('_', '-')}-{param.replace('_', '-')}"


def make_policy(name: str, seed: int | None = None, params: Mapping[str, float] | None = None) -> Policy:
    """A fresh policy object for ``name``. ``seed`` seeds randomised policies (None: OS entropy);
    ``params`` sets some of the policy's ``PARAMS`` (the others keep their defaults). Raises
    ``ValueError`` for an unknown name, an unknown parameter or a value out of range (naming the flag)."""
    try:
        entry = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    values = _full_values(name, entry.cls, params or {})
    policy = entry.factory(seed)
    policy.configure(values)
    return policy


def _full_values(name: str, cls: type[Policy], params: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(params) - set(cls.PARAMS))
    if unknown:
        known = ", ".join(_flag(name, k) for k in cls.PARAMS) or "none"
        raise ValueError(f"policy {name!r} has no parameter {', '.join(unknown)} (its flags: {known})")
    values = {k: float(params.get(k, spec.default)) for k, spec in cls.PARAMS.items()}
    cls.check_params(values, _flag(name, ""))
    return values


def params_for(policy_params: Iterable[tuple[str, str, float]], name: str) -> dict[str, float]:
    """The parameters ``policy_params`` gives policy ``name`` (``make_policy``'s ``params``)."""
    return {param: value for pol, param, value in policy_params if pol == name}


def check_policy_params(policy_params: Iterable[tuple[str, str, float]]) -> None:
    """Raise ``ValueError`` (naming the flag) unless every triple names a registered policy and one of
    its parameters, in range."""
    triples = list(policy_params)
    for pol in dict.fromkeys(p for p, _, _ in triples):
        if pol not in POLICIES:
            raise ValueError(f"unknown policy {pol!r} in policy parameters")
        _full_values(pol, POLICIES[pol].cls, params_for(triples, pol))


@dataclass(frozen=True, slots=True)
class ParamFlag:
    """One ``--POLICY-PARAM`` flag: which policy and parameter, and the parameter's :class:`Param`."""

    policy: str
    param: str
    spec: Param

    @property
    def flag(self) -> str:
        """``--linear-b``: the policy's and the parameter's names, ``_`` as ``-``."""
        return _flag(self.policy, self.param)

    @property
    def dest(self) -> str:
        """The ``argparse`` attribute: ``linear_b``."""
        return self.flag[2:].replace("-", "_")


def param_flags() -> list[ParamFlag]:
    """Every registered policy's parameters as flags, in registry order (a class registered under two
    names, ``lmetric``/``lmetric_plain``, gets flags under each)."""
    return [ParamFlag(name, k, spec) for name, e in POLICIES.items() for k, spec in e.cls.PARAMS.items()]


def add_param_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every :func:`param_flags` flag to ``parser`` (float, the parameter's default and help)."""
    for f in param_flags():
        parser.add_argument(
            f.flag,
            dest=f.dest,
            type=float,
            default=f.spec.default,
            metavar="X",
            help=f"{f.policy}: {f.spec.help} (default {f.spec.default:g})",
        )


def params_from_namespace(ns: argparse.Namespace) -> PolicyParams:
    """The parsed :func:`add_param_arguments` flags as :data:`PolicyParams`: the values that differ
    from their defaults, in registry order. Raises ``ValueError`` (naming the flag) for a value out of
    range."""
    out = tuple(
        (f.policy, f.param, float(v))
        for f in param_flags()
        if (v := getattr(ns, f.dest, f.spec.default)) != f.spec.default
    )
    check_policy_params(out)
    return out


def param_args(policy_params: Iterable[tuple[str, str, float]]) -> list[str]:
    """The command-line flags that give ``policy_params`` back (``["--linear-b", "0.0"]``), for a child
    process; ``repr`` of each float, so the value survives exactly."""
    return [x for pol, param, v in policy_params for x in (_flag(pol, param), repr(float(v)))]
