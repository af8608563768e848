"""The codec of the cluster and decision protocols: msgpack maps tagged by ``"type"``. Pure.

:func:`encode_message` / :func:`decode_message` handle every :data:`WireMessage`; KV events inside an
:class:`~kvindex.protocol.cluster.EventBatch` or :class:`~kvindex.protocol.cluster.Snapshot` travel as
SGLang tagged maps. Decoding checks every field's type and raises
:class:`~kvindex.protocol.frames.WireError` (``bad_msgpack``, ``bad_message``, ``bad_event``,
``unknown_event``) and nothing else on bytes from the network.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Final, TypeAlias

from kvindex.protocol.cluster import (
    ClusterMessage,
    EventBatch,
    Heartbeat,
    LoadReport,
    Snapshot,
    SnapshotRequest,
)
from kvindex.protocol.decisions import DecisionMessage, RequestFinished, RequestRouted, RouterHeartbeat
from kvindex.protocol.frames import WireError, _pack, _unpack
from kvindex.protocol.sglang import decode_event, event_to_map

WireMessage: TypeAlias = ClusterMessage | DecisionMessage
"""Everything :func:`encode_message` and :func:`decode_message` handle."""


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
    "RequestRouted": RequestRouted,
    "RequestFinished": RequestFinished,
    "RouterHeartbeat": RouterHeartbeat,
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
    "request_id": (str,),
    "policy": (str,),
    "score": (int, float),
    "status": (str,),
    "role": (str,),
    "http": (str,),
    "admin": (str,),
    "decisions": (str,),
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
