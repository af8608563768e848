"""The cluster protocol (ours): what an agent publishes to routers, the standby and the metrics daemon. Pure.

Multipart ``(topic, seq as 8-byte big-endian, payload)`` on the agent's PUB socket, one sequence number
across all topics of that agent (so a subscriber detects a lost frame whatever its topic). Payloads are
msgpack maps tagged by ``"type"`` (coded by :mod:`kvindex.protocol.messages`): :class:`EventBatch`,
:class:`LoadReport`, :class:`Heartbeat`. The agent's ROUTER socket answers a DEALER's
``[b"", SnapshotRequest]`` with ``[b"", Snapshot]``. ``agent_epoch`` changes whenever the agent process
restarts (its sequence then restarts at 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from kvindex.protocol.sglang import KVEvent, LoadStat

# ------------------------------------------------------------------------------------ cluster protocol

TOPIC_EVENTS: Final = b"events"
TOPIC_LOAD: Final = b"load"
TOPIC_HEARTBEAT: Final = b"hb"
CLUSTER_TOPICS: Final = (TOPIC_EVENTS, TOPIC_LOAD, TOPIC_HEARTBEAT)


@dataclass(frozen=True, slots=True)
class EventBatch:
    """KV events of one instance, normalised by its agent (topic ``events``).

    ``engine_seq`` is the engine-stream sequence number the batch came from (-1 if synthesised by the
    agent, e.g. an ``AllBlocksCleared`` after an engine restart). ``ts`` is Unix seconds at the engine.
    """

    instance: str
    agent_epoch: int
    engine_seq: int
    ts: float
    events: tuple[KVEvent, ...]


@dataclass(frozen=True, slots=True)
class LoadReport:
    """An instance's load (topic ``load``), from the engine's LoadStat; ``ts`` is when the agent received it.

    ``running``/``waiting`` in requests; ``queued_prefill_tokens`` is uncached prompt tokens not yet
    prefilled; ``kv_used_tokens``/``kv_capacity_tokens`` in tokens. ``total_prefill_uncached_tokens`` and
    ``total_prefill_busy_us`` are the engine's cumulative prefilled tokens and prefill step time
    (microseconds) since it started (SGLang 0.5.23's LoadStat, ``load_publisher.py``; 0 from older
    engines and agents: optional on the wire): their ratio is its prefill speed.
    """

    instance: str
    agent_epoch: int
    ts: float
    running: int
    waiting: int
    queued_prefill_tokens: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    max_running_requests: int
    total_prefill_uncached_tokens: int = 0
    total_prefill_busy_us: int = 0

    @property
    def batch_size(self) -> int:
        """Running plus waiting requests (LMetric's ``bs``)."""
        return self.running + self.waiting

    @property
    def prefill_seconds_per_token(self) -> float | None:
        """The engine's prefill time per token (seconds; cumulative busy time over cumulative tokens), or
        ``None`` before it prefilled anything or when its engine does not report it."""
        if self.total_prefill_uncached_tokens <= 0 or self.total_prefill_busy_us <= 0:
            return None
        return self.total_prefill_busy_us / 1e6 / self.total_prefill_uncached_tokens

    @classmethod
    def of_stat(cls, stat: LoadStat, instance: str, agent_epoch: int, ts: float) -> LoadReport:
        """The report of engine LoadStat ``stat`` (the one mapping, used by the agent and the simulator):
        ``running``/``waiting`` = its running/waiting requests, ``queued_prefill_tokens`` = its waiting
        requests' uncached tokens, ``kv_used_tokens``/``kv_capacity_tokens`` = its used/total KV tokens."""
        return cls(
            instance=instance,
            agent_epoch=agent_epoch,
            ts=ts,
            running=stat.num_running_reqs,
            waiting=stat.num_waiting_reqs,
            queued_prefill_tokens=stat.num_waiting_uncached_tokens,
            kv_used_tokens=stat.num_tokens,
            kv_capacity_tokens=stat.max_total_num_tokens,
            max_running_requests=stat.max_running_requests,
            total_prefill_uncached_tokens=stat.total_prefill_uncached_tokens,
            total_prefill_busy_us=stat.total_prefill_busy_us,
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness of an agent and its engine (topic ``hb``), sent every ``interval`` seconds.

    ``engine_healthy`` is the agent's latest health check of its engine; ``cached_blocks`` the size of the
    agent's mirror; ``block_size`` in tokens; ``snapshot_endpoint`` the agent's ROUTER socket.
    """

    instance: str
    agent_epoch: int
    ts: float
    engine_url: str
    engine_healthy: bool
    block_size: int
    cached_blocks: int
    model: str
    snapshot_endpoint: str
    interval: float = 0.2


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Sent by a subscriber (DEALER) to an agent's ROUTER socket to get the agent's whole mirror."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An agent's whole mirror as ``BlockStored`` events in prefix order (parents first).

    ``seq`` is the last sequence number the agent published before taking it: a subscriber applies the
    snapshot atomically (replacing the instance's blocks) and then only frames with a greater seq.
    """

    instance: str
    agent_epoch: int
    seq: int
    block_size: int
    events: tuple[KVEvent, ...] = field(default_factory=tuple)


ClusterMessage: TypeAlias = EventBatch | LoadReport | Heartbeat | SnapshotRequest | Snapshot
MessageType = Literal["EventBatch", "LoadReport", "Heartbeat", "SnapshotRequest", "Snapshot"]
