"""The simulated router: the real :class:`GlobalIndex` and :class:`Policy` fed by delayed, stale inputs.

Theory of operation
-------------------
The live router decides from what reached it: KV events and load reports that left the engines some time
ago, plus its own dispatches not yet covered by a report (``router/state.py``). This class keeps exactly
that, with the delays made explicit on the simulator's virtual clock (seconds):

* a step's KV events are queued with ``arrive = step end + event_delay``; a load report produced at ``T``
  (``ts = T``, as the agent stamps it on receipt) arrives at ``T + event_delay``;
* nothing is applied until the router next needs it: :meth:`SimRouter.route` at time ``t`` first applies,
  instance by instance and in order, every queued batch and report with ``arrive <= t``, then expires
  speculative entries older than the TTL, then decides. The router reads its state only when it routes,
  so applying lazily gives the same decisions as applying at each arrival instant;
* the decision inserts the request's block hashes speculatively on the chosen instance and records a
  pending dispatch ``(new_tokens, dispatched_at)``; a report with ``ts >= dispatched_at + margin`` covers
  it (it is dropped), as does the request's end (:meth:`SimRouter.finish`).

The policy's view of instance ``i`` is the ``router/state.py`` one: ``batch_size = running + waiting +
pending``, ``queued_prefill_tokens = reported + sum(pending new tokens)``, ``inflight`` = open requests,
``routed_tokens`` = uncached prompt tokens routed there so far, ``block_size`` = the index's.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvindex.index import GlobalIndex
from kvindex.wire import KVEvent, LoadStat
from router.policies import Decision, InstanceView, Policy

__all__ = ["SimRouter"]


@dataclass(frozen=True, slots=True)
class _Report:
    """A load report as the router stores it. ``ts`` = production time, ``arrive`` = delivery time."""

    ts: float
    arrive: float
    running: int
    waiting: int
    queued_prefill_tokens: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    max_running_requests: int


@dataclass(slots=True)
class _Instance:
    """The router's knowledge of one instance."""

    name: str
    report: _Report | None = None
    pending: dict[int, tuple[int, float]] = field(default_factory=dict)  # ticket -> (new tokens, at)
    pending_tokens: int = 0
    routed_tokens: int = 0
    block_size: int = 0
    open: set[int] = field(default_factory=set)
    kv_queue: deque[tuple[float, list[KVEvent]]] = field(default_factory=deque)
    reports: deque[_Report] = field(default_factory=deque)

    def view(self) -> InstanceView:
        r = self.report
        n = len(self.pending)
        if r is None:
            return InstanceView(
                self.name,
                n,
                self.pending_tokens,
                inflight=len(self.open),
                block_size=self.block_size,
                routed_tokens=self.routed_tokens,
            )
        return InstanceView(
            name=self.name,
            batch_size=r.running + r.waiting + n,
            queued_prefill_tokens=r.queued_prefill_tokens + self.pending_tokens,
            running=r.running,
            waiting=r.waiting,
            inflight=len(self.open),
            max_running_requests=r.max_running_requests,
            kv_used_tokens=r.kv_used_tokens,
            kv_capacity_tokens=r.kv_capacity_tokens,
            block_size=self.block_size,
            routed_tokens=self.routed_tokens,
        )


class SimRouter:
    """Index + policy + per-instance stale views on a virtual clock. Single owner; never raises on events.

    Args:
        names: instance names (all routable for the whole run).
        policy: the routing policy object (from :func:`router.policies.make_policy`).
        block_size: the index's block size in tokens (the engines' page size).
        event_delay: seconds from an engine producing a KV event batch or load report to the router
            applying it.
        load_coverage_margin: a report stamped at least this many seconds after a dispatch covers it
            (``router.config.RouterConfig.load_coverage_margin``, default 0.02).
        speculative_ttl: lifetime of unconfirmed speculative index entries in seconds (router default 5).
    """

    def __init__(
        self,
        names: Sequence[str],
        policy: Policy,
        block_size: int,
        event_delay: float,
        load_coverage_margin: float = 0.02,
        speculative_ttl: float = 5.0,
        max_speculative_per_instance: int = 65536,
    ) -> None:
        self.policy = policy
        self.index = GlobalIndex(block_size, speculative_ttl, max_speculative_per_instance)
        self.event_delay = event_delay
        self.margin = load_coverage_margin
        self._inst = [_Instance(n, block_size=block_size) for n in names]
        self._by_name = {n: i for i, n in enumerate(names)}
        for n in names:
            self.index.add_instance(n)
        self._tickets = 0
        self.failure_cases: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()

    # ---------------------------------------------------------------------------------- engine inputs

    def kv_events(self, instance: int, produced_at: float, events: list[KVEvent]) -> None:
        """Queue ``events`` of ``instance`` produced at ``produced_at``; applied ``event_delay`` later."""
        self._inst[instance].kv_queue.append((produced_at + self.event_delay, events))

    def load_report(self, instance: int, produced_at: float, stat: LoadStat) -> None:
        """Queue ``instance``'s LoadStat taken at ``produced_at``; applied ``event_delay`` later."""
        self._inst[instance].reports.append(
            _Report(
                ts=produced_at,
                arrive=produced_at + self.event_delay,
                running=stat.num_running_reqs,
                waiting=stat.num_waiting_reqs,
                queued_prefill_tokens=stat.num_waiting_uncached_tokens,
                kv_used_tokens=stat.num_tokens,
                kv_capacity_tokens=stat.max_total_num_tokens,
                max_running_requests=stat.max_running_requests,
            )
        )

    def _deliver(self, now: float) -> None:
        index, margin = self.index, self.margin
        for st in self._inst:
            q = st.kv_queue
            while q and q[0][0] <= now:
                index.apply_batch(st.name, q.popleft()[1])
            reps = st.reports
            if reps and reps[0].arrive <= now:
                rep = reps.popleft()
                while reps and reps[0].arrive <= now:  # later reports supersede (and cover more)
                    rep = reps.popleft()
                st.report = rep
                if st.pending:
                    for t in [t for t, (_, at) in st.pending.items() if rep.ts >= at + margin]:
                        st.pending_tokens -= st.pending.pop(t)[0]

    # --------------------------------------------------------------------------------------- routing

    def route(self, now: float, hashes: Sequence[int], prompt_tokens: int) -> tuple[int, int, Decision]:
        """Decide where a request arriving at ``now`` goes; returns ``(instance, ticket, decision)``.

        Mutates: applies due inputs, expires speculative entries, inserts the request's ``hashes``
        speculatively on the chosen instance and records a pending dispatch.
        """
        self._deliver(now)
        self.index.expire_speculative(now)
        match = self.index.match_hashes(hashes, prompt_tokens)
        d = self.policy.choose([st.view() for st in self._inst], prompt_tokens, match.cached_tokens)
        i = self._by_name[d.instance]
        self.index.insert_speculative(d.instance, match.hashes, now)
        self._tickets += 1
        st = self._inst[i]
        st.pending[self._tickets] = (d.new_tokens, now)
        st.pending_tokens += d.new_tokens
        st.routed_tokens += d.new_tokens
        st.open.add(self._tickets)
        self.decisions[d.instance] += 1
        for kind in d.failure_cases:
            self.failure_cases[kind] += 1
        return i, self._tickets, d

    def finish(self, instance: int, ticket: int) -> None:
        """The request of ``ticket`` ended (or failed): forget its dispatch. Idempotent; mutates."""
        st = self._inst[instance]
        p = st.pending.pop(ticket, None)
        if p is not None:
            st.pending_tokens -= p[0]
        st.open.discard(ticket)
