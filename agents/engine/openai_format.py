"""Response bodies of the emulated engine, shaped as SGLang 0.5.23 and the OpenAI API return them. Pure.

* ``/generate``: ``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
  "completion_tokens", "cached_tokens", "e2e_latency"}}``; ``finish_reason`` is ``{"type": "length",
  "length": N}``, ``{"type": "stop", "matched": <eos id or null>}`` or ``{"type": "abort", "message",
  "status_code", "err_type"}`` (SGLang's ``FINISH_LENGTH`` / ``FINISH_MATCHED_TOKEN`` / ``FINISH_ABORT``
  ``to_json``, ``srt/managers/schedule_batch.py``) and null in stream chunks before the last. Stream chunks carry the cumulative text and ids so far.
* ``/v1/completions``: ``text_completion`` with ``choices[0].text``; stream chunks carry text deltas.
* ``/v1/chat/completions``: ``chat.completion`` with ``choices[0].message``; stream chunks
  (``chat.completion.chunk``) carry ``delta`` = ``{"role": "assistant", "content": ""}`` first, then
  ``{"content": ...}``, then ``{}`` with the finish reason.
* OpenAI ``usage``: ``{"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details":
  {"cached_tokens"}}``; in a stream, one last chunk with ``choices: []`` when
  ``stream_options.include_usage``.

Server-sent events are ``data: <json>\\n\\n`` and end with ``data: [DONE]\\n\\n``. The response ``id`` is
the request id (as SGLang does), so logs of router and engine correlate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from kvindex.protocol.http import Endpoint

Finish = Literal["length", "stop", "abort"]
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event ``data: <compact json>\\n\\n``."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Progress:
    """What one request has produced so far (mutated by the HTTP handler as tokens arrive)."""

    rid: str
    endpoint: Endpoint
    model: str
    created: int
    include_usage: bool = False
    eos_token_id: int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: Finish | None = None
    abort_message: str = ""
    abort_status: int | None = None  # None: a graceful abort (a normal response with finish reason abort)
    e2e_latency: float = 0.0
    streamed_chars: int = 0  # characters of ``text`` already sent as deltas
    role_sent: bool = False

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


def _generate_finish(p: Progress) -> dict[str, Any] | None:
    if p.finish == "length":
        return {"type": "length", "length": p.completion_tokens}
    if p.finish == "stop":
        return {"type": "stop", "matched": p.eos_token_id}
    if p.finish == "abort":
        return {"type": "abort", "message": p.abort_message, "status_code": p.abort_status, "err_type": None}
    return None


def usage(p: Progress) -> dict[str, Any]:
    """OpenAI usage object; ``cached_tokens`` are prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": p.completion_tokens,
        "total_tokens": p.prompt_tokens + p.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": p.cached_tokens},
    }


def generate_body(p: Progress, final: bool = True) -> dict[str, Any]:
    """SGLang ``/generate`` body (also each stream chunk; ``finish_reason`` null unless ``final``)."""
    return {
        "text": p.text,
        "output_ids": list(p.output_ids),
        "meta_info": {
            "id": p.rid,
            "finish_reason": _generate_finish(p) if final else None,
            "prompt_tokens": p.prompt_tokens,
            "completion_tokens": p.completion_tokens,
            "cached_tokens": p.cached_tokens,
            "e2e_latency": p.e2e_latency,
        },
    }


def _head(p: Progress, obj: str) -> dict[str, Any]:
    return {"id": p.rid, "object": obj, "created": p.created, "model": p.model}


def final_body(p: Progress) -> dict[str, Any]:
    """The non-streamed response for ``p.endpoint`` once the request finished."""
    if p.endpoint == "generate":
        return generate_body(p)
    if p.endpoint == "completions":
        choice: dict[str, Any] = {"index": 0, "text": p.text, "logprobs": None, "finish_reason": p.finish}
        return {**_head(p, "text_completion"), "choices": [choice], "usage": usage(p)}
    message = {"role": "assistant", "content": p.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": p.finish}
    return {**_head(p, "chat.completion"), "choices": [choice], "usage": usage(p)}


def stream_chunks(p: Progress) -> list[bytes]:
    """SSE events to send now for ``p``: its text since the last call and, once finished, the finish
    chunk, the usage chunk if asked for, and ``[DONE]``. Mutates ``p.streamed_chars``/``role_sent``."""
    done = p.finish is not None
    delta = p.text[p.streamed_chars :]
    p.streamed_chars = len(p.text)
    out: list[bytes] = []
    if p.endpoint == "generate":
        out.append(sse(generate_body(p, final=done)))
    elif p.endpoint == "completions":
        head = _head(p, "text_completion")
        if delta:
            out.append(sse({**head, "choices": [_choice(text=delta)]}))
        if done:
            out.append(sse({**head, "choices": [_choice(text="", finish=p.finish)]}))
    else:
        head = _head(p, "chat.completion.chunk")
        if not p.role_sent:
            p.role_sent = True
            out.append(sse({**head, "choices": [_choice(delta={"role": "assistant", "content": ""})]}))
        if delta:
            out.append(sse({**head, "choices": [_choice(delta={"content": delta})]}))
        if done:
            out.append(sse({**head, "choices": [_choice(delta={}, finish=p.finish)]}))
    if done:
        if p.endpoint != "generate" and p.include_usage:
            kind = "text_completion" if p.endpoint == "completions" else "chat.completion.chunk"
            out.append(sse({**_head(p, kind), "choices": [], "usage": usage(p)}))
        out.append(SSE_DONE)
    return out


def _choice(
    text: str | None = None, delta: dict[str, Any] | None = None, finish: str | None = None
) -> dict[str, Any]:
    c: dict[str, Any] = {"index": 0}
    if delta is not None:
        c["delta"] = delta
    else:
        c["text"] = text
    c["logprobs"] = None
    c["finish_reason"] = finish
    return c
