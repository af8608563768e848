"""Following one engine's KV event stream by sequence number, keeping the agent's mirror exact.

SGLang's live stream (sglang 0.5.23, ``srt/disaggregation/kv_events.py``) numbers every batch from 0 and
restarts at 0 with an empty cache when the engine restarts; PUB/SUB drops frames silently (slow joiner,
high-water mark), and a replay ROUTER re-sends the last ``buffer_steps`` batches on request. With
``expected`` = last applied engine seq + 1:

* first frame (or first after a restart): accept it; if its seq > 0, replay from 0 to fill the mirror
  with what the engine did before we listened. The buffer may not reach back that far (counted in
  ``late_join_incomplete``): the mirror then holds a subset of the engine's cache, never extra blocks;
* ``seq == expected``: apply;
* ``seq > expected``: a gap; fetch ``[expected, seq)`` from the replay socket and apply it in order. If
  the replay is unavailable or incomplete the mirror can no longer be trusted (a lost ``BlockRemoved``
  would leave stale blocks): it is cleared and an ``AllBlocksCleared`` emitted with ``engine_seq=-1``
  (``resync_incomplete``). SGLang has no way to dump its whole cache, so the mirror re-grows from later
  events only;
* ``seq < expected``: a duplicate or late frame (skipped), or a restarted engine. :meth:`KvFollower.verify`
  tells which, exactly, through the replay socket (below). Without an answer from it, rules of thumb: seq
  0, a seq more than ``DUPLICATE_WINDOW`` below, or any seq other than ``expected`` after the engine was
  seen unhealthy means a restart: clear, emit ``AllBlocksCleared``, then join as above; anything else is
  a duplicate.

Two ways in that do not wait for a live frame (an idle engine publishes none, however long):

* :meth:`KvFollower.bootstrap` joins *before* any live frame by replaying the engine's whole buffer from
  seq 0. The agent calls it when a router asks for a snapshot before the follower has joined (an agent
  started or restarted next to an engine that already holds a cache), so the snapshot is the engine's
  cache and not an empty mirror;
* :meth:`KvFollower.verify` checks that the engine is still the process whose stream was followed: the
  replay buffer of a live engine always holds its last batch, so the batch at ``expected - 1`` is fetched
  and compared (``ts`` and events) with the last one applied. Same: any later buffered batches are applied
  (a gap no live frame revealed yet). Different or missing: the engine restarted; clear, emit
  ``AllBlocksCleared`` and bootstrap from the new engine's buffer. The follower calls it for every frame
  below ``expected``; the agent when a restart is suspected: the engine's health check recovers, or its
  load stream's seq goes back.

A replay that runs ahead of live frames already queued leaves their ``(seq, ts)`` behind, so those frames
are recognised (and skipped) as already applied rather than taken for a restart.

Every applied batch (live or replayed) is emitted once, in engine-seq order, through the ``emit``
callback. The follower is owned by one task; it awaits only the replay socket and ``emit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from agents.agent.counters import AgentCounters
from agents.agent.engine_link import ReplayClient, ReplayError
from kvindex import protocol as wire
from kvindex.logutil import RateLimitedLog
from kvindex.mirror import BlockMirror

log = logging.getLogger(__name__)

DUPLICATE_WINDOW = 16
"""Without an answer from the replay socket, a seq at most this far below ``expected`` is taken for a
duplicate; further below, for an engine restart."""

Emit = Callable[[int, float, tuple[wire.KVEvent, ...]], Awaitable[None]]
"""``emit(engine_seq, ts, events)``: publish one batch downstream (``engine_seq=-1`` if synthesised)."""

_REPLAY_ALL = 2**63
"""An upper bound above every seq: replay the whole buffer."""


class KvFollower:
    """Applies live KV batches to ``mirror`` by the rules above, repairing gaps through ``replay``.

    ``engine_went_down`` is set by the owner when a health check fails; the follower clears it once the
    stream continues in sequence.
    """

    def __init__(
        self,
        mirror: BlockMirror,
        counters: AgentCounters,
        replay: ReplayClient | None,
        emit: Emit,
        name: str = "agent",
    ) -> None:
        self.mirror = mirror
        self.counters = counters
        self.replay = replay
        self.engine_went_down = False
        self._emit = emit
        self._name = name
        self._expected: int | None = None  # next engine seq; None = join on the next frame
        # (seq -> ts) of batches a bootstrap replayed ahead of the live stream: a live frame that matches
        # one is a duplicate even far below ``expected``. Emptied once the live stream catches up.
        self._ahead: dict[int, float] = {}
        self._last: wire.KVEventBatch | None = None  # the batch applied last (seq ``expected - 1``)
        self._badlog = RateLimitedLog(log)

    @property
    def expected(self) -> int | None:
        """The next engine seq in order, or ``None`` before the first frame."""
        return self._expected

    async def on_batch(self, seq: int, batch: wire.KVEventBatch) -> None:
        """Handle one decoded live batch (``seq >= 0``). Mutates the mirror; never raises on content."""
        exp = self._expected
        if exp is None:
            await self._join(seq, batch)
        elif seq == exp:
            self.engine_went_down = False
            self._ahead.clear()
            await self._apply(seq, batch)
        elif seq > exp and not self.engine_went_down:
            self.counters.gaps += 1
            self._ahead.clear()
            await self._repair(exp, seq)
            await self._apply(seq, batch)
        elif self._ahead.get(seq) == batch.ts and not self.engine_went_down:
            pass  # applied already, from a replay that ran ahead of the live frames (not a duplicate)
        else:
            await self._behind(seq, batch, exp)

    async def _behind(self, seq: int, batch: wire.KVEventBatch, exp: int) -> None:
        """A frame below ``expected``: a duplicate or a late frame of the same engine, or a restarted one.

        Decided exactly by :meth:`verify` where the replay socket answers; else by the rules of thumb
        (seq 0, more than ``DUPLICATE_WINDOW`` below, or the engine was seen down: a restart).
        """
        same = await self.verify()
        if same is None:
            if seq == 0 or exp - seq > DUPLICATE_WINDOW or self.engine_went_down:
                self.counters.engine_restarts += 1
                self.engine_went_down = False
                log.warning("%s: engine restarted (seq %d, expected %d): mirror reset", self._name, seq, exp)
                await self._clear()
                await self._join(seq, batch)
            else:
                self.counters.duplicates += 1
        elif same:
            self.counters.duplicates += 1
        elif self._expected is None:  # restarted, and the new engine's buffer could not be replayed
            await self._join(seq, batch)
        # else: re-joined from the new engine's buffer, which holds this frame (it buffers, then publishes)

    async def bootstrap(self) -> bool:
        """Join without a live frame: replay the engine's whole buffer and apply it from seq 0.

        A no-op returning True if already joined. Returns False (still unjoined: the next live frame joins
        as usual) if there is no replay socket, the replay fails or the buffer is empty. If the buffer no
        longer reaches back to seq 0 the mirror gets what it holds (``late_join_incomplete``). Mutates the
        mirror and emits the replayed batches; never raises on content.
        """
        if self._expected is not None:
            return True
        items = await self._replay_range(0, _REPLAY_ALL, count_failure=False)
        if not items:
            return False
        run = _contiguous_tail(items, items[-1][0] + 1)
        if run[0][0] != 0:
            self.counters.late_join_incomplete += 1
            log.info("%s: bootstrapped from engine seq %d (the replay buffer no longer holds 0)",
                     self._name, run[0][0])  # fmt: skip
        for s, b in run:
            await self._apply(s, b, replayed=True)
        self._ahead = {s: b.ts for s, b in run}
        return True

    async def verify(self) -> bool | None:
        """Check through the replay socket that the engine is still the process being followed.

        Joined: fetches the buffer from ``expected - 1``. If it starts with the batch applied last, the
        engine is the same: the buffered batches right after it are applied (a gap not yet revealed by a
        live frame), ``engine_went_down`` is cleared, and True returned. Otherwise the engine restarted
        (or, looking the same from here, lost more batches than its buffer holds): either way the mirror
        cannot be trusted; it is cleared (``AllBlocksCleared`` emitted, ``engine_restarts`` counted), the
        follower re-joins by :meth:`bootstrap`, and False is returned. Unjoined: :meth:`bootstrap`.
        ``None`` when the replay fails: inconclusive, nothing changes (the next live frame decides).
        Never raises on content.
        """
        exp, last = self._expected, self._last
        if exp is None or last is None:
            return await self.bootstrap() or None
        items = await self._replay_range(exp - 1, _REPLAY_ALL, count_failure=False)
        if items is None:
            return None
        if items and items[0] == (exp - 1, last):
            self.engine_went_down = False
            k = 1
            while k < len(items) and items[k][0] == exp - 1 + k:
                k += 1
            for s, b in items[1:k]:
                await self._apply(s, b, replayed=True)
            self._ahead.update((s, b.ts) for s, b in items[1:k])
            return True
        self.counters.engine_restarts += 1
        self.engine_went_down = False
        log.warning("%s: engine restarted (seq %d is not the batch applied last): mirror reset",
                    self._name, exp - 1)  # fmt: skip
        await self._clear()
        self._expected = None
        await self.bootstrap()
        return False

    async def _join(self, seq: int, batch: wire.KVEventBatch) -> None:
        """Start following at ``seq``: replay what the engine did before it (from 0), then apply ``batch``."""
        if seq > 0:
            items = await self._replay_range(0, seq)
            run = _contiguous_tail(items or [], seq)
            if not run or run[0][0] != 0:
                self.counters.late_join_incomplete += 1
                log.info("%s: joined at engine seq %d, history replayed from %s", self._name, seq,
                         run[0][0] if run else "nowhere")  # fmt: skip
            for s, b in run:
                await self._apply(s, b, replayed=True)
        await self._apply(seq, batch)

    async def _repair(self, start: int, stop: int) -> None:
        """Fill the gap ``[start, stop)`` from the replay socket, or clear the mirror if that fails."""
        items = await self._replay_range(start, stop)
        # ``items`` is sorted and unique within [start, stop): complete iff it is that long. (Never build
        # the range: ``stop`` comes from the network and may be ~2**63.)
        if items is not None and len(items) == stop - start:
            for s, b in items:
                await self._apply(s, b, replayed=True)
            return
        self.counters.resync_incomplete += 1
        log.warning("%s: engine seqs %d..%d lost, not replayable: mirror reset", self._name, start, stop - 1)
        await self._clear()

    async def _replay_range(
        self, start: int, stop: int, count_failure: bool = True
    ) -> list[tuple[int, wire.KVEventBatch]] | None:
        """Decoded replayed batches with ``start <= seq < stop``, sorted, unique; ``None`` on failure.

        ``count_failure=False`` (a bootstrap, which a live frame will retry) leaves ``replay_failures``.
        """
        if self.replay is None:
            return None
        try:
            items = await self.replay.fetch(start)
        except ReplayError as exc:
            if count_failure:
                self.counters.replay_failures += 1
            self._badlog.warning("replay", "%s: replay from %d failed: %s", self._name, start, exc)
            return None
        self.counters.frames_in["replay"] += len(items)
        out: dict[int, wire.KVEventBatch] = {}
        for it in items:
            if start <= it.seq < stop and it.seq not in out:
                try:
                    out[it.seq] = wire.decode_kv_batch(it.payload)
                except wire.WireError as exc:  # leaves a hole: the caller sees an incomplete range
                    self.counters.malformed[("replay", exc.reason)] += 1
                    self._badlog.warning(
                        f"replay:{exc.reason}", "%s: bad replayed batch: %s", self._name, exc
                    )
        return sorted(out.items())

    async def _apply(self, seq: int, batch: wire.KVEventBatch, replayed: bool = False) -> None:
        self.mirror.apply_batch(batch.events)
        for ev in batch.events:
            self.counters.events[type(ev).__name__] += 1
        if replayed:
            self.counters.replayed_batches += 1
        self._expected = seq + 1
        self._last = batch
        await self._emit(seq, batch.ts, batch.events)

    async def _clear(self) -> None:
        self.mirror.clear()
        self._ahead.clear()
        self._last = None
        await self._emit(-1, time.time(), (wire.AllBlocksCleared(),))


def _contiguous_tail(
    items: list[tuple[int, wire.KVEventBatch]], stop: int
) -> list[tuple[int, wire.KVEventBatch]]:
    """The longest run of sorted ``items`` whose seqs are consecutive and end at ``stop - 1``."""
    want = stop - 1
    i = len(items)
    while i > 0 and items[i - 1][0] == want:
        i -= 1
        want -= 1
    return items[i:]
