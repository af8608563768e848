"""SGLang's own wire formats (sglang 0.5.23, ``srt/disaggregation/kv_events.py`` and the load publisher). Pure.

The emulated engine emits these and the agent reads them from real or emulated engines:

* Live KV stream: ZeroMQ PUB, multipart ``(topic, seq as 8-byte big-endian, payload)``; seq counts from 0
  and restarts at 0 when the engine restarts. ``payload`` is a ``KVEventBatch`` = msgpack array
  ``[ts: float, events: list, attn_dp_rank: int | None]``.
* Events are tagged maps since 2026-09 (sglang PR #37482), fields at their default omitted::

      {"type": "BlockStored", "block_hashes": [int64...], "parent_block_hash": int64 | None,
       "token_ids": [int...], "block_size": int, "lora_id": None, "medium": "GPU"}
      {"type": "BlockRemoved", "block_hashes": [int64...], "medium": "GPU"}
      {"type": "AllBlocksCleared"}

  and tagged arrays before that: ``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium]``, ``["BlockRemoved", block_hashes, medium]``, ``["AllBlocksCleared"]``
  (trailing fields may be missing). :func:`decode_kv_batch` reads both.
* Replay: ROUTER socket. A DEALER sends ``[b"", start_seq (8B BE)]`` and receives
  ``[b"", topic, seq, payload]`` per buffered batch with ``seq >= start_seq``, then
  ``[b"", b"", -1 (8B BE signed), b""]``. Older servers omit the topic frame (``[b"", seq, payload]``
  and ``[b"", -1, b""]``); :func:`parse_replay_reply` reads both.
* Load stream: ``[b"load", seq, msgpack LoadStat]``, LoadStat being the tagged array
  ``["LoadStat", num_running_reqs, num_waiting_reqs, num_tokens, max_total_num_tokens, attn_dp_rank,
  num_waiting_uncached_tokens, num_total_tokens, max_running_requests, total_prefill_uncached_tokens,
  total_prefill_busy_us]``.

Decoders raise :class:`~kvindex.protocol.frames.WireError` on malformed input and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from kvindex.protocol.frames import (
    WireError,
    _pack,
    _unpack,
    seq_from_bytes,
    seq_to_bytes,
)

# ------------------------------------------------------------------------------------ SGLang KV events

Medium: TypeAlias = str


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Pages newly cached, in prefix order; ``block_hashes[0]``'s parent is ``parent_block_hash``.

    ``token_ids`` holds ``len(block_hashes) * block_size`` tokens (the pages' contents).
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: Medium = "GPU"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Pages evicted from the cache (any order)."""

    block_hashes: tuple[int, ...]
    medium: Medium = "GPU"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole cache was flushed."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared
EVENT_TYPES: Final = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """One scheduler step's events: ``[ts, events, attn_dp_rank]`` on the wire. ``ts`` in Unix seconds."""

    ts: float
    events: tuple[KVEvent, ...]
    attn_dp_rank: int | None = None


def _int_list(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, list | tuple):
        raise WireError("bad_event", f"{what} is not a list")
    for v in x:
        if type(v) is not int:
            raise WireError("bad_event", f"{what} holds a non-integer")
    return tuple(x)


def _opt_int(x: Any, what: str) -> int | None:
    if x is not None and type(x) is not int:
        raise WireError("bad_event", f"{what} is not an integer or None")
    return x


def _medium(x: Any) -> str:
    if x is None:
        return "GPU"
    if not isinstance(x, str):
        raise WireError("bad_event", "medium is not a string")
    return x


def _make_stored(
    hashes: Any, parent: Any, tokens: Any, block_size: Any, lora: Any, medium: Any
) -> BlockStored:
    hs = _int_list(hashes, "block_hashes")
    toks = _int_list(tokens, "token_ids")
    if type(block_size) is not int or block_size <= 0:
        raise WireError("bad_event", "block_size is not a positive integer")
    if toks and len(toks) != len(hs) * block_size:
        raise WireError("bad_event", f"{len(toks)} token_ids for {len(hs)} blocks of {block_size}")
    return BlockStored(
        hs,
        _opt_int(parent, "parent_block_hash"),
        toks,
        block_size,
        _opt_int(lora, "lora_id"),
        _medium(medium),
    )


def decode_event(obj: Any) -> KVEvent:
    """Decode one event in either SGLang encoding (tagged map, or legacy tagged array).

    Raises:
        WireError: ``unknown_event`` for an unknown tag, ``bad_event`` for a malformed body.
    """
    if isinstance(obj, dict):
        tag = obj.get("type")
        if tag == "BlockStored":
            if "block_hashes" not in obj or "block_size" not in obj:
                raise WireError("bad_event", "BlockStored without block_hashes/block_size")
            return _make_stored(
                obj["block_hashes"],
                obj.get("parent_block_hash"),
                obj.get("token_ids", []),
                obj["block_size"],
                obj.get("lora_id"),
                obj.get("medium"),
            )
        if tag == "BlockRemoved":
            if "block_hashes" not in obj:
                raise WireError("bad_event", "BlockRemoved without block_hashes")
            return BlockRemoved(_int_list(obj["block_hashes"], "block_hashes"), _medium(obj.get("medium")))
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
        raise WireError("unknown_event", repr(tag)[:40])
    if isinstance(obj, list | tuple) and obj:
        tag, body = obj[0], list(obj[1:])
        if tag == "BlockStored":
            if len(body) < 4:
                raise WireError("bad_event", "BlockStored array too short")
            body += [None] * (6 - len(body))
            return _make_stored(*body[:6])
        if tag == "BlockRemoved":
            if len(body) < 1:
                raise WireError("bad_event", "BlockRemoved array too short")
            return BlockRemoved(
                _int_list(body[0], "block_hashes"), _medium(body[1] if len(body) > 1 else None)
            )
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
        raise WireError("unknown_event", repr(tag)[:40])
    raise WireError("bad_event", f"event of type {type(obj).__name__}")


def event_to_map(ev: KVEvent) -> dict[str, Any]:
    """Tagged-map encoding (SGLang since 2026-09), as a msgpack-ready dict."""
    if isinstance(ev, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": list(ev.block_hashes),
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": list(ev.token_ids),
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
        }
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": list(ev.block_hashes), "medium": ev.medium}
    return {"type": "AllBlocksCleared"}


def event_to_array(ev: KVEvent) -> list[Any]:
    """Legacy tagged-array encoding (SGLang before 2026-09)."""
    if isinstance(ev, BlockStored):
        return [
            "BlockStored",
            list(ev.block_hashes),
            ev.parent_block_hash,
            list(ev.token_ids),
            ev.block_size,
            ev.lora_id,
            ev.medium,
        ]
    if isinstance(ev, BlockRemoved):
        return ["BlockRemoved", list(ev.block_hashes), ev.medium]
    return ["AllBlocksCleared"]


def encode_kv_batch(batch: KVEventBatch, legacy_arrays: bool = False) -> bytes:
    """msgpack ``[ts, events, attn_dp_rank]``; events as tagged maps, or tagged arrays if ``legacy_arrays``."""
    enc = event_to_array if legacy_arrays else event_to_map
    return _pack([batch.ts, [enc(e) for e in batch.events], batch.attn_dp_rank])


def decode_kv_batch(payload: bytes) -> KVEventBatch:
    """Decode a ``KVEventBatch`` payload (either event encoding; a 2-element batch without rank is accepted).

    Raises:
        WireError: ``bad_msgpack``, ``bad_batch``, ``bad_event`` or ``unknown_event``.
    """
    obj = _unpack(payload)
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise WireError("bad_batch", "KVEventBatch is not a 2- or 3-element array")
    ts, events = obj[0], obj[1]
    rank = obj[2] if len(obj) == 3 else None
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise WireError("bad_batch", "ts/events of wrong type")
    return KVEventBatch(float(ts), tuple(decode_event(e) for e in events), _opt_int(rank, "attn_dp_rank"))


# ------------------------------------------------------------------------------------------ SGLang load


@dataclass(frozen=True, slots=True)
class LoadStat:
    """SGLang's per-engine load report (tagged array ``["LoadStat", ...]`` on the wire, fields in this order).

    Units: requests for ``num_*_reqs`` and ``max_running_requests``; tokens for every ``*_tokens``;
    microseconds for ``total_prefill_busy_us``. ``num_tokens`` is KV tokens in use and
    ``max_total_num_tokens`` the KV capacity; ``num_waiting_uncached_tokens`` is the prefill work still
    queued (uncached prompt tokens not yet computed); the two ``total_prefill_*`` fields are cumulative.
    """

    num_running_reqs: int
    num_waiting_reqs: int
    num_tokens: int
    max_total_num_tokens: int
    attn_dp_rank: int | None
    num_waiting_uncached_tokens: int
    num_total_tokens: int
    max_running_requests: int
    total_prefill_uncached_tokens: int
    total_prefill_busy_us: int


_LOADSTAT_FIELDS: Final = 10


def encode_load_stat(stat: LoadStat) -> bytes:
    """msgpack tagged array ``["LoadStat", <10 fields in declaration order>]``."""
    return _pack(
        [
            "LoadStat",
            stat.num_running_reqs,
            stat.num_waiting_reqs,
            stat.num_tokens,
            stat.max_total_num_tokens,
            stat.attn_dp_rank,
            stat.num_waiting_uncached_tokens,
            stat.num_total_tokens,
            stat.max_running_requests,
            stat.total_prefill_uncached_tokens,
            stat.total_prefill_busy_us,
        ]
    )


def decode_load_stat(payload: bytes) -> LoadStat:
    """Decode a LoadStat payload; missing trailing fields read as 0.

    Raises:
        WireError: ``bad_msgpack`` or ``bad_load``.
    """
    obj = _unpack(payload)
    if not isinstance(obj, list) or not obj or obj[0] != "LoadStat" or len(obj) < 5:
        raise WireError("bad_load", "not a LoadStat tagged array")
    vals = list(obj[1:]) + [0] * (_LOADSTAT_FIELDS - (len(obj) - 1))
    vals = vals[:_LOADSTAT_FIELDS]
    for i, v in enumerate(vals):
        if i == 4:
            if v is not None and type(v) is not int:
                raise WireError("bad_load", "attn_dp_rank is not an integer")
        elif not isinstance(v, int | float) or isinstance(v, bool):
            raise WireError("bad_load", f"field {i + 1} is not a number")
        elif isinstance(v, float) and not math.isfinite(v):
            raise WireError("bad_load", f"field {i + 1} is not finite")
    return LoadStat(*(v if i == 4 else int(v) for i, v in enumerate(vals)))


# ---------------------------------------------------------------------------------------- replay frames


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """One reply from an SGLang replay socket: a buffered batch, or the end marker (``seq == -1``)."""

    seq: int
    payload: bytes

    @property
    def is_end(self) -> bool:
        return self.seq == -1


def replay_request(start_seq: int) -> list[bytes]:
    """The DEALER multipart asking an SGLang replay socket for every buffered batch with seq >= start."""
    return [b"", seq_to_bytes(start_seq)]


def parse_replay_reply(frames: Sequence[bytes]) -> ReplayItem:
    """Parse one reply received by a DEALER, with or without the topic frame.

    Raises:
        WireError: ``bad_replay`` or ``bad_seq``.
    """
    fr = [bytes(f) for f in frames]
    if fr and fr[0] == b"":
        fr = fr[1:]
    if len(fr) == 3:  # topic, seq, payload (0.5.23)
        return ReplayItem(seq_from_bytes(fr[1]), fr[2])
    if len(fr) == 2:  # seq, payload (older)
        return ReplayItem(seq_from_bytes(fr[0]), fr[1])
    raise WireError("bad_replay", f"replay reply of {len(frames)} frames")
