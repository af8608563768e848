"""Decoding the frames an agent receives: its engine's SGLang streams and snapshot requests. Pure.

Formats: sglang 0.5.23 ``srt/disaggregation/kv_events.py`` (KV stream ``(topic, seq, KVEventBatch)``,
load stream ``(b"load", seq, LoadStat)``) and the cluster protocol's ``[identity, b"", SnapshotRequest]``
(:mod:`kvindex.protocol.cluster`). Every function raises :class:`kvindex.protocol.WireError` and nothing
else on bytes from the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from kvindex import protocol as wire

__all__ = ["decode_kv_frame", "decode_load_frame", "decode_snapshot_request", "without_token_ids"]


def _seq_frame(frames: Sequence[bytes], topic: bytes) -> tuple[int, bytes]:
    got, seq, payload = wire.split_frame(frames)
    if topic and got != topic:
        raise wire.WireError("wrong_topic", repr(got[:40]))
    if seq < 0:
        raise wire.WireError("bad_seq", f"negative seq {seq}")
    return seq, payload


def decode_kv_frame(frames: Sequence[bytes], topic: bytes) -> tuple[int, wire.KVEventBatch]:
    """An engine KV frame ``[topic, seq, KVEventBatch]`` as ``(seq, batch)``. Pure.

    ``topic`` empty accepts any topic (else an exact match: SUB filters by prefix only).

    Raises:
        kvindex.protocol.WireError: ``bad_frame_count``, ``bad_seq``, ``wrong_topic``, or a
        :func:`kvindex.protocol.decode_kv_batch` reason. Nothing else, whatever the bytes.
    """
    seq, payload = _seq_frame(frames, topic)
    return seq, wire.decode_kv_batch(payload)


def decode_load_frame(frames: Sequence[bytes], topic: bytes) -> tuple[int, wire.LoadStat]:
    """An engine load frame ``[topic, seq, LoadStat]`` as ``(seq, stat)``. Pure.

    Raises:
        kvindex.protocol.WireError: as :func:`decode_kv_frame`, or ``bad_msgpack`` / ``bad_load``.
        Nothing else, whatever the bytes.
    """
    seq, payload = _seq_frame(frames, topic)
    try:
        return seq, wire.decode_load_stat(payload)
    except wire.WireError:
        raise
    except (ValueError, OverflowError) as exc:  # a float field of inf or NaN fails int()
        raise wire.WireError("bad_load", str(exc)[:80]) from exc


def decode_snapshot_request(frames: Sequence[bytes]) -> bytes:
    """The identity of a well-formed ``[identity, b"", SnapshotRequest]`` received by the ROUTER. Pure.

    Raises:
        kvindex.protocol.WireError: ``bad_frame_count``, ``unexpected_message`` or a
        :func:`kvindex.protocol.decode_message` reason. Nothing else, whatever the bytes.
    """
    if len(frames) != 3 or frames[1] != b"":
        raise wire.WireError("bad_frame_count", f"expected [identity, b'', request], got {len(frames)}")
    msg = wire.decode_message(frames[2])
    if not isinstance(msg, wire.SnapshotRequest):
        raise wire.WireError("unexpected_message", type(msg).__name__)
    return bytes(frames[0])


def without_token_ids(events: Iterable[wire.KVEvent]) -> tuple[wire.KVEvent, ...]:
    """``events`` with every ``BlockStored``'s ``token_ids`` emptied (hashes, parents and block size kept:
    all a router's index reads). Pure."""
    return tuple(
        dataclasses.replace(e, token_ids=()) if isinstance(e, wire.BlockStored) and e.token_ids else e
        for e in events
    )
