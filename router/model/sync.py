"""What the routing model learns from the agents' streams: instances up and down, the index kept exact.

Pure (no I/O, no asyncio, no zmq). :class:`StreamSync` is the base of
:class:`router.model.model.RoutingModel`; this module holds the half that follows the agents.

Theory of operation
-------------------
Every method is called from the event loop only (frames from the subscriber, routing from request
handlers, a periodic :meth:`RoutingModel.tick`), so nothing here needs a lock. The only I/O the core needs,
fetching a snapshot, is delegated: it calls ``request_snapshot(job)`` and the shell answers later with
:meth:`on_snapshot` or :meth:`on_snapshot_failed`, quoting ``job.generation`` so a stale answer (from
before a newer resync started) is ignored.

An instance is **routable** when it is up (healthy heartbeat within the timeout, block size accepted),
its index entry is **synced** and no connection to its engine failed recently. Its index entry is synced
through this cycle::

    unsynced --(comes up)--> resyncing --(snapshot + buffered frames apply cleanly)--> synced
    synced --(seq gap | agent epoch change | seq going back | new endpoint)--> resyncing
    any --(heartbeat timeout | engine unhealthy | block size refused)--> down: blocks dropped, unsynced

While resyncing, every frame of the instance is buffered as (seq, epoch, EventBatch or None). A snapshot
with sequence ``S`` replaces the instance's blocks atomically; then the buffered batches with seq > S are
applied, *if* the frames S+1 .. last-seen-seq are all in the buffer (no frame of any topic was lost after
the snapshot). Otherwise, or if the agent restarted meanwhile, a new snapshot is requested. Snapshots
are requested only after the resync starts, so ``S`` is at least the seq of the frame that started it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from kvindex.index import GlobalIndex
from kvindex.logutil import RateLimitedLog
from kvindex.protocol import EventBatch, Heartbeat, KVEvent, LoadReport, Snapshot
from kvindex.protocol.numbered import Received
from router.model.config import ModelConfig
from router.model.table import InstanceState, InstanceTable

log = logging.getLogger(__name__)

SNAPSHOT_RETRY_DELAY: Final = 0.5
"""Seconds before a failed snapshot fetch is retried."""
MAX_RESYNC_BUFFER: Final = 200_000
"""Frames buffered per resyncing instance before the resync restarts from a fresh snapshot."""


@dataclass(frozen=True, slots=True)
class SnapshotJob:
    """A snapshot the core wants fetched from ``endpoint`` (an agent's ROUTER socket)."""

    instance: str
    endpoint: str
    generation: int


@dataclass
class ModelStats:
    """Monotonic counters for the metrics endpoint."""

    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(policy, instance) -> routing decisions."""
    failure_cases: Counter[str] = field(default_factory=Counter)
    """Policy failure kind (see :mod:`router.model.policies`) -> requests where it was detected."""
    resyncs: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(instance, reason) -> snapshot resyncs started."""
    snapshot_failures: Counter[str] = field(default_factory=Counter)
    """Reason -> failed or rejected snapshot fetches."""
    batches_dropped: int = 0
    """EventBatches not applied because their instance was down or unsynced (a snapshot covers them)."""
    stale_snapshots: int = 0
    """Snapshot answers for a resync that was superseded."""
    down_transitions: Counter[str] = field(default_factory=Counter)
    """Reason -> times an instance went down."""


@dataclass
class _Resync:
    generation: int
    reason: str
    buffer: list[tuple[int, int, EventBatch | None]] = field(default_factory=list)
    in_flight: bool = False
    retry_at: float | None = None


class StreamSync:
    """Index + instance table, following the agents' streams. See the module docstring.

    Args:
        cfg: the model's settings (block size, timeouts, TTLs).
        request_snapshot: called with a :class:`SnapshotJob` whenever a snapshot is needed; must not
            block; the answer comes back through :meth:`on_snapshot` / :meth:`on_snapshot_failed`.
        mono, wall: clocks (monotonic seconds; Unix seconds). The simulator passes its virtual clock.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        request_snapshot: Callable[[SnapshotJob], None],
        *,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.table = InstanceTable(cfg.load_coverage_margin, cfg.suspect_cooldown)
        self.stats = ModelStats()
        self.index: GlobalIndex | None = None
        self.block_size: int | None = None
        self._request_snapshot = request_snapshot
        self._mono = mono
        self._wall = wall
        self._resyncs: dict[str, _Resync] = {}
        self._fetching: set[str] = set()  # instances with a fetch in flight: one at a time each
        self._generation = 0
        self._rl = RateLimitedLog(log)
        if cfg.block_size is not None:
            self._make_index(cfg.block_size)

    def _make_index(self, block_size: int) -> None:
        self.block_size = block_size
        self.index = GlobalIndex(block_size, self.cfg.speculative_ttl, self.cfg.max_speculative_per_instance)

    # -------------------------------------------------------------------------------- stream frames

    def on_message(self, rec: Received) -> None:
        """Apply one decoded frame from an agent (see the module docstring). Mutates; never raises."""
        msg = rec.msg
        st = self.table.ensure(msg.instance)
        moved = st.endpoint is not None and st.endpoint != rec.endpoint
        st.endpoint = rec.endpoint
        st.agent_epoch = msg.agent_epoch
        st.last_seq = rec.seq
        disc = "endpoint" if moved else rec.discontinuity
        if disc is not None and st.up:
            if st.sync == "synced":
                self._start_resync(st, disc)
            elif st.sync == "resyncing" and disc != "gap":
                # The agent restarted (or moved): frames buffered so far belong to the old stream.
                self._start_resync(st, disc)
        # After the discontinuity: a heartbeat that brings the instance up starts its own resync.
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(st, msg)
        elif isinstance(msg, LoadReport):
            self.on_load(msg)
        if st.sync == "resyncing":
            r = self._resyncs[st.name]
            r.buffer.append((rec.seq, msg.agent_epoch, msg if isinstance(msg, EventBatch) else None))
            if len(r.buffer) > MAX_RESYNC_BUFFER:
                self._start_resync(st, "buffer_overflow")
        elif isinstance(msg, EventBatch):
            self.on_events(st.name, msg.events)

    def on_events(self, instance: str, events: Sequence[KVEvent]) -> None:
        """Apply ``instance``'s KV ``events`` to the index if its entry is synced; else count them as
        dropped (the snapshot that syncs it covers them). Mutates; never raises on content."""
        st = self.table.get(instance)
        if st is not None and st.sync == "synced" and self.index is not None:
            self.index.apply_batch(instance, events)
        else:
            self.stats.batches_dropped += 1

    def on_load(self, report: LoadReport) -> None:
        """Store ``report`` as its instance's load and drop the pending dispatches it covers. Mutates."""
        self.table.on_load(report)

    def _on_heartbeat(self, st: InstanceState, hb: Heartbeat) -> None:
        self.table.on_heartbeat(hb, self._mono())
        if not self._accept_block_size(st, hb.block_size):
            self._set_down(st, "block_size_refused")
            return
        if not hb.engine_healthy:
            self._set_down(st, "engine_unhealthy")
            return
        if not st.up:
            reason = "back_up" if st.ever_up else "first"
            st.up = st.ever_up = True
            st.down_reason = None
            log.info("instance %s is up (engine %s, model %r)", st.name, hb.engine_url, hb.model)
            self._start_resync(st, reason)

    def _accept_block_size(self, st: InstanceState, block_size: int) -> bool:
        if block_size > 0 and self.block_size is None:
            self._make_index(block_size)
            log.info("cluster block size %d tokens (learned from %s)", block_size, st.name)
        ok = block_size == self.block_size
        if not ok and not st.refused:
            log.error(
                "refusing instance %s: block size %d differs from the cluster's %s",
                st.name,
                block_size,
                self.block_size,
            )
        elif ok and st.refused:
            log.info("instance %s now reports the cluster block size %d", st.name, block_size)
        st.refused = not ok
        return ok

    def _set_down(self, st: InstanceState, reason: str) -> None:
        if not st.up:
            st.down_reason = reason
            return
        st.up = False
        st.down_reason = reason
        st.sync = "unsynced"
        self._resyncs.pop(st.name, None)
        dropped = self.index.remove_instance(st.name) if self.index is not None else 0
        self.table.drop_pending(st.name)
        self.stats.down_transitions[reason] += 1
        log.warning("instance %s is DOWN (%s); %d blocks dropped from the index", st.name, reason, dropped)

    # ------------------------------------------------------------------------------------ snapshots

    def _start_resync(self, st: InstanceState, reason: str) -> None:
        self._generation += 1
        r = _Resync(self._generation, reason)
        self._resyncs[st.name] = r
        st.sync = "resyncing"
        self.stats.resyncs[(st.name, reason)] += 1
        log.info("resyncing instance %s from a snapshot (%s)", st.name, reason)
        self._issue(st, r)

    def _issue(self, st: InstanceState, r: _Resync) -> None:
        endpoint = st.heartbeat.snapshot_endpoint if st.heartbeat is not None else ""
        if not endpoint or st.name in self._fetching:
            # No endpoint yet, or a superseded fetch still in flight: ask once it answers (or later).
            r.retry_at = self._mono() + (0.0 if endpoint else SNAPSHOT_RETRY_DELAY)
            return
        r.in_flight = True
        r.retry_at = None
        self._fetching.add(st.name)
        self._request_snapshot(SnapshotJob(st.name, endpoint, r.generation))

    def _answered(self, name: str) -> tuple[InstanceState | None, _Resync | None]:
        """A fetch for ``name`` answered: issue a waiting one if the answer is for a superseded job."""
        self._fetching.discard(name)
        st, r = self.table.get(name), self._resyncs.get(name)
        if st is not None and r is not None and not r.in_flight and r.retry_at is not None:
            self._issue(st, r)
        return st, r

    def on_snapshot(self, job: SnapshotJob, snap: Snapshot) -> bool:
        """Apply a fetched snapshot for ``job``. Mutates; never raises.

        Returns True if the instance is now synced; False if the answer was stale, or unusable (then a
        new fetch is scheduled).
        """
        st, r = self._answered(job.instance)
        if st is None or r is None or r.generation != job.generation or st.sync != "resyncing":
            self.stats.stale_snapshots += 1
            return False
        r.in_flight = False
        if snap.instance != st.name or self.index is None or snap.block_size != self.block_size:
            self._snapshot_failed(st, r, "bad_snapshot", f"instance {snap.instance!r} bs {snap.block_size}")
            return False
        if snap.agent_epoch != st.agent_epoch:
            self.stats.snapshot_failures["epoch_changed"] += 1
            self._start_resync(st, "epoch_changed")
            return False
        last = st.last_seq if st.last_seq is not None else snap.seq
        later = sorted(
            (seq, ev) for seq, epoch, ev in r.buffer if epoch == snap.agent_epoch and seq > snap.seq
        )
        # Complete iff ``later`` is exactly snap.seq+1 .. last. Compared without building that range:
        # both seqs come from the network (a bogus ``snap.seq`` of -2**63 must not allocate 2**63 ints).
        if len(later) != max(0, last - snap.seq) or any(
            seq != snap.seq + 1 + k for k, (seq, _) in enumerate(later)
        ):
            self.stats.snapshot_failures["gap_after_snapshot"] += 1
            self._start_resync(st, "gap_after_snapshot")
            return False
        self.index.replace_instance(st.name, snap.events)
        for _, ev in later:
            if ev is not None:
                self.index.apply_batch(st.name, ev.events)
        del self._resyncs[st.name]
        st.sync = "synced"
        log.info(
            "instance %s synced: snapshot seq %d, %d blocks, %d later frames",
            st.name,
            snap.seq,
            self.index.blocks_of(st.name),
            len(later),
        )
        return True

    def on_snapshot_failed(self, job: SnapshotJob, reason: str) -> None:
        """A snapshot fetch for ``job`` failed (``reason`` for metrics); retried later. Mutates."""
        st, r = self._answered(job.instance)
        if st is None or r is None or r.generation != job.generation:
            return
        r.in_flight = False
        self._snapshot_failed(st, r, reason, job.endpoint)

    def _snapshot_failed(self, st: InstanceState, r: _Resync, reason: str, detail: str) -> None:
        self.stats.snapshot_failures[reason] += 1
        self._rl.warning(
            f"snap:{st.name}", "snapshot of %s failed (%s: %s); retrying", st.name, reason, detail
        )
        r.retry_at = self._mono() + SNAPSHOT_RETRY_DELAY

    # ----------------------------------------------------------------------------------------- ticks

    def tick(self) -> None:
        """Periodic upkeep: heartbeat timeouts, snapshot retries, speculative expiry. Mutates."""
        now = self._mono()
        for st in list(self.table):
            if self.table.heartbeat_expired(st.name, now, self.cfg.heartbeat_timeout):
                self._set_down(st, "heartbeat_timeout")
        for name, r in list(self._resyncs.items()):
            inst = self.table.get(name)
            if inst is not None and not r.in_flight and r.retry_at is not None and now >= r.retry_at:
                self._issue(inst, r)
        if self.index is not None:
            self.index.expire_speculative(now)
