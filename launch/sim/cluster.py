"""Discrete-event simulation of a routed cluster: N :class:`EngineCore` s + the router, on a virtual clock.

Theory of operation
-------------------
Time is a float of virtual seconds; nothing reads the wall clock except to report how long the run took.
A heap orders the events ``(time, kind, seq, payload)``; ``kind`` breaks ties at equal times in this
order, and ``seq`` (insertion order) makes the order total, so a run is a pure function of its inputs:

0. ``DONE``: instance ``i``'s step ends; its outputs are delivered, its KV events queued for the router
   (``event_delay`` later), the next step scheduled (:meth:`SimInstance.run_until`).
1. ``TICK``: instance ``i`` produces a load report (its ``LoadStat`` now); the router gets it
   ``event_delay`` later. Engines report every ``load_period`` seconds, each at its own phase
   (``Random(seed)``). Only the ticks whose report is the newest one delivered when some request
   arrives are computed: for an arrival at ``t`` that is the last tick ``T`` with ``T + delay <= t``.
   Ticks in between would be superseded before the router reads them, so skipping them changes nothing.
2. ``ARRIVAL``: trace request ``k`` arrives (sent at trace time / rate scale, then ingested by the
   router: :func:`~launch.sim.ingest.ingest_times`); the router routes it at once
   (:class:`SimRouter`) and it is queued in the chosen engine. With ``routers`` > 1 the requests go to
   the routers round robin in send order, each router ingests its own, and each decision reaches the
   other routers ``router_delay`` later (:mod:`launch.sim.router_tier`).
3. ``KICK``: an idle engine that received requests schedules a step (after every arrival of that
   instant, so simultaneous arrivals can share a first step).

A request is sent at its trace time and arrives (is routed) once the router has ingested it
(``SimConfig.ingest_overhead + ingest_per_token * prompt tokens`` of processor-shared work); it reaches
the engine with no further forwarding delay, and tokens reach the client when their step ends. Per request: TTFT = end of the step
producing its first token - send; e2e = end of its last step - send; TPOT = (e2e - TTFT) / (output
tokens - 1), as ``launch replay`` measures them.
"""

from __future__ import annotations

import copy
import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from agents.engine.core import EngineConfig, EngineCore, Request, RequestRejected, TokenOutput
from agents.engine.profiles import DEFAULT_PROFILE, get_profile
from launch.sim.engine_pool import LiveRequest, SimInstance
from launch.sim.ingest import INGEST_OVERHEAD_S, INGEST_PER_TOKEN_S, ingest_times
from launch.sim.prompts import PromptFactory
from launch.sim.router_model import SimRouter
from launch.sim.router_tier import ROUTER_DELAY_S, SimRouterTier
from launch.summary import RequestRecord
from launch.trace import DEFAULT_VOCAB_SIZE, TraceRequest
from router.model.config import DEFAULTS, ModelConfig
from router.model.policies import Policy
from router.model.slots import DecisionSlots

__all__ = ["SimConfig", "SimResult", "simulate"]

_DONE, _TICK, _ARRIVAL, _KICK = 0, 1, 2, 3

HOLD_S = 0.02
"""How long a held request waits at the router before it is routed again (the paper acts every 0.02 s)."""
MAX_HOLDS = 50
"""A request is held at most this many times (1 s), then routed where the policy ranks best."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated cluster. Tokens in tokens, times in seconds.

    Engine fields mirror ``agents.engine.config.ServerConfig`` (SGLang's flag names); router fields
    mirror ``router.config.RouterConfig`` defaults. ``event_delay``: engine -> agent -> router latency
    of KV event batches and load reports; ``load_period``: seconds between an engine's load reports;
    ``ingest_overhead + ingest_per_token * prompt tokens``: seconds of the router's ingest work per
    request, processor-shared (see :data:`launch.sim.ingest.INGEST_OVERHEAD_S`). Both 0: every request is routed at its
    trace time, and equal timestamps in trace order. ``policy_params``: the policies' parameters given
    (``ModelConfig.policy_params``; :func:`launch.sim.run.seeded_policy` makes a policy with them).
    ``routers``: active routers, each following the others' decisions ``router_delay`` seconds late
    (:mod:`launch.sim.router_tier`; 1 = the single router); ``decision_slot`` > 0: they take turns to
    decide, each in the first half of its own slot of that many seconds (:mod:`router.model.slots`).
    """

    instances: int = 16
    profile: str = DEFAULT_PROFILE
    page_size: int = 16
    max_running_requests: int = 128
    max_total_tokens: int | None = None
    chunked_prefill_size: int = 8192
    enable_mixed_chunk: bool = False
    context_length: int = 131072
    event_delay: float = 0.005
    load_period: float = 0.1
    ingest_overhead: float = INGEST_OVERHEAD_S
    ingest_per_token: float = INGEST_PER_TOKEN_S
    load_coverage_margin: float = DEFAULTS.load_coverage_margin
    speculative_ttl: float = DEFAULTS.speculative_ttl
    max_speculative_per_instance: int = DEFAULTS.max_speculative_per_instance
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seed: int = 0
    policy_params: tuple[tuple[str, str, float], ...] = DEFAULTS.policy_params
    routers: int = 1
    router_delay: float = ROUTER_DELAY_S
    decision_slot: float = 0.0

    def engine_config(self) -> EngineConfig:
        """The :class:`EngineConfig` every simulated engine runs with."""
        return EngineConfig(
            page_size=self.page_size,
            max_total_tokens=self.max_total_tokens,
            max_running_requests=self.max_running_requests,
            chunked_prefill_size=self.chunked_prefill_size,
            mixed_chunk=self.enable_mixed_chunk,
            context_length=self.context_length,
        )


@dataclass
class SimResult:
    """Outcome of one simulated run. ``records`` in trace order; batch sizes in running requests."""

    policy: str
    records: list[RequestRecord]
    steps: int
    max_batch_size: int
    mean_batch_size: float
    """Mean over every step of every instance of the running requests at the step (per step)."""
    mean_batch_size_time_weighted: float
    """Running requests averaged over the instances' busy time (weighted by step duration)."""
    sim_wall_s: float
    virtual_s: float
    decisions: dict[str, int] = field(default_factory=dict)
    failure_cases: dict[str, int] = field(default_factory=dict)
    retractions: int = 0
    peer_decisions: int = 0
    """With several routers: peer decisions the routers applied (each counted once per receiver)."""
    peer_races: int = 0
    """With several routers: decisions for an instance that another router had chosen less than the
    router delay before, unseen (:attr:`launch.sim.router_tier.SimRouterTier.races`)."""


def _ingest_per_router(plan: Sequence[tuple[float, TraceRequest]], cfg: SimConfig) -> list[float]:
    """:func:`ingest_times` of ``plan`` (same order), each router ingesting its own requests (request
    ``j`` to router ``j mod cfg.routers``) on its own processor; with decision slots, each routed at
    the start of its router's next slot if it was ingested outside one (:meth:`DecisionSlots.next_start`)."""
    k = cfg.routers
    out = [0.0] * len(plan)
    for r in range(k):
        part = plan[r::k]
        times = ingest_times(
            [t for t, _ in part],
            [req.input_length for _, req in part],
            cfg.ingest_overhead,
            cfg.ingest_per_token,
        )
        if cfg.decision_slot > 0:
            slots = DecisionSlots(r, k, cfg.decision_slot)
            times = [slots.next_start(t) for t in times]
        out[r::k] = times
    return out


def _needed_ticks(arrivals: Sequence[float], phase: float, period: float, delay: float) -> list[float]:
    """For each arrival ``t``, the last report time ``T = phase + k * period`` (k >= 0) with ``T + delay
    <= t``; sorted, without duplicates."""
    out: list[float] = []
    for t in arrivals:
        k = math.floor((t - delay - phase) / period)
        while k >= 0 and phase + k * period + delay > t:  # float rounding: step back
            k -= 1
        while phase + (k + 1) * period + delay <= t:
            k += 1
        if k < 0:
            continue
        tick = phase + k * period
        if not out or tick != out[-1]:
            out.append(tick)
    return out


def simulate(
    plan: Sequence[tuple[float, TraceRequest]],
    policy: Policy,
    cfg: SimConfig,
    *,
    prompts: PromptFactory | None = None,
    progress: bool = False,
    desc: str = "",
    routed_at: Sequence[float] | None = None,
    before_route: Callable[[TraceRequest, int], None] | None = None,
) -> SimResult:
    """Replay ``plan`` (``(send seconds, request)`` pairs, as :func:`launch.trace.window` gives) through
    ``cfg.instances`` simulated engines routed by ``policy``; runs until every request has finished.

    Each request is routed at :func:`ingest_times` of the sends, or at ``routed_at`` (seconds, one per
    ``plan`` entry, e.g. a live run's routing times) when given; latencies run from the send either way.
    ``prompts`` may be shared between runs of the same page size (it only memoises). Raises
    :class:`launch.trace.TraceError` if a request has too few ``hash_ids``, ``ValueError`` for an unknown
    profile, a bad config or a ``routed_at`` of another length than ``plan``.

    ``before_route(request, held)`` is called before each routing decision with the number of requests
    held at the router. A decision whose ``reason`` is ``hold`` (``intelligent_router``) is undone (the
    dispatch forgotten; its speculative index entries expire by TTL) and the request asks again
    :data:`HOLD_S` later, at most :data:`MAX_HOLDS` times; the load reports it then reads are the newest
    computed for first arrivals (a held request may see a report up to one period older than the
    newest one a live router would have).
    """
    if cfg.instances < 1 or cfg.load_period <= 0 or cfg.event_delay < 0:
        raise ValueError("need instances >= 1, load_period > 0 and event_delay >= 0")
    if cfg.routers < 1 or cfg.router_delay < 0 or cfg.decision_slot < 0:
        raise ValueError("need routers >= 1, router_delay >= 0 and decision_slot >= 0")
    if cfg.decision_slot > 0 and cfg.routers == 1:
        raise ValueError("decision slots are for several routers")
    if routed_at is not None and len(routed_at) != len(plan):
        raise ValueError(f"routed_at has {len(routed_at)} times for {len(plan)} requests")
    wall0 = time.perf_counter()
    profile = get_profile(cfg.profile)
    if prompts is None or prompts.page_size != cfg.page_size:
        prompts = PromptFactory(cfg.page_size, cfg.vocab_size)
    names = [f"sim-{i:02d}" for i in range(cfg.instances)]
    mcfg = ModelConfig(
        policy=policy.name,
        load_coverage_margin=cfg.load_coverage_margin,
        speculative_ttl=cfg.speculative_ttl,
        max_speculative_per_instance=cfg.max_speculative_per_instance,
    )
    # Router 0 keeps the policy object given; the others get copies of its state (a randomised policy's
    # generator included), each router then deciding on its own.
    policies = [policy] + [copy.deepcopy(policy) for _ in range(cfg.routers - 1)]
    router = SimRouterTier(
        [SimRouter(names, p, cfg.page_size, cfg.event_delay, mcfg) for p in policies], cfg.router_delay
    )
    # Each request is routed once the router has ingested it (:func:`ingest_times`): bursts of equal
    # timestamps are routed shortest prompt first, as the live router routes them.
    sent_at = {req.index: t for t, req in plan}
    via = {req.index: j % cfg.routers for j, (_, req) in enumerate(plan)}  # round robin in send order
    if routed_at is None:
        routed_at = _ingest_per_router(plan, cfg)
    plan = sorted(zip(routed_at, (req for _, req in plan), strict=True), key=lambda p: (p[0], p[1].index))
    records: dict[int, RequestRecord] = {}
    bar = tqdm(total=len(plan), unit="req", desc=desc, disable=not progress, dynamic_ncols=True, leave=False)

    def on_finish(lv: LiveRequest, out: TokenOutput, now: float) -> None:
        sent = sent_at[lv.index]
        e2e = now - sent
        ttft = e2e if lv.first_token_at is None else lv.first_token_at - sent
        n = out.completion_tokens
        records[lv.index] = RequestRecord(
            start_time=sent,
            ttft=ttft,
            tpot=(e2e - ttft) / (n - 1) if n >= 2 else None,
            e2e=e2e,
            prompt_tokens=lv.prompt_tokens,
            cached_tokens=out.cached_tokens,
            output_tokens=n,
            index=lv.index,
        )
        bar.update(1)

    ecfg = cfg.engine_config()
    insts = [SimInstance(i, n, EngineCore(ecfg, profile), router, on_finish) for i, n in enumerate(names)]

    heap: list[tuple[float, int, int, int]] = []
    seq = 0
    for k, (t, _) in enumerate(plan):
        heap.append((t, _ARRIVAL, seq, k))
        seq += 1
    arrivals = [t for t, _ in plan]
    rng = random.Random(cfg.seed)
    ticks = [
        _needed_ticks(arrivals, rng.uniform(0.0, cfg.load_period), cfg.load_period, cfg.event_delay)
        for _ in insts
    ]
    tick_pos = [0] * len(insts)
    for i, tl in enumerate(ticks):
        if tl:
            heap.append((tl[0], _TICK, seq, i))
            seq += 1
    heapq.heapify(heap)
    kicked: set[int] = set()
    push, pop = heapq.heappush, heapq.heappop
    now = 0.0
    arrived = 0  # first arrivals popped so far: plan[arrived] is the next one
    holds: dict[int, int] = {}  # plan position -> times held
    rearrive: list[float] = []  # when held requests ask again (a heap)
    while heap:
        now, kind, _, x = pop(heap)
        if kind == _DONE:
            # An instance's steps interact with the rest only at arrivals (routing reads the router's
            # state; a kick) and at its own load report: it may run ahead of other instances' steps.
            horizon = plan[arrived][0] if arrived < len(plan) else math.inf
            if rearrive and rearrive[0] < horizon:
                horizon = rearrive[0]
            tp = tick_pos[x]
            if tp < len(ticks[x]) and ticks[x][tp] < horizon:
                horizon = ticks[x][tp]
            end = insts[x].run_until(now, horizon)
            if end is not None:
                push(heap, (end, _DONE, seq, x))
                seq += 1
        elif kind == _TICK:
            router.load_report(x, now, insts[x].core.load_stat())
            tick_pos[x] += 1
            if tick_pos[x] < len(ticks[x]):
                push(heap, (ticks[x][tick_pos[x]], _TICK, seq, x))
                seq += 1
        elif kind == _ARRIVAL:
            if x in holds:
                heapq.heappop(rearrive)
            else:
                arrived += 1
            req = plan[x][1]
            tokens = prompts.tokens(req)
            if before_route is not None:
                before_route(req, len(rearrive))
            i, ticket, decision = router.route(now, prompts.hashes(req, tokens), len(tokens), via[req.index])
            if decision.reason == "hold" and holds.get(x, 0) < MAX_HOLDS:
                router.finish(i, ticket, now)
                holds[x] = holds.get(x, 0) + 1
                push(heap, (now + HOLD_S, _ARRIVAL, seq, x))
                seq += 1
                heapq.heappush(rearrive, now + HOLD_S)
                continue
            inst = insts[i]
            lv = LiveRequest(req.index, now, ticket, len(tokens))
            try:
                inst.add(Request(str(req.index), tokens, req.output_length, True, now), lv, now)
            except RequestRejected as exc:
                router.finish(i, ticket, now)
                records[req.index] = RequestRecord(
                    start_time=sent_at[req.index],
                    status=f"rejected: {exc}",
                    prompt_tokens=len(tokens),
                    index=req.index,
                )
                bar.update(1)
                continue
            if inst.step is None and i not in kicked:
                kicked.add(i)
                push(heap, (now, _KICK, seq, i))
                seq += 1
        else:  # _KICK
            kicked.discard(x)
            end = insts[x].start(now)
            if end is not None:
                push(heap, (end, _DONE, seq, x))
                seq += 1
    bar.close()
    steps = sum(s.steps for s in insts)
    busy = sum(s.busy_s for s in insts)
    return SimResult(
        policy=policy.name,
        records=[records[k] for k in sorted(records)],
        steps=steps,
        max_batch_size=max(s.batch_max for s in insts),
        mean_batch_size=sum(s.batch_sum for s in insts) / steps if steps else 0.0,
        mean_batch_size_time_weighted=sum(s.batch_time for s in insts) / busy if busy else 0.0,
        sim_wall_s=time.perf_counter() - wall0,
        virtual_s=max([now] + [s.last_end for s in insts]),
        decisions=dict(sorted(router.decisions.items())),
        failure_cases=dict(sorted(Counter(router.failure_cases).items())),
        retractions=sum(s.core.num_retractions for s in insts),
        peer_decisions=router.peer_decisions_applied,
        peer_races=router.races,
    )
