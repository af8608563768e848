"""Per-instance state built from the agents' messages, plus the router's own dispatch accounting. No I/O.

An engine reports its load (running, waiting, queued prefill tokens) a few times a second; between two
reports the router may send it many requests. So that LMetric does not send a burst to the instance that
*looked* idle at the last report, every routing decision adds a :class:`PendingDispatch` to the chosen
instance, and its effective load is::

    batch_size            = report.running + report.waiting + len(pending)
    queued_prefill_tokens = report.queued_prefill_tokens + sum(p.new_tokens for p in pending)

A pending entry is dropped once a load report stamped at least ``load_coverage_margin`` seconds after the
dispatch arrives (the engine had the request when it measured), or when the request finishes or fails.
Report stamps are the agent's wall clock, dispatch times the router's (same host, or NTP-synchronised
hosts: a skew larger than the margin makes entries linger until the request ends, never vanish early
unless the agent's clock is ahead).

Up/down and sync transitions are decided by :class:`router.model.model.RoutingModel`; this module only holds
the facts and answers questions about them (``is_routable``, ``heartbeat_expired``). Synchronous, single
owner (the event loop, or the simulator's virtual clock), no locks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Final, Literal

from kvindex.protocol import Heartbeat, LoadReport
from router.model.policy_base import InstanceView

SyncStatus = Literal["unsynced", "resyncing", "synced"]

_REPORTED: Final = tuple(
    f.name
    for f in fields(InstanceView)
    if f.name in {g.name for g in fields(LoadReport)} and f.name != "queued_prefill_tokens"
)
"""View fields taken as reported (running, waiting, KV usage and capacity, max running requests, ...)."""
_read_reported = attrgetter(*_REPORTED)


@dataclass(slots=True)
class PendingDispatch:
    """A request sent to an instance and not yet visible in its load reports.

    ``new_tokens``: its uncached prompt tokens there; ``dispatched_at``: router wall clock, Unix seconds.
    """

    ticket: int
    new_tokens: int
    dispatched_at: float


@dataclass
class InstanceState:
    """Everything the router knows about one instance. Times: ``*_at`` monotonic seconds of the router.

    ``up``: a healthy heartbeat arrived within the heartbeat timeout. ``sync``: whether the index holds
    this instance's blocks (``synced``), is being rebuilt from a snapshot (``resyncing``), or not at all.
    ``refused``: its block size disagrees with the cluster's. ``suspect_since``: a connection to its
    engine failed at that time; cleared by a healthy heartbeat received ``suspect_cooldown`` later.
    ``open_tickets``: requests the router has open to it (``inflight``), a superset of ``pending``.
    ``routed_tokens``: uncached prompt tokens dispatched to it so far (cumulative; see InstanceView).
    ``block_size``: its engine's page size in tokens (from heartbeats; 0 before the first one).
    ``static``: declared by configuration (the simulator, a router without agents): always up, never
    expires, synced from the start; ``static_url`` its engine URL.
    """

    name: str
    heartbeat: Heartbeat | None = None
    heartbeat_at: float = 0.0
    load: LoadReport | None = None
    up: bool = False
    ever_up: bool = False
    down_reason: str | None = "never_up"
    refused: bool = False
    suspect_since: float | None = None
    sync: SyncStatus = "unsynced"
    agent_epoch: int | None = None
    last_seq: int | None = None
    endpoint: str | None = None
    pending: dict[int, PendingDispatch] = field(default_factory=dict)
    open_tickets: set[int] = field(default_factory=set)
    routed_tokens: int = 0
    block_size: int = 0
    static: bool = False
    static_url: str = ""
    static_model: str = ""

    @property
    def inflight(self) -> int:
        """Requests the router has open to this instance."""
        return len(self.open_tickets)

    @property
    def is_routable(self) -> bool:
        """Up, index in sync, block size accepted, not suspect."""
        return self.up and self.sync == "synced" and not self.refused and self.suspect_since is None

    @property
    def model(self) -> str:
        """Served model as last heartbeated ('' if unknown)."""
        return self.heartbeat.model if self.heartbeat is not None else self.static_model

    @property
    def engine_url(self) -> str:
        """Engine base URL as last heartbeated ('' if unknown), without a trailing slash."""
        return self.heartbeat.engine_url.rstrip("/") if self.heartbeat is not None else self.static_url

    @property
    def queued_prefill_tokens(self) -> int:
        """Prefill tokens queued on the instance (tokens): its last report's plus the router's pending
        dispatches' (only the latter before the first report)."""
        pend_tokens = sum(p.new_tokens for p in self.pending.values())
        return pend_tokens if self.load is None else self.load.queued_prefill_tokens + pend_tokens

    def view(self) -> InstanceView:
        """The policy's view: last report plus pending dispatches (zeros before the first report).

        Every :class:`InstanceView` field named like a :class:`LoadReport` field is copied from the last
        report (so a new per-instance input is a field of both, nothing here); ``batch_size`` and
        ``queued_prefill_tokens`` add the pending dispatches.
        """
        rep = self.load
        if rep is None:
            return InstanceView(
                name=self.name,
                batch_size=len(self.pending),
                queued_prefill_tokens=self.queued_prefill_tokens,
                inflight=self.inflight,
                block_size=self.block_size,
                routed_tokens=self.routed_tokens,
            )
        return InstanceView(
            name=self.name,
            batch_size=rep.running + rep.waiting + len(self.pending),
            queued_prefill_tokens=self.queued_prefill_tokens,
            inflight=self.inflight,
            block_size=self.block_size,
            routed_tokens=self.routed_tokens,
            **dict(zip(_REPORTED, _read_reported(rep), strict=True)),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (for ``GET /router/state``)."""
        v = self.view()
        return {
            "name": self.name,
            "up": self.up,
            "down_reason": None if self.up else self.down_reason,
            "routable": self.is_routable,
            "sync": self.sync,
            "synced": self.sync == "synced",
            "refused": self.refused,
            "suspect": self.suspect_since is not None,
            "engine_url": self.engine_url,
            "model": self.model,
            "block_size": self.block_size or None,
            "agent_endpoint": self.endpoint,
            "agent_epoch": self.agent_epoch,
            "last_seq": self.last_seq,
            "batch_size": v.batch_size,
            "queued_prefill_tokens": v.queued_prefill_tokens,
            "running": v.running,
            "waiting": v.waiting,
            "max_running_requests": v.max_running_requests,
            "kv_used_tokens": v.kv_used_tokens,
            "kv_capacity_tokens": v.kv_capacity_tokens,
            "pending": len(self.pending),
            "inflight": self.inflight,
        }


class InstanceTable:
    """All instances by name, with the dispatch accounting. Mutating methods say so; none raise.

    ``load_coverage_margin`` and ``suspect_cooldown`` in seconds.
    """

    def __init__(self, load_coverage_margin: float = 0.02, suspect_cooldown: float = 0.5) -> None:
        self._by_name: dict[str, InstanceState] = {}
        self._ordered: list[InstanceState] = []  # by name: the order policies see instances in
        self._margin = load_coverage_margin
        self._cooldown = suspect_cooldown
        self._next_ticket = 0

    def __iter__(self) -> Iterator[InstanceState]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> InstanceState | None:
        """The instance called ``name``, or None. Does not mutate."""
        return self._by_name.get(name)

    def ensure(self, name: str) -> InstanceState:
        """The instance called ``name``, created (down, unsynced) if new. Mutates."""
        st = self._by_name.get(name)
        if st is None:
            st = self._by_name[name] = InstanceState(name)
            self._ordered = sorted(self._by_name.values(), key=lambda s: s.name)
        return st

    # ----------------------------------------------------------------------------------------- reports

    def on_load(self, report: LoadReport) -> int:
        """Store ``report`` and drop the pending dispatches it covers. Mutates; returns how many dropped."""
        st = self.ensure(report.instance)
        st.load = report
        covered = [t for t, p in st.pending.items() if report.ts >= p.dispatched_at + self._margin]
        for t in covered:
            del st.pending[t]
        return len(covered)

    def on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        """Store ``hb`` received at monotonic ``now``; a healthy one received ``suspect_cooldown`` after a
        connection failure clears the suspicion. Mutates (up/down is the caller's decision)."""
        st = self.ensure(hb.instance)
        st.heartbeat = hb
        st.heartbeat_at = now
        st.block_size = hb.block_size
        if hb.engine_healthy and st.suspect_since is not None and now >= st.suspect_since + self._cooldown:
            st.suspect_since = None

    def heartbeat_expired(self, name: str, now: float, timeout: float) -> bool:
        """Whether ``name`` is up but its last heartbeat is more than ``timeout`` s older than ``now``."""
        st = self._by_name.get(name)
        return st is not None and st.up and not st.static and now - st.heartbeat_at > timeout

    # ------------------------------------------------------------------------------------ dispatching

    def add_pending(self, name: str, new_tokens: int, now_wall: float) -> int:
        """Record a dispatch of ``new_tokens`` uncached tokens to ``name`` at wall time ``now_wall``.

        Mutates; returns the ticket to pass to :meth:`finish`.
        """
        st = self.ensure(name)
        self._next_ticket += 1
        t = self._next_ticket
        st.pending[t] = PendingDispatch(t, new_tokens, now_wall)
        st.routed_tokens += new_tokens
        st.open_tickets.add(t)
        return t

    def finish(self, name: str, ticket: int) -> None:
        """The request of ``ticket`` ended (success or failure): forget it. Idempotent; mutates."""
        st = self._by_name.get(name)
        if st is not None:
            st.pending.pop(ticket, None)
            st.open_tickets.discard(ticket)

    def mark_suspect(self, name: str, now: float) -> None:
        """A connection to ``name``'s engine failed at monotonic ``now``: not routable until a later
        healthy heartbeat (see :meth:`on_heartbeat`). Mutates."""
        st = self._by_name.get(name)
        if st is not None:
            st.suspect_since = now

    def drop_pending(self, name: str) -> None:
        """Forget every pending dispatch of ``name`` (its engine restarted or went down). Mutates."""
        st = self._by_name.get(name)
        if st is not None:
            st.pending.clear()

    # ---------------------------------------------------------------------------------------- queries

    def views(self, names: set[str] | None = None) -> list[InstanceView]:
        """Views of the routable instances (restricted to ``names`` if given), in name order."""
        return [st.view() for st in self._ordered if st.is_routable and (names is None or st.name in names)]

    def routable(self) -> list[InstanceState]:
        """Routable instances, in name order."""
        return [st for st in self._ordered if st.is_routable]

    def up(self) -> list[InstanceState]:
        """Instances that are up (routable or not), in name order."""
        return [st for st in self._ordered if st.up]
