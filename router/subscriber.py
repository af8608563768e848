"""A reusable ZeroMQ subscriber to the agents' cluster streams, and the snapshot fetch. Thin I/O shell.

Used by the router, the hot standby and the metrics daemon. One SUB socket per agent endpoint (so every
frame is attributed to its agent even when it does not decode), subscribed to all topics, each read by its
own task. Each frame is split (:func:`kvindex.wire.split_frame`), decoded
(:func:`kvindex.wire.decode_message`) and checked against its topic; then the agent's sequence is
tracked, and the typed message is handed to ``on_message`` as a :class:`Received` that says whether it
continues the agent's stream or not:

* ``first``: the first frame seen from that endpoint (a late joiner never knows what it missed);
* ``gap``: ``seq`` jumped ahead: ``lost`` frames (of any topic, the seq is shared) never arrived;
* ``epoch``: ``agent_epoch`` changed: the agent restarted (its seq restarted at 0);
* ``seq_back``: same epoch, but ``seq`` did not increase (an agent restarted without a new epoch, or
  a duplicate).

A frame that does not decode is counted by :attr:`WireError.reason` (plus ``topic_mismatch`` and
``unexpected_type``), logged at most once per ``log_interval`` per reason, and skipped; it does not move
the tracked seq, so the next good frame reports a ``gap`` and a consumer that needs every event resyncs.
Nothing a peer sends can stop a reader task; an exception in ``on_message`` is logged and counted
(``callback_error``) and the task goes on.

:func:`fetch_snapshot` asks an agent's ROUTER socket for its whole mirror over a short-lived DEALER;
:func:`parse_snapshot_reply` is its pure reply decoder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import zmq
import zmq.asyncio

from kvindex.wire import (
    TOPIC_EVENTS,
    TOPIC_HEARTBEAT,
    TOPIC_LOAD,
    EventBatch,
    Heartbeat,
    LoadReport,
    Snapshot,
    SnapshotRequest,
    WireError,
    WireMessage,
    decode_message,
    encode_message,
    split_frame,
)

log = logging.getLogger(__name__)

StreamMessage: TypeAlias = EventBatch | LoadReport | Heartbeat
Discontinuity = Literal["first", "gap", "epoch", "seq_back"]

_TOPIC_OF: dict[type, bytes] = {EventBatch: TOPIC_EVENTS, LoadReport: TOPIC_LOAD, Heartbeat: TOPIC_HEARTBEAT}


@dataclass(frozen=True, slots=True)
class Received:
    """One decoded stream frame of agent ``endpoint``.

    ``discontinuity`` is None when ``seq`` follows the previous frame of the same agent and epoch
    (see the module doc otherwise); ``lost`` is the number of frames missing before it (``gap`` only).
    """

    endpoint: str
    topic: bytes
    seq: int
    msg: StreamMessage
    discontinuity: Discontinuity | None = None
    lost: int = 0


class SeqTracker:
    """The last ``(epoch, seq)`` seen per endpoint of a numbered stream, and what each new frame means.

    Pure and shared by every subscriber of a numbered stream (agents' streams, routers' decision streams).
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def track(self, endpoint: str, epoch: int, seq: int) -> tuple[Discontinuity | None, int]:
        """Record ``(epoch, seq)`` for ``endpoint``; return the discontinuity (None if in order) and the
        number of frames lost (only for ``gap``). Mutates."""
        prev = self._last.get(endpoint)
        self._last[endpoint] = (epoch, seq)
        if prev is None:
            return "first", 0
        if epoch != prev[0]:
            return "epoch", 0
        if seq == prev[1] + 1:
            return None, 0
        if seq > prev[1] + 1:
            return "gap", seq - prev[1] - 1
        return "seq_back", 0


def decode_numbered_frame(
    frames: Sequence[bytes], topic_of: Mapping[type, bytes]
) -> tuple[bytes, int, WireMessage]:
    """``(topic, seq, message)`` of a ``[topic, seq, payload]`` frame whose message type is a key of
    ``topic_of`` and arrived on that type's topic. Pure.

    Raises:
        WireError: what :func:`split_frame`/:func:`decode_message` raise, ``unexpected_type`` or
        ``topic_mismatch``.
    """
    topic, seq, payload = split_frame(frames)
    msg = decode_message(payload)
    want = topic_of.get(type(msg))
    if want is None:
        raise WireError("unexpected_type", type(msg).__name__)
    if topic != want:
        raise WireError("topic_mismatch", f"{type(msg).__name__} on topic {topic[:20]!r}")
    return topic, seq, msg


@dataclass
class SubscriberStats:
    """Monotonic counters: ``frames`` by message type, ``malformed`` by reason, ``discontinuities`` by
    kind, ``lost_frames`` in total."""

    frames: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    discontinuities: Counter[str] = field(default_factory=Counter)
    lost_frames: int = 0


class RateLimitedLog:
    """Log a warning per key at most once per ``interval`` seconds, reporting how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        suffix = f" ({n} similar suppressed)" if n else ""
        self._log.warning(msg + suffix, *args)


class Subscriber:
    """SUB sockets to agent PUB endpoints, handing decoded frames to ``on_message``.

    Lifecycle: construct, :meth:`start` (inside a running event loop), :meth:`close`. ``on_message`` is
    called from the reader tasks, one frame at a time, in each agent's arrival order. Endpoints are
    ``tcp://host:port`` (anything ZeroMQ connects to); a malformed endpoint raises ``zmq.ZMQError`` from
    :meth:`start`/:meth:`add_endpoint`.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        on_message: Callable[[Received], None],
        *,
        ctx: zmq.asyncio.Context | None = None,
        log_interval: float = 5.0,
        rcvhwm: int = 100_000,
    ) -> None:
        self._endpoints = list(dict.fromkeys(endpoints))
        self._on_message = on_message
        self._own_ctx = ctx is None
        self.ctx: zmq.asyncio.Context = ctx if ctx is not None else zmq.asyncio.Context()
        self._rcvhwm = rcvhwm
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rl = RateLimitedLog(log, log_interval)
        self._stream = NumberedStream(_TOPIC_OF, _agent_epoch, self._rl)
        self.stats = self._stream.stats
        self._closed = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The agent endpoints subscribed to."""
        return tuple(self._endpoints)

    def start(self) -> None:
        """Connect to every endpoint and start reading. Needs a running loop; raises ``zmq.ZMQError``."""
        for ep in self._endpoints:
            self._open(ep)

    def add_endpoint(self, endpoint: str) -> None:
        """Subscribe to one more agent (no-op if already subscribed). Raises ``zmq.ZMQError``."""
        if endpoint in self._sockets:
            return
        if endpoint not in self._endpoints:
            self._endpoints.append(endpoint)
        self._open(endpoint)

    def _open(self, endpoint: str) -> None:
        if endpoint in self._sockets:
            return
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(0)
            raise
        self._sockets[endpoint] = sock
        self._tasks[endpoint] = asyncio.get_running_loop().create_task(
            self._read(endpoint, sock), name=f"sub:{endpoint}"
        )

    async def close(self) -> None:
        """Stop the readers and close the sockets (and the context if this object created it)."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for s in self._sockets.values():
            s.close(0)
        self._tasks.clear()
        self._sockets.clear()
        if self._own_ctx:
            self.ctx.destroy(linger=0)

    async def _read(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=True)
            try:
                rec = self.handle_frames(endpoint, frames)
                if rec is not None:
                    self._on_message(rec)
            except Exception:  # a bug must not silence an agent: count, log, read on
                self.stats.malformed["callback_error"] += 1
                log.exception("handling a frame from %s failed", endpoint)

    def handle_frames(self, endpoint: str, frames: Sequence[bytes]) -> Received | None:
        """Decode and track one multipart frame of ``endpoint``; None (counted, logged) if malformed.

        Exposed so that tests and replay tools can drive the subscriber without sockets. Mutates the
        tracked seq/epoch and the counters; never raises on frame content.
        """
        got = self._stream.receive(endpoint, frames)
        if got is None:
            return None
        topic, seq, msg, disc, lost = got
        assert isinstance(msg, EventBatch | LoadReport | Heartbeat)
        return Received(endpoint, topic, seq, msg, disc, lost)


def _agent_epoch(msg: WireMessage) -> int:
    assert isinstance(msg, EventBatch | LoadReport | Heartbeat)  # only these pass _TOPIC_OF
    return msg.agent_epoch


class NumberedStream:
    """One kind of numbered stream as a subscriber sees it: decode, check the topic, track seq/epoch per
    endpoint and count. Shared by the agents' subscriber and the routers' decision-stream subscriber.

    ``topic_of`` maps each accepted message type to its topic; ``epoch_of`` reads a message's epoch.
    """

    def __init__(
        self,
        topic_of: Mapping[type, bytes],
        epoch_of: Callable[[WireMessage], int],
        rl: RateLimitedLog,
        what: str = "frame",
    ) -> None:
        self.stats = SubscriberStats()
        self._topic_of = topic_of
        self._epoch_of = epoch_of
        self._seqs = SeqTracker()
        self._rl = rl
        self._what = what

    def receive(
        self, endpoint: str, frames: Sequence[bytes]
    ) -> tuple[bytes, int, WireMessage, Discontinuity | None, int] | None:
        """``(topic, seq, message, discontinuity, lost)``, or None (counted, logged) if malformed.

        Mutates the tracked seq/epoch and the counters; never raises on frame content.
        """
        try:
            topic, seq, msg = decode_numbered_frame(frames, self._topic_of)
        except WireError as exc:
            self.stats.malformed[exc.reason] += 1
            self._rl.warning(exc.reason, "skipping malformed %s from %s: %s", self._what, endpoint, exc)
            return None
        disc, lost = self._seqs.track(endpoint, self._epoch_of(msg), seq)
        self.stats.frames[type(msg).__name__] += 1
        if disc is not None:
            self.stats.discontinuities[disc] += 1
            self.stats.lost_frames += lost
        return topic, seq, msg, disc, lost


class SnapshotError(Exception):
    """A snapshot could not be fetched. ``reason``: ``timeout``, ``bad_reply`` or ``connect``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


async def fetch_snapshot(ctx: zmq.asyncio.Context, endpoint: str, timeout: float) -> Snapshot:
    """Ask the agent ROUTER socket at ``endpoint`` for its whole mirror; wait at most ``timeout`` s.

    Sends ``[b"", SnapshotRequest]`` on a fresh DEALER and expects ``[b"", Snapshot]``.

    Raises:
        SnapshotError: no reply in time (``timeout``), a reply that is not a Snapshot (``bad_reply``),
        or an endpoint ZeroMQ cannot connect to (``connect``).
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise SnapshotError("connect", f"{endpoint}: {exc}") from exc
        try:
            await asyncio.wait_for(sock.send_multipart([b"", encode_message(SnapshotRequest())]), timeout)
            frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
        except asyncio.TimeoutError:
            raise SnapshotError("timeout", f"no snapshot from {endpoint} in {timeout:g} s") from None
    finally:
        sock.close(0)
    return parse_snapshot_reply(frames)


def parse_snapshot_reply(frames: Sequence[bytes]) -> Snapshot:
    """The :class:`Snapshot` in a DEALER's ``[b"", Snapshot]`` reply. Pure.

    Raises:
        SnapshotError: ``bad_reply`` for anything else (frame count, delimiter, payload); nothing else,
        whatever the bytes.
    """
    if len(frames) != 2 or frames[0] != b"":
        raise SnapshotError("bad_reply", f"{len(frames)} frames")
    try:
        msg = decode_message(frames[1])
    except WireError as exc:
        raise SnapshotError("bad_reply", str(exc)) from exc
    if not isinstance(msg, Snapshot):
        raise SnapshotError("bad_reply", f"a {type(msg).__name__}, not a Snapshot")
    return msg
