"""Every byte and body that crosses a process boundary, split by protocol. Pure: no I/O.

* :mod:`~kvindex.protocol.frames`: numbered multipart frames and :class:`WireError`;
* :mod:`~kvindex.protocol.sglang`: SGLang's KV events, LoadStat and replay frames (sglang 0.5.23);
* :mod:`~kvindex.protocol.cluster`: the agents' streams (event batches, load reports, heartbeats, snapshots);
* :mod:`~kvindex.protocol.decisions`: a router's decision stream;
* :mod:`~kvindex.protocol.messages`: the tagged-map codec of the last two;
* :mod:`~kvindex.protocol.numbered`: a subscriber's view of a numbered stream (decode, seq tracking);
* :mod:`~kvindex.protocol.http`: HTTP request bodies (OpenAI and SGLang) and OpenAI-style error bodies;
* :mod:`~kvindex.protocol.ready`: the READY line every process prints;
* :mod:`~kvindex.protocol.cluster_file`: the launcher's ``cluster.json``.

The wire-message names of the first five modules are re-exported here.
"""

from __future__ import annotations

from kvindex.protocol.cluster import (
    CLUSTER_TOPICS,
    TOPIC_EVENTS,
    TOPIC_HEARTBEAT,
    TOPIC_LOAD,
    ClusterMessage,
    EventBatch,
    Heartbeat,
    LoadReport,
    MessageType,
    Snapshot,
    SnapshotRequest,
)
from kvindex.protocol.decisions import (
    DECISION_TOPICS,
    TOPIC_DECISIONS,
    TOPIC_ROUTER_HEARTBEAT,
    DecisionMessage,
    RequestFinished,
    RequestRouted,
    RouterHeartbeat,
)
from kvindex.protocol.frames import (
    REPLAY_END,
    SEQ_BYTES,
    WireError,
    make_frame,
    seq_from_bytes,
    seq_to_bytes,
    split_frame,
)
from kvindex.protocol.messages import WireMessage, decode_message, encode_message
from kvindex.protocol.sglang import (
    EVENT_TYPES,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    LoadStat,
    Medium,
    ReplayItem,
    decode_event,
    decode_kv_batch,
    decode_load_stat,
    encode_kv_batch,
    encode_load_stat,
    event_to_array,
    event_to_map,
    parse_replay_reply,
    replay_request,
)

__all__ = [
    "CLUSTER_TOPICS",
    "DECISION_TOPICS",
    "EVENT_TYPES",
    "REPLAY_END",
    "SEQ_BYTES",
    "TOPIC_DECISIONS",
    "TOPIC_EVENTS",
    "TOPIC_HEARTBEAT",
    "TOPIC_LOAD",
    "TOPIC_ROUTER_HEARTBEAT",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "ClusterMessage",
    "DecisionMessage",
    "EventBatch",
    "Heartbeat",
    "KVEvent",
    "KVEventBatch",
    "LoadReport",
    "LoadStat",
    "Medium",
    "MessageType",
    "ReplayItem",
    "RequestFinished",
    "RequestRouted",
    "RouterHeartbeat",
    "Snapshot",
    "SnapshotRequest",
    "WireError",
    "WireMessage",
    "decode_event",
    "decode_kv_batch",
    "decode_load_stat",
    "decode_message",
    "encode_kv_batch",
    "encode_load_stat",
    "encode_message",
    "event_to_array",
    "event_to_map",
    "make_frame",
    "parse_replay_reply",
    "replay_request",
    "seq_from_bytes",
    "seq_to_bytes",
    "split_frame",
]
