"""The fast ingest path (``scan_kv_batch`` + ``GlobalIndex.apply_payload``) against the full-fidelity one
(``decode_kv_batch`` + ``apply_batch``): same index state, same counters, same ``WireError`` reasons, on
random well-formed and malformed batches (pure)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex import wire
from kvindex.hashing import block_hashes
from kvindex.index import GlobalIndex

BS = 2
PROMPTS = ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 6, 6])
REAL = sorted({h for p in PROMPTS for h in block_hashes(p, BS)})

# Hashes: real chained ones (so stores, removes and parents meet), odd ints (incl. outside int64, which
# msgpack carries as uint64), and the junk a broken publisher could send.
HASH = st.sampled_from(REAL) | st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 2**63, 2**64 - 1])
JUNK = st.sampled_from([None, True, 1.5, "x", b"y", [], {}, [1], {"a": 1}, -1])
ORDER = ("type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")


@st.composite
def event(draw: st.DrawFn) -> Any:
    """A random event: usually well formed, else with one field (or the whole event) broken."""
    kind = draw(st.sampled_from(["stored"] * 6 + ["removed"] * 3 + ["cleared", "odd"]))
    if kind == "odd":
        return draw(
            st.sampled_from([{"type": "Nope"}, {}, {"block_hashes": [1]}, 5, "x", None, [], ["Nope"]])
        )
    hs = draw(st.lists(HASH, max_size=4))
    if kind == "stored":
        bs = draw(st.sampled_from([BS, BS, BS, BS, 4]))
        body: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": hs,
            "parent_block_hash": draw(st.none() | st.sampled_from(REAL) | HASH),
            # Elements always ints: what token_ids *holds* is the fast path's one documented leniency.
            "token_ids": list(range(draw(st.sampled_from([0, len(hs) * bs, len(hs) * bs, 17, 300])))),
            "block_size": bs,
            "lora_id": draw(st.sampled_from([None, None, 3])),
            "medium": draw(st.sampled_from(["GPU", None, "CPU"])),
        }
    elif kind == "removed":
        body = {"type": "BlockRemoved", "block_hashes": hs, "medium": draw(st.sampled_from(["GPU", None]))}
    else:
        body = {"type": "AllBlocksCleared"}
    if draw(st.integers(0, 7)) == 0:  # break one field
        field = draw(st.sampled_from(ORDER[1:]))
        junk = draw(JUNK | st.lists(HASH | JUNK, min_size=1, max_size=3) | st.sampled_from([0, -2, "2", 2.0]))
        if field == "token_ids" and isinstance(junk, list):  # keep clear of the documented leniency
            junk = [0] * len(junk)
        body[field] = junk
    if draw(st.booleans()):  # legacy tagged array, possibly cut short
        if body["type"] == "BlockRemoved":
            arr = [body["type"], body["block_hashes"], body["medium"]]
        else:
            arr = [body["type"], *(body[k] for k in ORDER[1:] if k in body)]
        return arr[: draw(st.integers(1, len(arr)))] if draw(st.integers(0, 3)) == 0 else arr
    # Tagged map, optional fields sometimes omitted (and, rarely, a required one).
    required = ("type", "block_hashes", "block_size")
    return {k: v for k, v in body.items() if draw(st.integers(0, 30 if k in required else 6)) > 0}


@st.composite
def payload(draw: st.DrawFn) -> bytes:
    events = draw(st.lists(event(), max_size=4))
    shape = draw(st.sampled_from(["ok"] * 12 + ["two", "rank", "ts", "events", "four", "map"]))
    batch: Any = [1.5, events, 0]
    if shape == "two":
        batch = [2, events]
    elif shape == "rank":
        batch = [1.0, events, draw(JUNK)]
    elif shape == "ts":
        batch = [draw(JUNK), events, None]
    elif shape == "events":
        batch = [1.0, draw(JUNK), None]
    elif shape == "four":
        batch = [1.0, events, None, 1]
    elif shape == "map":
        batch = {"ts": 1.0, "events": events}
    damage = draw(st.sampled_from(["none"] * 12 + ["trailing", "truncated", "flip"]))
    if damage == "flip":  # a flipped byte inside token_ids would be the documented leniency: none there
        for ev in events:
            if isinstance(ev, dict):
                ev.pop("token_ids", None)
            elif isinstance(ev, list) and len(ev) > 3 and ev[0] == "BlockStored":
                ev[3] = []
    raw = msgpack.packb(batch, use_bin_type=True)
    if damage == "trailing":
        raw += b"\x00"
    elif damage == "truncated" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip" and raw:
        k = draw(st.integers(0, len(raw) - 1))
        raw = raw[:k] + bytes([draw(st.integers(0, 255))]) + raw[k + 1 :]
    return bytes(raw)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return ("ok", fn(*args))
    except wire.WireError as exc:
        return ("error", exc.reason)


def same_state(a: GlobalIndex, b: GlobalIndex) -> None:
    a.check_invariants()
    b.check_invariants()
    assert a.stats == b.stats
    assert a.instances() == b.instances()
    assert a.total_blocks() == b.total_blocks()
    for n in a.instances():
        assert a.blocks_of(n) == b.blocks_of(n)
        assert a.dump(n) == b.dump(n)
        assert all(a.has_block(n, h) == b.has_block(n, h) for h in REAL)
    for p in PROMPTS:
        assert a.match(p).cached_tokens == b.match(p).cached_tokens


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.tuples(st.sampled_from(["a", "b"]), payload()), min_size=1, max_size=6))
def test_fast_path_equals_full_decode(payloads: list[tuple[str, bytes]]) -> None:
    fast, slow = GlobalIndex(BS), GlobalIndex(BS)
    for name, raw in payloads:
        # The streaming scan and the decode-everything scan agree (the stream falls back when unsure).
        assert outcome(wire.scan_kv_batch, raw) == outcome(wire._scan_full, raw)
        got = outcome(fast.apply_payload, name, raw)
        try:
            slow.apply_batch(name, wire.decode_kv_batch(raw).events)
            want: tuple[str, Any] = ("ok", None)
        except wire.WireError as exc:
            want = ("error", exc.reason)
        assert (got[0], got[1] if got[0] == "error" else None) == want
        same_state(fast, slow)


def batch_of(*events: Any) -> bytes:
    return bytes(msgpack.packb([1.0, list(events), 0], use_bin_type=True))


def test_token_contents_are_the_one_leniency() -> None:
    ev = {"type": "BlockStored", "block_hashes": [11], "token_ids": ["a", None], "block_size": 2}
    raw = batch_of(ev)
    with pytest.raises(wire.WireError):
        wire.decode_kv_batch(raw)
    idx = GlobalIndex(2)
    assert idx.apply_payload("a", raw) == 1
    assert idx.has_block("a", 11)


def test_stream_scan_reads_long_token_arrays_and_duplicate_keys() -> None:
    hs = list(range(40_000))
    for n_hashes in (1, 7, 40_000):  # fixarray, array 16 and array 32 token_ids
        ev = {
            "type": "BlockStored",
            "block_hashes": hs[:n_hashes],
            "token_ids": [1] * n_hashes * 2,
            "block_size": 2,
        }
        assert wire._scan_stream(batch_of(ev)) == [(wire.LEAN_STORED, hs[:n_hashes], None, 2)]
    # A map with two token_ids keys: the last one wins, as in a decoded dict.
    pairs = [("type", "BlockStored"), ("token_ids", [1]), ("block_hashes", [5]), ("block_size", 2)]
    pairs.append(("token_ids", [1, 2]))
    raw = b"\x93" + msgpack.packb(1.0) + b"\x91\x85"
    raw += b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs) + msgpack.packb(0)
    assert msgpack.unpackb(raw)[1][0]["token_ids"] == [1, 2]
    assert wire._scan_stream(raw) == wire._scan_full(raw) == [(wire.LEAN_STORED, [5], None, 2)]


def test_fast_path_errors_leave_the_index_untouched() -> None:
    idx = GlobalIndex(2)
    good = {"type": "BlockStored", "block_hashes": [1, 2], "block_size": 2}
    for raw, reason in [
        (b"\xc1", "bad_msgpack"),
        (batch_of(good) + b"\x00", "bad_msgpack"),
        (bytes(msgpack.packb([1.0])), "bad_batch"),
        (batch_of(good, {"type": "Huh"}), "unknown_event"),
        (batch_of(good, {"type": "BlockStored", "block_hashes": [True], "block_size": 2}), "bad_event"),
        (bytes(msgpack.packb([1.0, [good], "rank"])), "bad_event"),
    ]:
        with pytest.raises(wire.WireError) as err:
            idx.apply_payload("x", raw)
        assert err.value.reason == reason
    assert idx.instances() == () and idx.total_blocks() == 0


def test_hashes_outside_int64_round_trip() -> None:
    big = [2**63, 2**64 - 1, 5]
    idx = GlobalIndex(2)
    idx.apply_payload(
        "a",
        batch_of(
            {"type": "BlockStored", "block_hashes": big, "parent_block_hash": 2**63 + 7, "block_size": 2}
        ),
    )
    assert idx.blocks_of("a") == 3 and all(idx.has_block("a", h) for h in big)
    assert idx.dump("a") == [wire.BlockStored(tuple(big), 2**63 + 7, (), 2)]
    idx.apply_payload("a", batch_of({"type": "BlockRemoved", "block_hashes": [2**64 - 1]}))
    assert idx.blocks_of("a") == 2 and not idx.has_block("a", 2**64 - 1)
    idx.check_invariants()
    assert idx.remove_instance("a") == 2
    assert idx.total_blocks() == 0
