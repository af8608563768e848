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
* ``seq < expected``: seq 0, a seq more than ``DUPLICATE_WINDOW`` below, or any seq other than
  ``expected`` after the engine was seen unhealthy means a restart: clear, emit ``AllBlocksCleared``,
  then join as above. Anything else is a duplicate, skipped.

Every applied batch (live or replayed) is emitted once, in engine-seq order, through the ``emit``
callback. The follower is owned by one task; it awaits only the replay socket and ``emit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from agents.counters import AgentCounters, RateLimitedLog
from agents.engine_link import ReplayClient, ReplayError
from kvindex import wire
from kvindex.mirror import BlockMirror

log = logging.getLogger(__name__)

DUPLICATE_WINDOW = 16
"""A seq at most this far below ``expected`` is a duplicate; further below, an engine restart."""

Emit = Callable[[int, float, tuple[wire.KVEvent, ...]], Awaitable[None]]
"""``emit(engine_seq, ts, events)``: publish one batch downstream (``engine_seq=-1`` if synthesised)."""


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
            await self._apply(seq, batch)
        elif seq > exp and not self.engine_went_down:
            self.counters.gaps += 1
            await self._repair(exp, seq)
            await self._apply(seq, batch)
        elif seq == 0 or exp - seq > DUPLICATE_WINDOW or self.engine_went_down:
            self.counters.engine_restarts += 1
            self.engine_went_down = False
            log.warning("%s: engine restarted (seq %d, expected %d): mirror reset", self._name, seq, exp)
            await self._clear()
            await self._join(seq, batch)
        else:
            self.counters.duplicates += 1

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
        if items is not None and [s for s, _ in items] == list(range(start, stop)):
            for s, b in items:
                await self._apply(s, b, replayed=True)
            return
        self.counters.resync_incomplete += 1
        log.warning("%s: engine seqs %d..%d lost, not replayable: mirror reset", self._name, start, stop - 1)
        await self._clear()

    async def _replay_range(self, start: int, stop: int) -> list[tuple[int, wire.KVEventBatch]] | None:
        """Decoded replayed batches with ``start <= seq < stop``, sorted, unique; ``None`` on failure."""
        if self.replay is None:
            return None
        try:
            items = await self.replay.fetch(start)
        except ReplayError as exc:
            self.counters.replay_failures += 1
            if exc.reason not in ("timeout", "too_long"):
                self.counters.malformed[("replay", exc.reason)] += 1
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
        await self._emit(seq, batch.ts, batch.events)

    async def _clear(self) -> None:
        self.mirror.clear()
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
