"""Active-active routers: k routers serving at once, each following the others' decision streams.

Theory of operation
-------------------
One router decides on one core (docs/scale.md: ~60 requests/s at 1024 instances). To scale the router
tier out, k routers run side by side behind one address (a Kubernetes Service, a load balancer, or a
client that round-robins), each with ``--role active``. Each one follows every agent, as any router does,
so the index of what the engines cache and their load reports are the same in all of them. What one
router alone knows is what it dispatched and the agents have not reported yet: the pending dispatches
(batch size + 1, queued prefill + the request's new tokens) and the speculative index entries of its
requests. Every router publishes that on its decision stream (:mod:`router.decisions`), and an active
router follows every other active router's stream (``--peer-routers``), applying each
:class:`~kvindex.protocol.RequestRouted` through the one :class:`~router.model.model.RoutingModel` with
:meth:`~router.model.model.RoutingModel.apply_remote_decision`: a pending dispatch dated with the
deciding router's dispatch time (the same load reports that cover it there cover it here) plus its
speculative entries, exactly what its own decisions add. A peer's ``RequestFinished`` closes it; the
peer's heartbeats list its open tickets, so a lost end is repaired (the standby's
:class:`~router.model.mirror.DecisionMirror`, one per peer stream). A peer whose stream disconnects (its
process died, and its requests with it) has its dispatches released at once.

What stays true: a decision in flight between two routers (a millisecond or two on one network) is
invisible to the other, so two routers may pick the same idle instance for requests a millisecond
apart; the load report after covers both. ``launch simulate --routers k --router-delay S`` measures what
that costs (docs/scale.md). Pending entries are dated with the peer's wall clock, so the routers' clocks
must agree to well under the load-report period (NTP does).

Fencing is for primary/standby pairs and does not apply here: an active router heartbeats as
``active`` with term 0 (a :class:`~router.fence.Fence` ranks only ``primary`` heartbeats), its peers'
streams are followed here and never passed to the fence, and an active router never steps down.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kvindex.protocol import RequestRouted, RouterHeartbeat
from kvindex.protocol.numbered import DecisionReceived
from router.decisions import DecisionSubscriber
from router.model.mirror import DecisionMirror
from router.model.model import RoutingModel

__all__ = ["ActiveCollector", "ActivePeers"]

log = logging.getLogger(__name__)

AGE_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)
"""Upper bounds (seconds) of the peer-decision age histogram: what ``--decision-slot`` must exceed twice."""


class ActivePeers:
    """The other active routers' decision streams, mirrored into this router's core. Single owner: the
    loop.

    Lifecycle: construct, :meth:`start` (in a running loop), :meth:`close`. ``own_epoch``: this router's
    incarnation id; frames carrying it (this router's own stream, listed by mistake) are ignored. Raises
    ``zmq.ZMQError`` from :meth:`start` for a malformed endpoint. Never raises on a frame's content.

    Every peer decision's age when applied (this router's ``wall`` clock minus the peer's dispatch time,
    seconds: the propagation delay, plus any clock offset) is counted in :data:`AGE_BUCKETS`.
    """

    def __init__(
        self,
        core: RoutingModel,
        endpoints: Iterable[str],
        *,
        ctx: zmq.asyncio.Context,
        own_epoch: int,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self._wall = wall
        self.age_buckets = [0] * (len(AGE_BUCKETS) + 1)
        """Peer decisions applied, by age bucket (the last: older than every bound)."""
        self.age_sum = 0.0
        """Sum of their ages, seconds."""
        self.own_epoch = own_epoch
        self.mirrors: dict[str, DecisionMirror] = {}
        """One mirror per peer stream (tickets, heartbeat reconciliation and release are per peer)."""
        self.ignored_own = 0
        """Frames of this router's own stream (its endpoint given as a peer)."""
        self.subscriber = DecisionSubscriber(
            endpoints, self.on_message, ctx=ctx, on_connection=self.on_connection
        )

    def start(self) -> None:
        """Connect to every peer stream (each retried until its router is up)."""
        self.subscriber.start()

    async def close(self) -> None:
        """Close the subscription (the mirrored dispatches stay until load reports cover them)."""
        await self.subscriber.close()

    def _mirror(self, endpoint: str) -> DecisionMirror:
        m = self.mirrors.get(endpoint)
        if m is None:
            m = self.mirrors[endpoint] = DecisionMirror(self.core)
        return m

    def on_message(self, rec: DecisionReceived) -> None:
        """Apply one frame of a peer's stream. Mutates the core; never raises on content."""
        msg = rec.msg
        if msg.router_epoch == self.own_epoch:
            self.ignored_own += 1
            return
        if isinstance(msg, RequestRouted):
            age = max(0.0, self._wall() - msg.ts)
            self.age_buckets[bisect.bisect_left(AGE_BUCKETS, age)] += 1
            self.age_sum += age
        self._mirror(rec.endpoint).on_message(rec)

    def on_connection(self, endpoint: str, up: bool) -> None:
        """A peer stream connected (``up``) or dropped: a dropped peer's dispatches are released (its
        process died and its requests with it; if it merely blinked, load reports cover them anyway)."""
        if not up and endpoint in self.mirrors:
            n = self.mirrors[endpoint].release()
            if n:
                log.warning("peer router at %s disconnected: %d of its dispatches released", endpoint, n)

    # ------------------------------------------------------------------------------------------ state

    def peers(self) -> list[RouterHeartbeat]:
        """The last heartbeat of every peer that sent one."""
        return [m.primary for m in self.mirrors.values() if m.primary is not None]

    def state_json(self) -> dict[str, Any]:
        """The ``active`` part of ``GET /router/state``'s ``ha`` section: per peer stream, whether it is
        connected, its last heartbeat's role and HTTP URL, its dispatches mirrored here and counters."""
        out = []
        for ep in dict.fromkeys([*self.subscriber.endpoints, *self.mirrors]):
            m = self.mirrors.get(ep)
            hb = m.primary if m is not None else None
            out.append(
                {
                    "decisions": ep,
                    "connected": self.subscriber.connected(ep),
                    "role": hb.role if hb else None,
                    "http": hb.http if hb else None,
                    "mirrored_open": m.open_tickets if m is not None else 0,
                    "mirror": vars(m.stats).copy() if m is not None else {},
                }
            )
        n = sum(self.age_buckets)
        return {
            "peers": out,
            "lost_frames": self.subscriber.stats.lost_frames,
            "ignored_own": self.ignored_own,
            "decision_age": {
                "count": n,
                "mean_s": self.age_sum / n if n else None,
                "buckets": {f"le_{b:g}": c for b, c in zip(AGE_BUCKETS, self.age_buckets, strict=False)}
                | {"older": self.age_buckets[-1]},
            },
        }


class ActiveCollector(Collector):
    """Prometheus metrics of the peers followed, read at scrape time."""

    def __init__(self, peers: ActivePeers) -> None:
        self._peers = peers

    def collect(self) -> Iterator[Metric]:
        p = self._peers
        applied = CounterMetricFamily(
            "router_peer_decisions",
            "Other active routers' decision-stream messages applied here, by kind",
            labels=["kind"],
        )
        for kind in ("routed", "finished", "unknown_finished", "reconciled", "released"):
            applied.add_metric([kind], sum(getattr(m.stats, kind) for m in p.mirrors.values()))
        yield applied
        yield GaugeMetricFamily(
            "router_peer_dispatches_open",
            "Other active routers' dispatches counted as pending here now",
            value=sum(m.open_tickets for m in p.mirrors.values()),
        )
        yield GaugeMetricFamily(
            "router_peers_connected",
            "Other active routers' decision streams connected now",
            value=sum(1 for ep in p.subscriber.endpoints if p.subscriber.connected(ep)),
        )
        lost = CounterMetricFamily(
            "router_peer_stream_lost_frames", "Frames of the peers' decision streams never received"
        )
        lost.add_metric([], p.subscriber.stats.lost_frames)
        yield lost
        cum, buckets = 0, []
        for bound, c in zip((*AGE_BUCKETS, float("inf")), p.age_buckets, strict=True):
            cum += c
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", float(cum)))
        yield HistogramMetricFamily(
            "router_peer_decision_age_seconds",
            "Age of other active routers' decisions when applied here (propagation delay + clock offset)",
            buckets=buckets,
            sum_value=p.age_sum,
        )
