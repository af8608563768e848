"""Request bodies of the serving API, parsed and validated once, shared by the router and the emulated engine.

Endpoints and fields (SGLang 0.5.23 HTTP API; OpenAI API reference for the ``/v1`` shapes):

* ``POST /generate`` (SGLang native): ``text`` (str) or ``input_ids`` (list[int]); ``sampling_params``
  with ``max_new_tokens`` (default 128), ``ignore_eos`` (default false), ``temperature`` ...; ``stream``;
  ``rid``. Only single prompts (no batches).
* ``POST /v1/completions``: ``model``; ``prompt`` as str, list[int] (token ids), or a one-element list of
  either; ``max_tokens`` (default 16, as OpenAI); ``stream``; ``stream_options.include_usage``; ``n``
  must be 1; SGLang's extension ``ignore_eos``.
* ``POST /v1/chat/completions``: ``model``; ``messages``; ``max_completion_tokens`` or ``max_tokens``
  (default :data:`DEFAULT_CHAT_MAX_TOKENS`); ``stream``; ``stream_options.include_usage``; ``n`` = 1;
  ``ignore_eos``.

Errors are :class:`RequestError` (HTTP 400 unless said otherwise) and are rendered with
:func:`error_body` in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, which the
official ``openai`` client parses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kvindex.protocol.tokenizer import Tokenizer, TokenizerError

Endpoint = Literal["generate", "completions", "chat"]

DEFAULT_GENERATE_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default
DEFAULT_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 128  # SGLang runs to the context length; the emulated engine needs a bound
MAX_TOKEN_ID = 2**32 - 1  # block hashing packs ids as uint32


class RequestError(ValueError):
    """A request that cannot be served as sent. ``status`` is the HTTP status to answer with."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type_


def error_body(
    status: int, message: str, param: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    """OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
    if type_ is None:
        type_ = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


@dataclass(frozen=True)
class GenerationRequest:
    """One parsed generation request.

    Exactly one of ``text``, ``input_ids`` or ``messages`` is set. ``max_new_tokens`` in tokens (>= 0).
    ``body`` is the JSON body as received (the router forwards it unchanged).
    """

    endpoint: Endpoint
    model: str | None
    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    max_new_tokens: int = DEFAULT_GENERATE_MAX_NEW_TOKENS
    stream: bool = False
    ignore_eos: bool = False
    include_usage: bool = False
    rid: str | None = None
    body: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's token ids: ``input_ids`` as given, else the tokenized text or rendered chat.

        Raises:
            RequestError: the chat messages are malformed.
        """
        if self.input_ids is not None:
            return list(self.input_ids)
        if self.messages is not None:
            try:
                return tokenizer.encode(tokenizer.apply_chat_template(self.messages))
            except TokenizerError as exc:
                raise RequestError(str(exc), param="messages") from exc
        return tokenizer.encode(self.text or "")


def _obj(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise RequestError("request body must be a JSON object")
    return body


def _bool(body: Mapping[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{key}' must be a boolean", param=key)
    return v


def _max_tokens(body: Mapping[str, Any], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise RequestError(f"'{key}' must be an integer", param=key)
        if v < 0:
            raise RequestError(f"'{key}' must be non-negative, got {v}", param=key)
        return v
    return default


def _ids(v: Any, param: str) -> tuple[int, ...] | None:
    """``v`` as token ids if it is a list of ints, else None. Raises on out-of-range ids."""
    if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return None
    if any(t < 0 or t > MAX_TOKEN_ID for t in v):
        raise RequestError(f"'{param}' holds a token id outside [0, 2^32)", param=param)
    return tuple(v)


def _n_is_one(body: Mapping[str, Any]) -> None:
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise RequestError("only n = 1 is supported", param="n")


def _include_usage(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, Mapping):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return _bool(opts, "include_usage")


def _model(body: Mapping[str, Any]) -> str | None:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise RequestError("'model' must be a string", param="model")
    return m


def parse_generate(body: Any) -> GenerationRequest:
    """Parse a SGLang ``/generate`` body. Raises :class:`RequestError` (400)."""
    b = _obj(body)
    sp = b.get("sampling_params") or {}
    if not isinstance(sp, Mapping):
        raise RequestError("'sampling_params' must be an object", param="sampling_params")
    text, ids = b.get("text"), b.get("input_ids")
    if text is not None and ids is not None:
        raise RequestError("give either 'text' or 'input_ids', not both")
    input_ids: tuple[int, ...] | None = None
    if ids is not None:
        input_ids = _ids(ids, "input_ids")
        if input_ids is None:
            raise RequestError(
                "'input_ids' must be a non-empty list of integers (batches are not supported)",
                param="input_ids",
            )
    elif not isinstance(text, str) or not text:
        raise RequestError("'text' must be a non-empty string (batches are not supported)", param="text")
    rid = b.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("'rid' must be a string", param="rid")
    return GenerationRequest(
        endpoint="generate",
        model=_model(b),
        text=text if input_ids is None else None,
        input_ids=input_ids,
        max_new_tokens=_max_tokens(sp, ("max_new_tokens",), DEFAULT_GENERATE_MAX_NEW_TOKENS),
        stream=_bool(b, "stream"),
        ignore_eos=_bool(sp, "ignore_eos"),
        rid=rid,
        body=b,
    )


def parse_completion(body: Any) -> GenerationRequest:
    """Parse an OpenAI ``/v1/completions`` body. Raises :class:`RequestError` (400)."""
    b = _obj(body)
    _n_is_one(b)
    prompt = b.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    text: str | None = None
    input_ids = _ids(prompt, "prompt")
    if input_ids is None:
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(
                "'prompt' must be a non-empty string or a list of token ids (batches are not supported)",
                param="prompt",
            )
        text = prompt
    return GenerationRequest(
        endpoint="completions",
        model=_model(b),
        text=text,
        input_ids=input_ids,
        max_new_tokens=_max_tokens(b, ("max_tokens",), DEFAULT_COMPLETIONS_MAX_TOKENS),
        stream=_bool(b, "stream"),
        ignore_eos=_bool(b, "ignore_eos"),
        include_usage=_include_usage(b),
        rid=b.get("rid") if isinstance(b.get("rid"), str) else None,
        body=b,
    )


def parse_chat(body: Any) -> GenerationRequest:
    """Parse an OpenAI ``/v1/chat/completions`` body. Raises :class:`RequestError` (400)."""
    b = _obj(body)
    _n_is_one(b)
    msgs = b.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    for m in msgs:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RequestError("each message must be an object with a string 'role'", param="messages")
    return GenerationRequest(
        endpoint="chat",
        model=_model(b),
        messages=tuple(msgs),
        max_new_tokens=_max_tokens(b, ("max_completion_tokens", "max_tokens"), DEFAULT_CHAT_MAX_TOKENS),
        stream=_bool(b, "stream"),
        ignore_eos=_bool(b, "ignore_eos"),
        include_usage=_include_usage(b),
        rid=b.get("rid") if isinstance(b.get("rid"), str) else None,
        body=b,
    )


PARSERS = {"generate": parse_generate, "completions": parse_completion, "chat": parse_chat}
PATHS: dict[str, Endpoint] = {
    "/generate": "generate",
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
}
