"""Many simulations of one trace window: a disk cache of finished runs, parallel worker processes, and
the bisection of a rate scale on a policy's mean TTFT. Used by ``python -m launch compare``.

Theory of operation
-------------------
A run is named by a :class:`RunSpec` (trace window, cluster, policy, rate scale, seed): its key hashes
every field plus :data:`SIM_VERSION`, and its :class:`RunResult` (the summary, every request's TTFT and
TPOT, the wall time) is stored as ``<cache>/<key>.json``. A spec already in the cache is never simulated
again, so a bisection that probes a rate twice, or a later comparison at the rate it found, costs nothing.

The trace window is loaded and every prompt's token ids and block hashes are built once, in the parent
(:class:`Batch`), *before* the worker processes are forked: workers inherit the warmed
:class:`PromptFactory` copy-on-write and spend their time in the engines and the router only. Workers
run one spec each and return its result; results are the same whatever the number of workers (every
run is a pure function of its spec).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from launch.sim.cluster import SimConfig, simulate
from launch.sim.prompts import PromptFactory
from launch.sim.run import result_summary, seeded_policy
from launch.trace import TraceRequest, load_trace, window
from router.model.policies import POLICIES, params_for

__all__ = ["SIM_VERSION", "Batch", "RunResult", "RunSpec", "bisect_rate"]

SIM_VERSION: Final = 2
"""Bump when the simulator or a policy changes what a run produces: cached runs are then ignored."""
LMETRIC_VERSION: Final = 3
"""Bump when LMetric's mitigations change: only its cached runs are then ignored."""


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One simulation: ``policy`` over the requests the trace sends in its first ``window_s`` seconds
    (trace time), arrivals divided by ``rate_scale``, on ``cfg``'s cluster (its ``policy_params`` give
    the policy's parameters)."""

    trace: str
    window_s: float
    rate_scale: float
    policy: str
    cfg: SimConfig

    def params(self) -> dict[str, float]:
        """Every parameter of the policy, defaults filled in."""
        given = params_for(self.cfg.policy_params, self.policy)
        return {k: given.get(k, p.default) for k, p in POLICIES[self.policy].cls.PARAMS.items()}

    def key(self) -> str:
        """A stable name of this run (hash of every field and :data:`SIM_VERSION`). Only the run's own
        policy's parameters count; ``linear``'s under the key ``linear`` as ``[a, b]`` and no other
        policy's when it has none, so keys made before parameters were generic stay valid."""
        cfg = asdict(self.cfg)
        del cfg["policy_params"]
        if self.cfg.routers == 1:  # keys made before active routers existed stay valid
            del cfg["routers"], cfg["router_delay"], cfg["decision_slot"]
        body: dict[str, object] = {
            "v": SIM_VERSION,
            "lv": LMETRIC_VERSION if self.policy.startswith("lmetric") else None,
            "trace": self.trace,
            "window_s": self.window_s,
            "rate_scale": self.rate_scale,
            "policy": self.policy,
            "cfg": cfg,
            "linear": None,
        }
        params = self.params()
        if self.policy == "linear":
            body["linear"] = [params["a"], params["b"]]
        elif params:
            body["params"] = params
        return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def label(self) -> str:
        """The policy name, with ``b`` for ``linear``."""
        return f"linear(b={self.params()['b']:g})" if self.policy == "linear" else self.policy


@dataclass
class RunResult:
    """A finished run: ``summary`` (``launch.sim.run.result_summary``), per-request ``ttft``/``tpot`` in
    seconds (successful requests, TPOT only where defined), ``wall_s`` of the simulation, and whether it
    came from the cache."""

    summary: dict[str, Any]
    ttft: list[float]
    tpot: list[float]
    wall_s: float
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "ttft": self.ttft, "tpot": self.tpot, "wall_s": self.wall_s}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunResult:
        return cls(d["summary"], d["ttft"], d["tpot"], d["wall_s"], cached=True)

    @property
    def mean_ttft(self) -> float:
        v = self.summary["ttft"]["mean"]
        return math.inf if v is None else float(v)


# Worker state, set in the parent before the pool forks (inherited, never pickled).
_REQS: list[TraceRequest] = []
_PROMPTS: PromptFactory | None = None


def _run(spec: RunSpec) -> RunResult:
    plan = window(_REQS, spec.rate_scale, None)
    policy = seeded_policy(spec.policy, spec.cfg)
    t0 = time.perf_counter()
    res = simulate(plan, policy, spec.cfg, prompts=_PROMPTS)
    wall = time.perf_counter() - t0
    ok = [r for r in res.records if r.status == "ok"]
    return RunResult(
        summary=result_summary(res),
        ttft=[round(r.ttft, 6) for r in ok if r.ttft is not None],
        tpot=[round(r.tpot, 7) for r in ok if r.tpot is not None],
        wall_s=wall,
    )


@dataclass
class Batch:
    """Runs of one trace window on one cluster config, cached in ``cache_dir`` (None: no cache), on
    ``jobs`` worker processes. ``on_result(spec, result)`` is called as each run finishes (or is found
    in the cache). Call :meth:`close` (or use as a context manager) to stop the workers."""

    trace: Path
    window_s: float
    cfg: SimConfig
    cache_dir: Path | None
    jobs: int = 2
    on_result: Callable[[RunSpec, RunResult], None] | None = None
    _pool: Any = field(default=None, init=False, repr=False)
    _warm: bool = field(default=False, init=False, repr=False)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def spec(self, policy: str, rate_scale: float, params: Mapping[str, float] | None = None) -> RunSpec:
        """The :class:`RunSpec` of ``policy`` at ``rate_scale`` in this batch's window and cluster;
        ``params`` replace the cluster config's parameters of ``policy``."""
        cfg = self.cfg
        if params is not None:
            others = tuple(t for t in cfg.policy_params if t[0] != policy)
            cfg = replace(cfg, policy_params=others + tuple((policy, k, float(v)) for k, v in params.items()))
        return RunSpec(str(self.trace), self.window_s, round_scale(rate_scale), policy, cfg)

    def _load(self, spec: RunSpec) -> RunResult | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{spec.key()}.json"
        if not path.is_file():
            return None
        return RunResult.from_json(json.loads(path.read_text()))

    def _store(self, spec: RunSpec, res: RunResult) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f"{spec.key()}.tmp"
        tmp.write_text(json.dumps(res.to_json()))
        tmp.replace(self.cache_dir / f"{spec.key()}.json")

    def _warm_up(self) -> None:
        """Load the window and build every prompt's tokens and hashes once (before forking)."""
        global _REQS, _PROMPTS
        if self._warm:
            return
        reqs = [r for r in load_trace(self.trace) if r.arrival < self.window_s]
        prompts = PromptFactory(self.cfg.page_size, self.cfg.vocab_size, max_cached_blocks=1 << 22)
        for r in reqs:
            prompts.hashes(r, prompts.tokens(r))
        _REQS, _PROMPTS = reqs, prompts
        self._warm = True

    def run(self, specs: Sequence[RunSpec]) -> list[RunResult]:
        """Results of ``specs`` in order: cached ones read, the others simulated ``jobs`` at a time
        (longest expected first)."""
        out: dict[int, RunResult] = {}
        todo: list[int] = []
        for k, s in enumerate(specs):
            got = self._load(s)
            if got is not None:
                out[k] = got
                if self.on_result is not None:
                    self.on_result(s, got)
            elif k not in todo and not any(specs[j] == s for j in todo):
                todo.append(k)
        if todo:
            self._warm_up()
            todo.sort(key=lambda k: -specs[k].rate_scale)  # rough: heavier load, longer run
            if self.jobs <= 1 or len(todo) == 1:
                results = map(_run, [specs[k] for k in todo])
                pairs = zip(todo, results, strict=True)
                for k, res in pairs:
                    self._finish(specs[k], res, out, k)
            else:
                if self._pool is None:
                    self._pool = mp.get_context("fork").Pool(self.jobs)
                pending = {k: self._pool.apply_async(_run, (specs[k],)) for k in todo}
                for k, fut in pending.items():
                    self._finish(specs[k], fut.get(), out, k)
        for k, s in enumerate(specs):  # duplicates of a spec share its result
            if k not in out:
                out[k] = next(out[j] for j in out if specs[j] == s)
        return [out[k] for k in range(len(specs))]

    def _finish(self, spec: RunSpec, res: RunResult, out: dict[int, RunResult], k: int) -> None:
        self._store(spec, res)
        out[k] = res
        if self.on_result is not None:
            self.on_result(spec, res)


def round_scale(x: float) -> float:
    """``x`` to 4 significant digits (rate scales are cache keys)."""
    return float(f"{x:.4g}")


@dataclass(frozen=True, slots=True)
class Bisection:
    """The rate scale found for a target mean TTFT, and every probe ``(rate scale, mean TTFT)``."""

    target: float
    rate_scale: float
    mean_ttft: float
    probes: tuple[tuple[float, float], ...]


def bisect_rate(
    batch: Batch,
    policy: str,
    target: float,
    lo: float,
    tol: float = 0.02,
    max_rounds: int = 8,
) -> Bisection:
    """The rate scale at which ``policy``'s mean TTFT is ``target`` (within ``tol``, relative).

    Brackets from ``lo`` (whose mean TTFT must be below the target) by doubling, then narrows the
    bracket geometrically, probing two points a round (one per worker) at 1/3 and 2/3 of it in log space.
    Returns the probe closest to the target. Assumes mean TTFT grows with the rate (it does, up to noise).
    """
    probes: dict[float, float] = {}

    def probe(scales: Sequence[float]) -> None:
        specs = [batch.spec(policy, s) for s in scales]
        for s, r in zip(specs, batch.run(specs), strict=True):
            probes[s.rate_scale] = r.mean_ttft

    lo = round_scale(lo)
    probe([lo])
    if probes[lo] >= target:  # the search only moves up from lo: it would return lo itself
        raise ValueError(
            f"mean TTFT at rate scale {lo} is {probes[lo]:.3f} s, not below the target {target:.3f} s"
        )
    hi = round_scale(max(1.0, 2 * lo))
    while True:
        probe([hi])
        if probes[hi] >= target:
            break
        lo, hi = hi, round_scale(hi * 2)
        if hi > 1e4:
            raise RuntimeError(
                f"mean TTFT never reaches {target:.3f} s (at rate scale {lo}: {probes[lo]:.3f})"
            )
    for _ in range(max_rounds):
        best = min(probes, key=lambda s: abs(probes[s] - target))
        if abs(probes[best] - target) <= tol * target or hi / lo < 1.005:
            break
        ratio = hi / lo
        a, b = round_scale(lo * ratio ** (1 / 3)), round_scale(lo * ratio ** (2 / 3))
        probe([a, b])
        for s in (a, b):
            if probes[s] < target:
                lo = max(lo, s)
            else:
                hi = min(hi, s)
    best = min(probes, key=lambda s: abs(probes[s] - target))
    return Bisection(target, best, probes[best], tuple(sorted(probes.items())))


def with_profile(cfg: SimConfig, profile: str, instances: int) -> SimConfig:
    """``cfg`` with another profile and instance count."""
    return replace(cfg, profile=profile, instances=instances)
