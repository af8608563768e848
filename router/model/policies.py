"""The policy registry: every routing policy by name (``--policy``), how to make one, and its parameters as
``--POLICY-PARAM`` flags of every driver. Pure: no I/O.

The policies themselves are in :mod:`router.model.lmetric` (LMetric, ``linear``, round robin),
:mod:`router.model.baselines` (the peers' policies) and :mod:`router.model.intelligent`; their common
base is :mod:`router.model.policy_base`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from router.model.baselines import Bailian, Dynamo, PowerOfTwo, RandomChoice, SglangCacheAware, VllmV1
from router.model.intelligent import IntelligentRouter, MixingPenalty
from router.model.lmetric import Linear, LMetric, RoundRobin
from router.model.policy_base import Decision, InstanceView, Param, Policy, new_tokens

__all__ = [
    "POLICIES",
    "PUBLISHED",
    "Decision",
    "InstanceView",
    "Param",
    "ParamFlag",
    "Policy",
    "PolicyParams",
    "Registered",
    "add_param_arguments",
    "check_policy_params",
    "make_policy",
    "new_tokens",
    "param_args",
    "param_flags",
    "params_for",
    "params_from_namespace",
]

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
