"""Wire formats: both SGLang event encodings, LoadStat, replay frames, the cluster protocol, bad input."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex import protocol as wire
from kvindex.hashing import block_hashes

STORED = wire.BlockStored((11, 12), None, tuple(range(8)), 4)
REMOVED = wire.BlockRemoved((11,))
CLEARED = wire.AllBlocksCleared()


def test_tagged_map_encoding_is_sglangs() -> None:
    payload = wire.encode_kv_batch(wire.KVEventBatch(1.5, (STORED, REMOVED, CLEARED), 0))
    ts, events, rank = msgpack.unpackb(payload)
    assert (ts, rank) == (1.5, 0)
    assert events[0] == {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": None,
        "token_ids": list(range(8)),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
    }
    assert events[1] == {"type": "BlockRemoved", "block_hashes": [11], "medium": "GPU"}
    assert events[2] == {"type": "AllBlocksCleared"}


def test_both_encodings_decode_alike() -> None:
    batch = wire.KVEventBatch(2.0, (STORED, REMOVED, CLEARED), None)
    assert wire.decode_kv_batch(wire.encode_kv_batch(batch)) == batch
    assert wire.decode_kv_batch(wire.encode_kv_batch(batch, legacy_arrays=True)) == batch


def test_defaults_may_be_omitted() -> None:
    # Tagged maps omit fields at their default; legacy arrays may be cut after block_size; old batches have no rank.
    raw = msgpack.packb(
        [
            3.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": None,
                    "token_ids": [1, 2],
                    "block_size": 2,
                },
                ["BlockStored", [2], 1, [3, 4], 2],
                ["BlockRemoved", [1]],
                {"type": "BlockRemoved", "block_hashes": [2]},
            ],
        ]
    )
    b = wire.decode_kv_batch(raw)
    assert b.attn_dp_rank is None
    assert b.events[1] == wire.BlockStored((2,), 1, (3, 4), 2, None, "GPU")
    assert b.events[2] == b.events[3].__class__((1,))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1", "bad_msgpack"),
        (msgpack.packb({"a": 1}), "bad_batch"),
        (msgpack.packb([1.0, [["Nope"]], 0]), "unknown_event"),
        (msgpack.packb([1.0, [["BlockStored", "x", None, [], 4]], 0]), "bad_event"),
        (msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2, 3], 4]], 0]), "bad_event"),
        (msgpack.packb([1.0, [{"type": "BlockRemoved"}], 0]), "bad_event"),
    ],
)
def test_malformed_batches_raise_wire_error(payload: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError) as ei:
        wire.decode_kv_batch(payload)
    assert ei.value.reason == reason


def test_load_stat_round_trip_and_short_arrays() -> None:
    s = wire.LoadStat(3, 2, 1000, 50000, 0, 700, 1700, 128, 123456, 789)
    raw = wire.encode_load_stat(s)
    assert msgpack.unpackb(raw)[0] == "LoadStat" and len(msgpack.unpackb(raw)) == 11
    assert wire.decode_load_stat(raw) == s
    short = msgpack.packb(["LoadStat", 1, 2, 3, 4, None])
    assert wire.decode_load_stat(short).num_waiting_uncached_tokens == 0
    with pytest.raises(wire.WireError):
        wire.decode_load_stat(msgpack.packb(["LoadStat", "x", 2, 3, 4, None]))
    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(wire.WireError):
            wire.decode_load_stat(msgpack.packb(["LoadStat", bad, 2, 3, 4, None]))


def test_replay_frames_with_and_without_topic() -> None:
    assert wire.replay_request(5) == [b"", (5).to_bytes(8, "big")]
    item = wire.parse_replay_reply([b"", b"kv", (7).to_bytes(8, "big"), b"p"])
    assert (item.seq, item.payload, item.is_end) == (7, b"p", False)
    assert wire.parse_replay_reply([b"", (7).to_bytes(8, "big"), b"p"]).seq == 7
    assert wire.parse_replay_reply([b"", b"", wire.REPLAY_END, b""]).is_end
    with pytest.raises(wire.WireError):
        wire.parse_replay_reply([b"", b"x"])


def test_cluster_messages_round_trip() -> None:
    msgs: list[wire.ClusterMessage] = [
        wire.EventBatch("0", 9, 4, 1.0, (STORED, REMOVED)),
        wire.LoadReport("0", 9, 1.0, 2, 3, 400, 1000, 2000, 128),
        wire.Heartbeat("0", 9, 1.0, "http://e", True, 16, 10, "m", "tcp://s"),
        wire.SnapshotRequest(),
        wire.Snapshot("0", 9, 41, 16, (STORED,)),
    ]
    for m in msgs:
        assert wire.decode_message(wire.encode_message(m)) == m
    assert wire.LoadReport("0", 1, 0.0, 2, 3, 0, 0, 0, 0).batch_size == 5


def test_split_frame_checks_shape() -> None:
    assert wire.split_frame(wire.make_frame(b"t", 3, b"p")) == (b"t", 3, b"p")
    for bad in ([b"t", b"p"], [b"t", b"123", b"p"]):
        with pytest.raises(wire.WireError):
            wire.split_frame(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    for decode in (wire.decode_kv_batch, wire.decode_load_stat, wire.decode_message):
        with contextlib.suppress(wire.WireError):
            decode(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(["type", "block_hashes", "events", "instance", "ts"]), c, max_size=4
            )
        ),
        max_leaves=20,
    )
)
def test_random_msgpack_structures_never_raise_anything_but_wire_error(obj: object) -> None:
    data = msgpack.packb(obj)
    for decode in (wire.decode_kv_batch, wire.decode_load_stat, wire.decode_message):
        with contextlib.suppress(wire.WireError):
            decode(data)


def test_golden_block_hash() -> None:
    assert block_hashes([1, 2, 3, 4], 4) == [-3488128144981237669]


# ------------------------------------------------------------------------------------- decision stream

ROUTED = wire.RequestRouted(
    router_epoch=7,
    request_id="r-1",
    ticket=3,
    instance="0",
    policy="lmetric",
    ts=1.5,
    prompt_tokens=800,
    new_tokens=320,
    score=1280.0,
    block_hashes=(11, -12, 2**63 - 1),
    failure_cases=("fully_cached",),
)


def test_decision_messages_round_trip() -> None:
    msgs: list[wire.WireMessage] = [
        ROUTED,
        wire.RequestRouted(7, "r-2", 4, "1", "round_robin", 2.0, 10, 10, 0.0),
        wire.RequestFinished(7, "r-1", 3, "0", "200", 2.5),
        wire.RouterHeartbeat(7, "primary", 3.0, "http://127.0.0.1:30000", 4242, 10, 2, 1, 4, 0.1, (3,)),
        wire.RouterHeartbeat(9, "standby", 3.0, "http://127.0.0.1:30000", 4243),
    ]
    for m in msgs:
        raw = wire.encode_message(m)
        assert msgpack.unpackb(raw)["type"] == type(m).__name__
        assert wire.decode_message(raw) == m
    frame = wire.make_frame(wire.TOPIC_DECISIONS, 5, wire.encode_message(ROUTED))
    topic, seq, payload = wire.split_frame(frame)
    assert (topic, seq, wire.decode_message(payload)) == (b"decisions", 5, ROUTED)
    assert wire.TOPIC_ROUTER_HEARTBEAT in wire.DECISION_TOPICS


def test_decision_messages_omit_defaults_and_reject_bad_fields() -> None:
    body = dict(msgpack.unpackb(wire.encode_message(ROUTED)))
    short = {k: v for k, v in body.items() if k not in ("block_hashes", "failure_cases")}
    got = wire.decode_message(msgpack.packb(short))
    assert isinstance(got, wire.RequestRouted) and got.block_hashes == () and got.failure_cases == ()
    for field, bad in [
        ("block_hashes", [1, "x"]),
        ("block_hashes", 5),
        ("failure_cases", [1]),
        ("score", "high"),
        ("request_id", 3),
        ("ticket", True),
    ]:
        with pytest.raises(wire.WireError) as ei:
            wire.decode_message(msgpack.packb({**body, field: bad}))
        assert ei.value.reason == "bad_message", field
    hb = msgpack.unpackb(wire.encode_message(wire.RouterHeartbeat(1, "primary", 1.0, "http://x", 1)))
    for field, bad in [("role", 1), ("http", None), ("open_tickets", ["a"])]:
        with pytest.raises(wire.WireError):
            wire.decode_message(msgpack.packb({**hb, field: bad}))
