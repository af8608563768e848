"""Every message that crosses a socket, typed and tagged, with its msgpack codec. Pure: no I/O.

Two families live here.

**SGLang's formats** (sglang 0.5.23, ``srt/disaggregation/kv_events.py`` and the load publisher), which the
emulated engine emits and the agent reads from real or emulated engines:

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

**The cluster protocol** (ours), which an agent publishes to routers, the standby and the metrics daemon:
multipart ``(topic, seq as 8-byte big-endian, payload)`` on the agent's PUB socket, one sequence number
across all topics of that agent (so a subscriber detects a lost frame whatever its topic). Payloads are
msgpack maps tagged by ``"type"``: :class:`EventBatch`, :class:`LoadReport`, :class:`Heartbeat`. The
agent's ROUTER socket answers a DEALER's ``[b"", SnapshotRequest]`` with ``[b"", Snapshot]``.
``agent_epoch`` changes whenever the agent process restarts (its sequence then restarts at 0).

Every decoder raises :class:`WireError` (a ``ValueError``) with a short machine-readable ``reason`` on
malformed input; callers count it by reason, log it and skip the frame. No decoder raises anything else
on bytes from the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, Literal, TypeAlias

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


# ------------------------------------------------------------------------ lean KV batch scan (fast path)

LEAN_STORED: Final = 0
LEAN_REMOVED: Final = 1
LEAN_CLEARED: Final = 2
_NO_HASHES: Final[tuple[int, ...]] = ()

LeanEvent: TypeAlias = tuple[int, Sequence[int], int | None, int]
"""``(kind, block_hashes, parent_block_hash, block_size)``: all the index needs of one event.

``kind`` is :data:`LEAN_STORED`, :data:`LEAN_REMOVED` or :data:`LEAN_CLEARED`; removed and cleared events
carry ``None`` and ``0`` in the fields they lack (and no hashes when cleared)."""


def _lean_hashes(x: Any) -> Sequence[int]:
    # One C-level pass over the element types instead of a Python loop: ~16 ns a hash.
    if not isinstance(x, list | tuple):
        raise WireError("bad_event", "block_hashes is not a list")
    if x and set(map(type, x)) != {int}:
        raise WireError("bad_event", "block_hashes holds a non-integer")
    return x


def _lean_stored(
    hashes: Any, parent: Any, n_tokens: int, block_size: Any, lora: Any, medium: Any
) -> LeanEvent:
    # _make_stored's checks (all reason bad_event, so their order does not matter), given the length of
    # a token_ids already known to be a list: its elements are not looked at.
    hs = _lean_hashes(hashes)
    if type(block_size) is not int or block_size <= 0:
        raise WireError("bad_event", "block_size is not a positive integer")
    if n_tokens and n_tokens != len(hs) * block_size:
        raise WireError("bad_event", f"{n_tokens} token_ids for {len(hs)} blocks of {block_size}")
    if parent is not None and type(parent) is not int:
        raise WireError("bad_event", "parent_block_hash is not an integer or None")
    if lora is not None and type(lora) is not int:
        raise WireError("bad_event", "lora_id is not an integer or None")
    if medium is not None and not isinstance(medium, str):
        raise WireError("bad_event", "medium is not a string")
    return (LEAN_STORED, hs, parent, block_size)


def _n_tokens(tokens: Any) -> int:
    if not isinstance(tokens, list | tuple):
        raise WireError("bad_event", "token_ids is not a list")
    return len(tokens)


def _lean_removed(hashes: Any, medium: Any) -> LeanEvent:
    hs = _lean_hashes(hashes)
    if medium is not None and not isinstance(medium, str):
        raise WireError("bad_event", "medium is not a string")
    return (LEAN_REMOVED, hs, None, 0)


_LEAN_CLEARED_EVENT: Final[LeanEvent] = (LEAN_CLEARED, _NO_HASHES, None, 0)


def _lean_map(obj: dict[Any, Any], n_tokens: int | None) -> LeanEvent:
    """A tagged-map event; ``n_tokens`` is the length of its token_ids when the caller skipped them."""
    tag = obj.get("type")
    if tag == "BlockStored":
        if "block_hashes" not in obj or "block_size" not in obj:
            raise WireError("bad_event", "BlockStored without block_hashes/block_size")
        return _lean_stored(
            obj["block_hashes"],
            obj.get("parent_block_hash"),
            _n_tokens(obj.get("token_ids", _NO_HASHES)) if n_tokens is None else n_tokens,
            obj["block_size"],
            obj.get("lora_id"),
            obj.get("medium"),
        )
    if tag == "BlockRemoved":
        if "block_hashes" not in obj:
            raise WireError("bad_event", "BlockRemoved without block_hashes")
        return _lean_removed(obj["block_hashes"], obj.get("medium"))
    if tag == "AllBlocksCleared":
        return _LEAN_CLEARED_EVENT
    raise WireError("unknown_event", repr(tag)[:40])


def scan_event(obj: Any) -> LeanEvent:
    """:func:`decode_event`, lean: the same events accepted and the same ``WireError`` reasons, but no
    dataclass is built and the elements of ``token_ids`` are not type-checked (only its length).

    Raises:
        WireError: ``unknown_event`` for an unknown tag, ``bad_event`` for a malformed body.
    """
    if isinstance(obj, dict):
        return _lean_map(obj, None)
    if isinstance(obj, list | tuple) and obj:
        tag = obj[0]
        n = len(obj)
        if tag == "BlockStored":
            if n < 5:
                raise WireError("bad_event", "BlockStored array too short")
            return _lean_stored(
                obj[1],
                obj[2],
                _n_tokens(obj[3]),
                obj[4],
                obj[5] if n > 5 else None,
                obj[6] if n > 6 else None,
            )
        if tag == "BlockRemoved":
            if n < 2:
                raise WireError("bad_event", "BlockRemoved array too short")
            return _lean_removed(obj[1], obj[2] if n > 2 else None)
        if tag == "AllBlocksCleared":
            return _LEAN_CLEARED_EVENT
        raise WireError("unknown_event", repr(tag)[:40])
    raise WireError("bad_event", f"event of type {type(obj).__name__}")


def scan_kv_batch(payload: bytes) -> list[LeanEvent]:
    """The index's fast path: a ``KVEventBatch`` payload as :data:`LeanEvent` tuples, in order.

    Accepts what :func:`decode_kv_batch` accepts and raises the same ``WireError`` reasons, with one
    documented leniency: what ``token_ids`` *holds* is not checked, only that it is a list and its length
    (the index never reads token ids, and building them as ints is most of a full decode's cost). Never
    raises anything else.

    How: a streaming pass (:func:`_scan_stream`) reads the batch with a ``msgpack.Unpacker``, building
    every field but skipping each tagged-map event's ``token_ids`` in C (its array header gives the
    length). Whatever that pass finds unusual -- an error, a field of an unexpected type, trailing bytes --
    it hands to :func:`_scan_full` (decode everything, then :func:`scan_event`), which decides the reason
    exactly as ``decode_kv_batch`` does. So the fast pass only ever returns for well-formed batches.

    Raises:
        WireError: ``bad_msgpack``, ``bad_batch``, ``bad_event`` or ``unknown_event``.
    """
    try:
        return _scan_stream(payload)
    except Exception:  # any surprise: the full decode gives the exact verdict
        return _scan_full(payload)


def _scan_full(payload: bytes) -> list[LeanEvent]:
    obj = _unpack(payload)
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise WireError("bad_batch", "KVEventBatch is not a 2- or 3-element array")
    ts, events = obj[0], obj[1]
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise WireError("bad_batch", "ts/events of wrong type")
    out = [scan_event(e) for e in events]
    # decode_kv_batch checks the rank after the events: same order, so the same reason wins.
    if len(obj) == 3:
        _opt_int(obj[2], "attn_dp_rank")
    return out


def _array_len_at(payload: bytes, pos: int) -> int:
    """Length of the msgpack array whose header starts at ``payload[pos]``; ``ValueError`` if none."""
    b = payload[pos]
    if 0x90 <= b <= 0x9F:  # fixarray
        return b & 0x0F
    if b == 0xDC:  # array 16
        return int.from_bytes(payload[pos + 1 : pos + 3], "big")
    if b == 0xDD:  # array 32
        return int.from_bytes(payload[pos + 1 : pos + 5], "big")
    raise ValueError("not an array")


def _scan_stream(payload: bytes) -> list[LeanEvent]:
    """The common case of :func:`scan_kv_batch`; raises (anything) where it is not sure of the verdict."""
    # Same limits as msgpack.unpackb(payload): it sizes them from the payload too.
    up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(payload), 1))
    up.feed(payload)
    n = up.read_array_header()
    if n not in (2, 3) or not isinstance(up.unpack(), int | float):
        raise ValueError("not a plain batch")
    out: list[LeanEvent] = []
    append = out.append
    for _ in range(up.read_array_header()):
        b = payload[up.tell()]
        if 0x80 <= b <= 0x8F or b == 0xDE or b == 0xDF:  # a tagged map: skip its token_ids
            fields: dict[Any, Any] = {}
            n_tokens = 0
            for _ in range(up.read_map_header()):
                key = up.unpack()
                if key == "token_ids":
                    n_tokens = _array_len_at(payload, up.tell())
                    up.skip()  # a duplicate key: the last one wins, as in a decoded dict
                else:
                    fields[key] = up.unpack()
            append(_lean_map(fields, n_tokens))
        else:  # a legacy tagged array (or garbage): decode it whole
            append(scan_event(up.unpack()))
    if n == 3:
        _opt_int(up.unpack(), "attn_dp_rank")
    if up.tell() != len(payload):
        raise ValueError("trailing bytes")
    return out


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
    prefilled; ``kv_used_tokens``/``kv_capacity_tokens`` in tokens.
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

    @property
    def batch_size(self) -> int:
        """Running plus waiting requests (LMetric's ``bs``)."""
        return self.running + self.waiting

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


def encode_message(msg: WireMessage) -> bytes:
    """msgpack map tagged by ``"type"``; events inside as SGLang tagged maps."""
    if isinstance(msg, EventBatch | Snapshot):
        body: dict[str, Any] = {f: getattr(msg, f) for f in msg.__dataclass_fields__ if f != "events"}
        body["events"] = [event_to_map(e) for e in msg.events]
    else:
        body = {f: getattr(msg, f) for f in msg.__dataclass_fields__}
    body["type"] = type(msg).__name__
    return _pack(body)


_MSG_CLASSES: Final[dict[str, type]] = {
    "EventBatch": EventBatch,
    "LoadReport": LoadReport,
    "Heartbeat": Heartbeat,
    "SnapshotRequest": SnapshotRequest,
    "Snapshot": Snapshot,
}

_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "instance": (str,),
    "agent_epoch": (int,),
    "engine_seq": (int,),
    "seq": (int,),
    "ts": (int, float),
    "interval": (int, float),
    "engine_url": (str,),
    "model": (str,),
    "snapshot_endpoint": (str,),
    "engine_healthy": (bool,),
}


def decode_message(payload: bytes) -> WireMessage:
    """Decode a cluster-protocol payload.

    Raises:
        WireError: ``bad_msgpack``, ``bad_message`` (not a tagged map, unknown type, missing or mistyped
        field), ``bad_event`` or ``unknown_event``.
    """
    obj = _unpack(payload)
    if not isinstance(obj, dict):
        raise WireError("bad_message", "payload is not a map")
    cls = _MSG_CLASSES.get(str(obj.get("type")))
    if cls is None:
        raise WireError("bad_message", f"unknown message type {obj.get('type')!r}"[:80])
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        name = f.name
        if name not in obj:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise WireError("bad_message", f"{cls.__name__} without {name}")
        val: Any = obj[name]
        if name == "events":
            if not isinstance(val, list):
                raise WireError("bad_message", "events is not a list")
            val = tuple(decode_event(e) for e in val)
        elif name in _TUPLE_FIELDS:
            val = _tuple_field(name, val, f"{cls.__name__}.{name}")
        else:
            want = _FIELD_TYPES.get(name, (int,))
            if not isinstance(val, want) or (isinstance(val, bool) and bool not in want):
                raise WireError("bad_message", f"{cls.__name__}.{name} of type {type(val).__name__}")
            if float in want:
                val = float(val)  # type: ignore[arg-type]
        kwargs[name] = val
    msg: WireMessage = cls(**kwargs)
    return msg


# ------------------------------------------------------------------------------------- decision stream
#
# What a router publishes on its own PUB socket for its hot standby, the metrics daemon and `launch tail`:
# multipart ``(topic, seq as 8-byte big-endian, payload)`` like an agent's stream, one sequence number
# across both topics, payloads msgpack maps tagged by ``"type"`` and coded by encode_message /
# decode_message. ``router_epoch`` changes whenever the router process restarts (its seq restarts at 0).
# Delivery is at most once (PUB/SUB): a follower detects a lost frame by the seq and counts it.

TOPIC_DECISIONS: Final = b"decisions"
TOPIC_ROUTER_HEARTBEAT: Final = b"router-hb"
DECISION_TOPICS: Final = (TOPIC_DECISIONS, TOPIC_ROUTER_HEARTBEAT)


@dataclass(frozen=True, slots=True)
class RequestRouted:
    """A router sent a request to ``instance`` (topic ``decisions``).

    ``ticket`` is the router's pending-dispatch ticket, ``request_id`` the client's ``X-Request-Id`` or
    one the router made up. ``block_hashes`` are the request's full-page hashes, which the router inserted
    as speculative entries of ``instance``; ``new_tokens`` its uncached prompt tokens there (queued
    prefill added to the instance until a load report covers it); ``score`` the policy's value for
    ``instance`` (LMetric's product; 0 for round robin). ``ts``: router wall clock, Unix seconds.
    """

    router_epoch: int
    request_id: str
    ticket: int
    instance: str
    policy: str
    ts: float
    prompt_tokens: int
    new_tokens: int
    score: float
    block_hashes: tuple[int, ...] = ()
    failure_cases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """The request of ``ticket`` on ``instance`` ended (topic ``decisions``), any outcome.

    ``status`` is the router's outcome label (``"200"``, ``"502"``, ``"stream_error"``,
    ``"client_closed"``, ``"connect_failed"``...). ``ts``: router wall clock, Unix seconds.
    """

    router_epoch: int
    request_id: str
    ticket: int
    instance: str
    status: str
    ts: float


@dataclass(frozen=True, slots=True)
class RouterHeartbeat:
    """Liveness and role of a router (topic ``router-hb``), sent every ``interval`` seconds.

    ``role`` is ``"primary"`` (serving ``http``) or ``"standby"`` (following a primary, ready to take
    ``http`` over). The counts are the router's at ``ts`` (wall clock, Unix seconds): distinct blocks in
    its index, speculative entries, requests in flight, routable instances. ``open_tickets`` are the
    tickets of its requests in flight: a follower that lost a ``RequestFinished`` (a seq gap) forgets
    every mirrored ticket not listed, since the frames of one stream arrive in publishing order.
    """

    router_epoch: int
    role: str
    ts: float
    http: str
    pid: int
    index_blocks: int = 0
    speculative_blocks: int = 0
    inflight: int = 0
    instances_routable: int = 0
    interval: float = 0.1
    open_tickets: tuple[int, ...] = ()


DecisionMessage: TypeAlias = RequestRouted | RequestFinished | RouterHeartbeat
WireMessage: TypeAlias = ClusterMessage | DecisionMessage
"""Everything :func:`encode_message` and :func:`decode_message` handle."""

_MSG_CLASSES.update(
    {"RequestRouted": RequestRouted, "RequestFinished": RequestFinished, "RouterHeartbeat": RouterHeartbeat}
)
_FIELD_TYPES.update(
    {
        "request_id": (str,),
        "policy": (str,),
        "score": (int, float),
        "status": (str,),
        "role": (str,),
        "http": (str,),
    }
)


def _int_tuple(val: Any, what: str) -> tuple[int, ...]:
    if not isinstance(val, list | tuple) or (val and set(map(type, val)) != {int}):
        raise WireError("bad_message", f"{what} is not a list of integers")
    return tuple(val)


def _str_tuple(val: Any, what: str) -> tuple[str, ...]:
    if not isinstance(val, list | tuple) or not all(isinstance(v, str) for v in val):
        raise WireError("bad_message", f"{what} is not a list of strings")
    return tuple(val)


_TUPLE_FIELDS: Final = frozenset({"block_hashes", "failure_cases", "open_tickets"})
"""Message fields that are lists on the wire; :func:`decode_message` checks them and makes tuples."""


def _tuple_field(name: str, val: Any, what: str) -> tuple[Any, ...]:
    return _str_tuple(val, what) if name == "failure_cases" else _int_tuple(val, what)
