"""The simulated router: delay queues and a virtual clock in front of the live router's own model.

Theory of operation
-------------------
The decisions are :class:`router.model.model.RoutingModel`'s, the very object the live router and its
standby run; this module adds only what the simulator must make explicit, the delays, on a virtual clock
(seconds):

* the engines are declared static instances of the model (up and synced for the whole run: no agent,
  no heartbeat, no snapshot);
* a step's KV events are queued with ``arrive = step end + event_delay``; a load report produced at ``T``
  (``ts = T``, as the agent stamps it on receipt) arrives at ``T + event_delay``;
* nothing is applied until the router next needs it: :meth:`SimRouter.route` at time ``t`` first hands
  the model, instance by instance and in order, every queued batch with ``arrive <= t`` and the latest
  report with ``arrive <= t`` (a later report supersedes and covers more), then expires speculative
  entries older than the TTL, then routes. The router reads its state only when it routes, so applying
  lazily gives the same decisions as applying at each arrival instant.
* with several active routers (:mod:`launch.sim.router_tier`) each one's decisions and request ends reach
  the others ``router_delay`` later: :meth:`SimRouter.remote_routed` / :meth:`SimRouter.remote_finished`
  queue them (in a heap: engines finish requests out of time order between two arrivals) and the same
  lazy delivery applies them first, through :meth:`RoutingModel.apply_remote_decision` and
  :meth:`RoutingModel.finish`, as a live router applies a peer's decision stream. With one router the
  queue stays empty and nothing changes.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvindex.index import GlobalIndex
from kvindex.protocol import KVEvent, LoadReport, LoadStat
from router.model.config import ModelConfig
from router.model.model import Routed, RoutingModel
from router.model.policies import Decision, Policy
from router.model.sync import SnapshotJob

__all__ = ["SimRouter"]


@dataclass(slots=True)
class _Inbox:
    """What has left one engine for the router and not yet reached it."""

    name: str
    kv: deque[tuple[float, list[KVEvent]]] = field(default_factory=deque)  # (arrive, events)
    reports: deque[tuple[float, LoadReport]] = field(default_factory=deque)  # (arrive, report)


@dataclass(frozen=True, slots=True)
class _RemoteRouted:
    """A peer router's decision on its way to this one."""

    key: tuple[int, int]  # (deciding router, its ticket)
    instance: str
    hashes: tuple[int, ...]
    new_tokens: int
    dispatched_at: float


@dataclass(frozen=True, slots=True)
class _RemoteFinished:
    """The end of a peer router's request, on its way to this one."""

    key: tuple[int, int]


def _no_snapshot(job: SnapshotJob) -> None:
    raise AssertionError(f"static instance {job.instance} asked for a snapshot")


class SimRouter:
    """The routing model on a virtual clock, fed by delayed inputs. Single owner; never raises on events.

    Args:
        names: instance names (all routable for the whole run).
        policy: the routing policy object (from :func:`router.model.policies.make_policy`).
        block_size: the index's block size in tokens (the engines' page size).
        event_delay: seconds from an engine producing a KV event batch or load report to the router
            applying it.
        cfg: the model's other settings (coverage margin, speculative TTL and cap); defaults are the
            live router's.
    """

    def __init__(
        self,
        names: Sequence[str],
        policy: Policy,
        block_size: int,
        event_delay: float,
        cfg: ModelConfig | None = None,
    ) -> None:
        self.now = 0.0
        self.model = RoutingModel(
            cfg or ModelConfig(), _no_snapshot, policy=policy, mono=self._clock, wall=self._clock
        )
        for n in names:
            self.model.add_static(n, block_size)
        self.event_delay = event_delay
        self._inbox = [_Inbox(n) for n in names]
        self._by_name = {n: i for i, n in enumerate(names)}
        self._remote: list[tuple[float, int, _RemoteRouted | _RemoteFinished]] = []  # (arrive, seq, msg)
        self._remote_seq = 0
        self._remote_tickets: dict[tuple[int, int], tuple[str, int]] = {}  # peer key -> (instance, ours)
        self.peer_routed = 0
        """Peer decisions applied (pending dispatch + speculative entries)."""
        self.peer_finished = 0
        """Peer request ends applied (closing a pending dispatch mirrored here)."""

    def _clock(self) -> float:
        return self.now

    @property
    def index(self) -> GlobalIndex:
        """The model's global index."""
        assert self.model.index is not None  # made by the first add_static
        return self.model.index

    @property
    def failure_cases(self) -> Counter[str]:
        """Requests where each policy failure kind was detected."""
        return self.model.stats.failure_cases

    @property
    def decisions(self) -> Counter[str]:
        """Routing decisions per instance."""
        out: Counter[str] = Counter()
        for (_, name), n in self.model.stats.decisions.items():
            out[name] += n
        return out

    # ---------------------------------------------------------------------------------- engine inputs

    def kv_events(self, instance: int, produced_at: float, events: list[KVEvent]) -> None:
        """Queue ``events`` of ``instance`` produced at ``produced_at``; applied ``event_delay`` later."""
        self._inbox[instance].kv.append((produced_at + self.event_delay, events))

    def load_report(self, instance: int, produced_at: float, stat: LoadStat) -> None:
        """Queue ``instance``'s LoadStat taken at ``produced_at``; applied ``event_delay`` later."""
        box = self._inbox[instance]
        report = LoadReport.of_stat(stat, box.name, 0, produced_at)
        box.reports.append((produced_at + self.event_delay, report))

    def remote_routed(
        self, arrive: float, key: tuple[int, int], instance: str, r: Routed, dispatched_at: float
    ) -> None:
        """Queue peer decision ``r`` (to ``instance``, made at ``dispatched_at`` virtual seconds, ``key`` =
        (peer index, peer ticket)); applied at the first routing at or after ``arrive``. Mutates."""
        msg = _RemoteRouted(key, instance, r.hashes, r.decision.new_tokens, dispatched_at)
        heapq.heappush(self._remote, (arrive, self._remote_seq, msg))
        self._remote_seq += 1

    def remote_finished(self, arrive: float, key: tuple[int, int]) -> None:
        """Queue the end of the peer request ``key``; applied at the first routing at or after ``arrive``
        (after its decision: same delay, later send). Mutates."""
        heapq.heappush(self._remote, (arrive, self._remote_seq, _RemoteFinished(key)))
        self._remote_seq += 1

    def _deliver_remote(self, now: float) -> None:
        model, q = self.model, self._remote
        while q and q[0][0] <= now:
            msg = heapq.heappop(q)[2]
            if isinstance(msg, _RemoteRouted):
                ours = model.apply_remote_decision(
                    msg.instance, msg.hashes, msg.new_tokens, msg.dispatched_at
                )
                self._remote_tickets[msg.key] = (msg.instance, ours)
                self.peer_routed += 1
            else:
                got = self._remote_tickets.pop(msg.key, None)
                if got is not None:
                    model.finish(*got)
                    self.peer_finished += 1

    def _deliver(self, now: float) -> None:
        model = self.model
        if self._remote:
            self._deliver_remote(now)
        for box in self._inbox:
            q = box.kv
            while q and q[0][0] <= now:
                model.on_events(box.name, q.popleft()[1])
            reps = box.reports
            if reps and reps[0][0] <= now:
                rep = reps.popleft()[1]
                while reps and reps[0][0] <= now:  # later reports supersede (and cover more)
                    rep = reps.popleft()[1]
                model.on_load(rep)

    # --------------------------------------------------------------------------------------- routing

    def route(self, now: float, hashes: Sequence[int], prompt_tokens: int) -> tuple[int, int, Decision]:
        """Decide where a request arriving at ``now`` goes; returns ``(instance, ticket, decision)``.

        Mutates: applies due inputs, expires speculative entries, then routes through the model (which
        inserts the request's ``hashes`` speculatively on the chosen instance and records a pending
        dispatch).
        """
        r = self.route_full(now, hashes, prompt_tokens)
        return self._by_name[r.instance], r.ticket, r.decision

    def route_full(self, now: float, hashes: Sequence[int], prompt_tokens: int) -> Routed:
        """:meth:`route`, returning the model's whole :class:`Routed` (what a peer needs to mirror it)."""
        self.now = now
        self._deliver(now)
        self.model.expire_speculative()
        return self.model.route_hashes(prompt_tokens, hashes)

    def index_of(self, name: str) -> int:
        """The position of instance ``name``. Raises ``KeyError`` for an unknown one."""
        return self._by_name[name]

    def name_of(self, instance: int) -> str:
        """The name of instance number ``instance``."""
        return self._inbox[instance].name

    def finish(self, instance: int, ticket: int) -> None:
        """The request of ``ticket`` ended (or failed): forget its dispatch. Idempotent; mutates."""
        self.model.finish(self._inbox[instance].name, ticket)
