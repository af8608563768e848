"""The agents' numbered streams as a subscriber sees them: decode, check the topic, track seq and epoch.

Pure (no sockets): shared by every subscriber of a numbered stream (the router, its standby and the
metrics daemon follow the agents' streams; the standby and the metrics daemon follow routers' decision
streams). Each frame ``[topic, seq, payload]`` is split (:func:`kvindex.protocol.split_frame`), decoded
(:func:`kvindex.protocol.decode_message`) and checked against its topic; then the publisher's sequence is
tracked and the frame is classified:

* ``first``: the first frame seen from that endpoint (a late joiner never knows what it missed);
* ``gap``: ``seq`` jumped ahead: ``lost`` frames (of any topic, the seq is shared) never arrived;
* ``epoch``: the publisher's epoch changed: it restarted (its seq restarted at 0);
* ``seq_back``: same epoch, but ``seq`` did not increase (a restart without a new epoch, or a duplicate).

A frame that does not decode is counted by :attr:`WireError.reason` (plus ``topic_mismatch`` and
``unexpected_type``), logged at most once per interval per reason, and skipped; it does not move the
tracked seq, so the next good frame reports a ``gap`` and a consumer that needs every event resyncs.
:func:`parse_snapshot_reply` decodes an agent's snapshot reply.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from kvindex.logutil import RateLimitedLog
from kvindex.protocol import (
    TOPIC_DECISIONS,
    TOPIC_EVENTS,
    TOPIC_HEARTBEAT,
    TOPIC_LOAD,
    TOPIC_ROUTER_HEARTBEAT,
    DecisionMessage,
    EventBatch,
    Heartbeat,
    LoadReport,
    RequestFinished,
    RequestRouted,
    RouterHeartbeat,
    Snapshot,
    WireError,
    WireMessage,
    decode_message,
    split_frame,
)

__all__ = [
    "AGENT_TOPIC_OF",
    "DECISION_TOPIC_OF",
    "DecisionMessage",
    "DecisionReceived",
    "Discontinuity",
    "NumberedStream",
    "Received",
    "SeqTracker",
    "SnapshotError",
    "StreamMessage",
    "SubscriberStats",
    "agent_epoch",
    "decode_numbered_frame",
    "parse_snapshot_reply",
    "router_epoch",
]

StreamMessage: TypeAlias = EventBatch | LoadReport | Heartbeat
Discontinuity = Literal["first", "gap", "epoch", "seq_back"]

AGENT_TOPIC_OF: dict[type, bytes] = {
    EventBatch: TOPIC_EVENTS,
    LoadReport: TOPIC_LOAD,
    Heartbeat: TOPIC_HEARTBEAT,
}
"""The message types of an agent's stream and the topic each must arrive on."""

DECISION_TOPIC_OF: dict[type, bytes] = {
    RequestRouted: TOPIC_DECISIONS,
    RequestFinished: TOPIC_DECISIONS,
    RouterHeartbeat: TOPIC_ROUTER_HEARTBEAT,
}
"""The message types of a router's decision stream and the topic each must arrive on."""


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


@dataclass(frozen=True, slots=True)
class DecisionReceived:
    """One decoded frame of the decision stream at ``endpoint`` (see :class:`Received`)."""

    endpoint: str
    topic: bytes
    seq: int
    msg: DecisionMessage
    discontinuity: Discontinuity | None = None
    lost: int = 0


def router_epoch(msg: WireMessage) -> int:
    assert isinstance(
        msg, RequestRouted | RequestFinished | RouterHeartbeat
    )  # only these pass DECISION_TOPIC_OF
    return msg.router_epoch


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


def agent_epoch(msg: WireMessage) -> int:
    assert isinstance(msg, EventBatch | LoadReport | Heartbeat)  # only these pass AGENT_TOPIC_OF
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
