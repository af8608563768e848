"""The simulated router tier: k active routers, each a :class:`SimRouter`, following each other.

Theory of operation
-------------------
Active-active routers (``python -m router --peer-routers``, docs/scale.md) each follow every agent and
every other router's decision stream. The simulator models exactly that:

* every engine's KV events and load reports reach every router ``event_delay`` after they are produced
  (each router has its own inbox; they are the same agents' streams);
* requests are assigned to routers **round robin in send order** (request ``j`` of the plan, in trace
  order, goes to router ``j mod k``; a Service or client-side round robin in front of the tier), and each
  router ingests only its own requests (:func:`launch.sim.ingest.ingest_times` per router: k routers
  have k event loops);
* when router ``r`` routes a request at ``t``, its decision (instance, block hashes, new prefill tokens,
  dispatch time) reaches every other router at ``t + router_delay`` and is applied there as a pending
  dispatch plus speculative entries (:meth:`RoutingModel.apply_remote_decision`), until a load report
  dated after ``t`` covers it or the request ends; the end reaches the peers ``router_delay`` after it
  happened. A decision in flight is invisible to the peers: that window is what k > 1 costs.

With k = 1 there are no peers: every call goes straight to the one router and the composite ticket is
the router's own, so a run is identical to the single-router simulator (tests/test_golden_simulate.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from kvindex.protocol import KVEvent, LoadStat
from launch.sim.router_model import SimRouter
from router.model.policies import Decision

__all__ = ["ROUTER_DELAY_S", "SimRouterTier"]

ROUTER_DELAY_S = 0.002
"""Default seconds from one router's decision to its peers applying it: a msgpack frame on a ZeroMQ PUB
socket across a data-centre network (~0.1-0.5 ms), plus the receiving router's event loop getting to it
while it parses and routes other requests (~1 ms on a busy loop). The agents' streams are given 5 ms
(``SimConfig.event_delay``) because they add the engine and agent hops."""


class SimRouterTier:
    """k :class:`SimRouter` s fed by the same engines and each other's decisions. Single owner.

    Tickets handed out are composite (``router ticket * k + router``) so that :meth:`finish` knows which
    router decided; with k = 1 they are the router's own.

    Args:
        routers: the routers (at least one), in assignment order.
        router_delay: seconds from a decision (or a request's end) at one router to the others applying it.

    Raises:
        ValueError: no router, or a negative delay.
    """

    def __init__(self, routers: Sequence[SimRouter], router_delay: float) -> None:
        if not routers or router_delay < 0:
            raise ValueError("need at least one router and router_delay >= 0")
        self.routers = list(routers)
        self.router_delay = router_delay
        self._k = len(self.routers)
        self._last_at: dict[tuple[str, int], float] = {}  # (instance, router) -> its last dispatch there
        self.races = 0
        """Decisions that chose an instance another router had dispatched to less than ``router_delay``
        earlier (a dispatch the deciding router could not see yet): the cost of k > 1, counted."""

    # ---------------------------------------------------------------------------------- engine inputs

    def kv_events(self, instance: int, produced_at: float, events: list[KVEvent]) -> None:
        """Every router gets ``events`` of ``instance`` (see :meth:`SimRouter.kv_events`)."""
        for r in self.routers:
            r.kv_events(instance, produced_at, events)

    def load_report(self, instance: int, produced_at: float, stat: LoadStat) -> None:
        """Every router gets ``instance``'s LoadStat (see :meth:`SimRouter.load_report`)."""
        for r in self.routers:
            r.load_report(instance, produced_at, stat)

    # --------------------------------------------------------------------------------------- routing

    def route(
        self, now: float, hashes: Sequence[int], prompt_tokens: int, via: int = 0
    ) -> tuple[int, int, Decision]:
        """Router ``via`` decides for a request arriving at ``now`` (seconds); its peers get the decision
        ``router_delay`` later. Returns ``(instance, composite ticket, decision)``. Mutates."""
        router = self.routers[via]
        if self._k == 1:
            return router.route(now, hashes, prompt_tokens)
        r = router.route_full(now, hashes, prompt_tokens)
        last = self._last_at
        if any(
            j != via and last.get((r.instance, j), -1.0) > now - self.router_delay for j in range(self._k)
        ):
            self.races += 1
        last[(r.instance, via)] = now
        key = (via, r.ticket)
        arrive = now + self.router_delay
        for j, peer in enumerate(self.routers):
            if j != via:
                peer.remote_routed(arrive, key, r.instance, r, now)
        return router.index_of(r.instance), r.ticket * self._k + via, r.decision

    def finish(self, instance: int, ticket: int, now: float | None = None) -> None:
        """The request of composite ``ticket`` on ``instance`` ended at ``now`` (seconds; the deciding
        router's clock when None): its router forgets it at once, the peers ``router_delay`` later.
        Idempotent at the deciding router; mutates."""
        if self._k == 1:
            self.routers[0].finish(instance, ticket)
            return
        via, own = ticket % self._k, ticket // self._k
        router = self.routers[via]
        router.finish(instance, own)
        at = router.now if now is None else now
        for j, peer in enumerate(self.routers):
            if j != via:
                peer.remote_finished(at + self.router_delay, (via, own))

    # ---------------------------------------------------------------------------------------- totals

    @property
    def failure_cases(self) -> Counter[str]:
        """Requests where each policy failure kind was detected, over every router."""
        out: Counter[str] = Counter()
        for r in self.routers:
            out.update(r.failure_cases)
        return out

    @property
    def decisions(self) -> Counter[str]:
        """Routing decisions per instance, over every router."""
        out: Counter[str] = Counter()
        for r in self.routers:
            out.update(r.decisions)
        return out

    @property
    def peer_decisions_applied(self) -> int:
        """Peer decisions the routers applied (each counted once per receiving router)."""
        return sum(r.peer_routed for r in self.routers)
