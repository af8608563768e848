"""Hypothesis strategies for frames and bodies from the network, shared by tests/test_frame_fuzz.py and
``python -m launch fuzz``. Needs the ``test`` extra (hypothesis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
from hypothesis import strategies as st

from kvindex import protocol as wire

BS = 4

INT64 = st.integers(-(2**63), 2**63 - 1)
PACKABLE_INTS = st.integers(-(2**63), 2**64 - 1)
SMALL = st.integers(-3, 40)
SCALARS = (
    st.none()
    | st.booleans()
    | SMALL
    | PACKABLE_INTS
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
OBJS = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6) | SMALL, c, max_size=4),
    max_leaves=10,
)
HASH = st.integers(-4, 4) | INT64  # a small pool, so that events collide
HASHES = st.lists(HASH, max_size=4)


def pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def or_junk(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``s``, sometimes any msgpack-able object instead."""
    return st.one_of(s, s, s, OBJS)


EVENT_MAPS = st.fixed_dictionaries(
    {"type": st.sampled_from([*wire.EVENT_TYPES, "Bogus"])},
    optional={
        "block_hashes": or_junk(HASHES),
        "parent_block_hash": or_junk(st.none() | HASH),
        "token_ids": or_junk(st.lists(SMALL, max_size=12)),
        "block_size": or_junk(st.sampled_from([BS, 0, -1, 16])),
        "lora_id": or_junk(st.none() | SMALL),
        "medium": or_junk(st.just("GPU")),
    },
)
EVENT_ARRAYS = st.tuples(
    st.sampled_from([*wire.EVENT_TYPES, "Bogus"]), st.lists(or_junk(HASHES), max_size=6)
).map(lambda t: [t[0], *t[1]])
EVENT_OBJS = EVENT_MAPS | EVENT_ARRAYS | OBJS
KV_PAYLOADS = st.one_of(
    st.binary(max_size=40),
    OBJS.map(pack),
    st.tuples(or_junk(st.floats()), st.lists(EVENT_OBJS, max_size=4), or_junk(st.none() | SMALL))
    .map(list)
    .map(pack),
)
LOAD_PAYLOADS = st.one_of(
    st.binary(max_size=40),
    OBJS.map(pack),
    st.lists(or_junk(SMALL | st.floats()), max_size=11).map(lambda v: pack(["LoadStat", *v])),
)

_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "instance": st.sampled_from(["i0", "i1", ""]),
    "agent_epoch": st.sampled_from([1, 2]) | INT64,
    "engine_seq": st.integers(-1, 5) | INT64,
    "seq": st.integers(-2, 50) | INT64,
    "ts": st.floats(),
    "interval": st.floats(),
    "engine_url": st.text(max_size=8),
    "model": st.text(max_size=4),
    "snapshot_endpoint": st.sampled_from(["tcp://snap", ""]),
    "engine_healthy": st.booleans(),
    "block_size": st.sampled_from([BS, 8, 0, -1]) | INT64,
    "events": st.lists(EVENT_OBJS, max_size=4),
}
MESSAGE_MAPS = st.fixed_dictionaries(
    {"type": st.sampled_from(["EventBatch", "LoadReport", "Heartbeat", "SnapshotRequest", "Snapshot", "X"])},
    optional={
        name: or_junk(_FIELDS.get(name, SMALL | INT64))
        for name in (
            *_FIELDS,
            "running",
            "waiting",
            "queued_prefill_tokens",
            "kv_used_tokens",
            "kv_capacity_tokens",
            "max_running_requests",
            "cached_blocks",
        )
    },
)
CLUSTER_PAYLOADS = st.one_of(st.binary(max_size=40), OBJS.map(pack), MESSAGE_MAPS.map(pack))
SEQ_FRAMES = st.one_of(
    st.integers(0, 50).map(wire.seq_to_bytes),
    st.integers(0, 2**63 - 1).map(wire.seq_to_bytes),
    st.integers(-(2**63), -1).map(lambda v: v.to_bytes(8, "big", signed=True)),
    st.binary(max_size=10),
)


def frames_of(topics: Sequence[bytes], payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    """Random multipart messages: any count of random frames, or (topic, seq, payload) shaped ones."""
    topic = st.sampled_from(list(topics)) | st.binary(max_size=6)
    shaped = st.tuples(topic, SEQ_FRAMES, payloads).map(list)
    return st.one_of(st.lists(st.binary(max_size=12), max_size=5), shaped, shaped)


DECISION_MAPS = st.fixed_dictionaries(
    {"type": st.sampled_from(["RequestRouted", "RequestFinished", "RouterHeartbeat", "X"])},
    optional={
        name: or_junk(strat)
        for name, strat in {
            "router_epoch": st.sampled_from([1, 2]) | INT64,
            "term": st.integers(-1, 3) | INT64,
            "request_id": st.text(max_size=6),
            "ticket": st.integers(-1, 5) | INT64,
            "instance": st.sampled_from(["i0", "i1", ""]),
            "policy": st.text(max_size=4),
            "ts": st.floats(),
            "prompt_tokens": SMALL | INT64,
            "new_tokens": SMALL | INT64,
            "score": st.floats(),
            "block_hashes": HASHES,
            "failure_cases": st.lists(st.text(max_size=4), max_size=3),
            "status": st.text(max_size=4),
            "role": st.sampled_from(["primary", "standby", "fenced", ""]),
            "http": st.text(max_size=8),
            "admin": st.text(max_size=8),
            "decisions": st.text(max_size=8),
            "pid": SMALL,
            "open_tickets": st.lists(SMALL, max_size=4),
            "interval": st.floats(),
        }.items()
    },
)
DECISION_PAYLOADS = st.one_of(st.binary(max_size=40), OBJS.map(pack), DECISION_MAPS.map(pack))

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
_BODY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.text(max_size=6),
    "text": st.text(max_size=20),
    "prompt": st.text(max_size=20) | st.lists(st.integers(-5, 300), max_size=8),
    "input_ids": st.lists(st.integers(-(2**40), 2**40), max_size=8),
    "messages": st.lists(
        st.fixed_dictionaries(
            {}, optional={"role": st.sampled_from(["user", "system", "x"]), "content": JSON}
        ),
        max_size=3,
    ),
    "stream": st.booleans(),
    "max_tokens": st.integers(-5, 2**40),
    "max_new_tokens": st.integers(-5, 2**40),
    "sampling_params": st.dictionaries(
        st.sampled_from(["max_new_tokens", "ignore_eos", "x"]), JSON, max_size=3
    ),
    "n": st.integers(-1, 3),
    "stream_options": st.dictionaries(st.sampled_from(["include_usage"]), JSON, max_size=1),
}
HTTP_BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries({}, optional={k: or_junk(v) for k, v in _BODY_FIELDS.items()}),
)
