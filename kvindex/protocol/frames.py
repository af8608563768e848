"""Framing shared by every numbered ZeroMQ stream, and the one error every decoder raises. Pure.

Every stream (SGLang's KV and load publishers, an agent's cluster stream, a router's decision stream) is
multipart ``(topic, seq as 8-byte big-endian, payload)``. Every decoder in :mod:`kvindex.protocol` raises
:class:`WireError` (a ``ValueError``) with a short machine-readable ``reason`` on malformed input; callers
count it by reason, log it and skip the frame. No decoder raises anything else on bytes from the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgpack

# ----------------------------------------------------------------------------------------------- errors


class WireError(ValueError):
    """A frame or payload that does not decode. ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ------------------------------------------------------------------------------------- sequence frames

SEQ_BYTES: Final = 8
REPLAY_END: Final = (-1).to_bytes(8, "big", signed=True)


def seq_to_bytes(seq: int) -> bytes:
    """8-byte big-endian encoding of a non-negative sequence number."""
    return seq.to_bytes(SEQ_BYTES, "big")


def seq_from_bytes(frame: bytes) -> int:
    """Decode an 8-byte big-endian *signed* sequence number (``-1`` marks the end of a replay).

    Raises:
        WireError: ``bad_seq`` if the frame is not exactly 8 bytes.
    """
    if len(frame) != SEQ_BYTES:
        raise WireError("bad_seq", f"sequence frame of {len(frame)} bytes")
    return int.from_bytes(frame, "big", signed=True)


def split_frame(frames: Sequence[bytes]) -> tuple[bytes, int, bytes]:
    """Split a live-stream multipart ``(topic, seq, payload)``.

    Raises:
        WireError: ``bad_frame_count`` or ``bad_seq``.
    """
    if len(frames) != 3:
        raise WireError("bad_frame_count", f"expected 3 frames, got {len(frames)}")
    topic, seq, payload = frames
    return bytes(topic), seq_from_bytes(bytes(seq)), bytes(payload)


def make_frame(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """The multipart ``[topic, seq (8B BE), payload]`` for a PUB socket."""
    return [topic, seq_to_bytes(seq), payload]


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError("bad_msgpack", str(exc)[:120]) from exc


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed
