"""Request bodies of the serving API, decoded and validated once, shared by the router and the emulated engine.

Endpoints and fields (SGLang 0.5.23 HTTP API, ``srt/entrypoints/openai/protocol.py`` and
``srt/sampling/sampling_params.py``; OpenAI API reference for the ``/v1`` shapes):

* ``POST /generate`` (SGLang native): ``text`` (str) or ``input_ids`` (list[int]); ``sampling_params``
  with ``max_new_tokens`` (default 128), ``ignore_eos`` (default false), ``temperature`` ...; ``stream``;
  ``rid``. Only single prompts (no batches).
* ``POST /v1/completions``: ``model``; ``prompt`` as str, list[int] (token ids), or a one-element list of
  either; ``max_tokens`` (default 16, as OpenAI); ``stream``; ``stream_options.include_usage``; ``n``
  must be 1; SGLang's extensions (``ignore_eos``, ``top_k``, ``min_p``, ``rid`` ...).
* ``POST /v1/chat/completions``: ``model``; ``messages``; ``max_completion_tokens`` or ``max_tokens``
  (default :data:`DEFAULT_CHAT_MAX_TOKENS`); ``stream``; ``stream_options.include_usage``; ``n`` = 1;
  the same extensions.

Theory of operation. Each body is one ``msgspec`` ``Struct`` type (:mod:`kvindex.protocol.http_bodies`), decoded straight from the request's
bytes: one pass does JSON parsing, type checks and range checks (``Meta`` bounds, taken from SGLang's
``SamplingParams.verify`` where SGLang has one and from the OpenAI reference otherwise), about 3x faster
than ``json.loads`` alone on a 30 k-character chat body and 5x on 7.5 k token ids (docs/robustness.md).
What a type cannot say (a prompt present, content not empty, ``n`` = 1, a message's needs by role) is
checked after decoding, in :func:`_finish_generate` and friends. Unknown fields are allowed (they are
forwarded to the engine untouched: OpenAI adds fields often); known fields of the wrong type or out of
range are a :class:`RequestError` whose ``param`` names the field (``messages[1].role``,
``sampling_params.top_p``). JSON nested deeper than msgspec's limit (about 1000 levels) is a 400 too.

Errors are :class:`RequestError` (HTTP 400 unless said otherwise) and are rendered with
:func:`error_body` in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, which the
official ``openai`` client parses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec

from kvindex.protocol.http_bodies import (
    MAX_TOKEN_ID,
    Body,
    ChatBody,
    ChatMessage,
    CompletionBody,
    GenerateBody,
    OpenAIBody,
    SamplingParams,
    StreamOptions,
)
from kvindex.protocol.tokenizer import Tokenizer, TokenizerError

Endpoint = Literal["generate", "completions", "chat"]

DEFAULT_GENERATE_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default
DEFAULT_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 128  # SGLang runs to the context length; the emulated engine needs a bound


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
    """One validated generation request.

    Exactly one of ``text``, ``input_ids`` or ``messages`` is set (``messages`` as plain mappings with
    ``role`` and ``content``). ``max_new_tokens`` in tokens (>= 0). ``rid`` is the body's request id,
    if it has one. The router forwards the body's bytes, not this object.
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

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's token ids: ``input_ids`` as given, else the tokenized text or rendered chat.

        Raises:
            RequestError: the chat messages cannot be rendered (e.g. image parts).
        """
        if self.input_ids is not None:
            return list(self.input_ids)
        if self.messages is not None:
            try:
                return tokenizer.encode(tokenizer.apply_chat_template(self.messages))
            except TokenizerError as exc:
                raise RequestError(str(exc), param="messages") from exc
        return tokenizer.encode(self.text or "")

    @property
    def prompt_size(self) -> int:
        """The prompt's length in characters or token ids (what tokenizing it costs, roughly)."""
        if self.messages is not None:
            return sum(len(str(m.get("content"))) for m in self.messages)
        return len(self.text or self.input_ids or ())


_B = TypeVar("_B", bound=Body)
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in (GenerateBody, CompletionBody, ChatBody)
}
_AT = re.compile(r" - at `\$(.*)`$")


def _param(path: str) -> str | None:
    """``$.messages[0].role`` (msgspec's path) as ``messages[0].role``; a map's value (msgspec's
    ``[...]``) as the map; the root as None."""
    return path.replace("[...]", "").lstrip(".") or None


def _validation_error(exc: msgspec.ValidationError) -> RequestError:
    text = str(exc)
    m = _AT.search(text)
    param = _param(m.group(1)) if m else None
    message = text[: m.start()] if m else text
    missing = re.match(r"Object missing required field `(\w+)`", message)
    if missing:  # a required field of a nested object: name it
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    return RequestError(f"invalid request: {message}" + (f" (at '{param}')" if param else ""), param=param)


def _decode(raw: bytes, body_type: type[_B]) -> _B:
    try:
        return _DECODERS[body_type].decode(raw)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None


def _convert(body: Any, body_type: type[_B]) -> _B:
    if not isinstance(body, Mapping):
        raise RequestError("request body must be a JSON object")
    try:
        return msgspec.convert(body, body_type)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None


# ------------------------------------------------------------------------- checks types cannot say


def _n_is_one(n: int | None, param: str = "n") -> None:
    if n is not None and n != 1:
        raise RequestError("only n = 1 is supported", param=param)


def _usage(opts: StreamOptions | None) -> bool:
    return bool(opts is not None and opts.include_usage)


def _finish_generate(b: GenerateBody) -> GenerationRequest:
    if b.text is not None and b.input_ids is not None:
        raise RequestError("give either 'text' or 'input_ids', not both", param="text")
    if b.input_ids is not None:
        if not b.input_ids:
            raise RequestError("'input_ids' must be a non-empty list of integers", param="input_ids")
    elif not b.text:
        raise RequestError("'text' must be a non-empty string (batches are not supported)", param="text")
    sp = b.sampling_params or SamplingParams()
    _check_sampling(sp, "sampling_params.")
    _n_is_one(sp.n, "sampling_params.n")
    return GenerationRequest(
        endpoint="generate",
        model=b.model,
        text=b.text if b.input_ids is None else None,
        input_ids=tuple(b.input_ids) if b.input_ids is not None else None,
        max_new_tokens=sp.max_new_tokens
        if sp.max_new_tokens is not None
        else DEFAULT_GENERATE_MAX_NEW_TOKENS,
        stream=bool(b.stream),
        ignore_eos=bool(sp.ignore_eos),
        rid=b.rid,
    )


def _check_sampling(sp: SamplingParams | OpenAIBody, prefix: str) -> None:
    """Cross-field rules of ``SamplingParams.verify``: top_k is -1 or >= 1; min <= max new tokens."""
    if sp.top_k == 0:
        raise RequestError("'top_k' must be -1 (off) or at least 1", param=prefix + "top_k")
    lo = sp.min_new_tokens if isinstance(sp, SamplingParams) else sp.min_tokens
    hi = sp.max_new_tokens if isinstance(sp, SamplingParams) else sp.max_tokens
    if lo is not None and hi is not None and lo > hi:
        name = "min_new_tokens" if isinstance(sp, SamplingParams) else "min_tokens"
        raise RequestError(f"'{name}' ({lo}) must not exceed the maximum ({hi})", param=prefix + name)


def _completion_prompt(prompt: Any) -> tuple[str | None, tuple[int, ...] | None]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt, None
    if isinstance(prompt, list) and prompt:
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                break
            if not 0 <= t <= MAX_TOKEN_ID:
                raise RequestError(f"token id {t} outside [0, 2^32)", param=f"prompt[{i}]")
        else:
            return None, tuple(prompt)
    raise RequestError(
        "'prompt' must be a non-empty string or a list of token ids (batches are not supported)",
        param="prompt",
    )


def _finish_completion(b: CompletionBody) -> GenerationRequest:
    _n_is_one(b.n)
    _check_sampling(b, "")
    text, ids = _completion_prompt(b.prompt)
    return GenerationRequest(
        endpoint="completions",
        model=b.model,
        text=text,
        input_ids=ids,
        max_new_tokens=b.max_tokens if b.max_tokens is not None else DEFAULT_COMPLETIONS_MAX_TOKENS,
        stream=bool(b.stream),
        ignore_eos=bool(b.ignore_eos),
        include_usage=_usage(b.stream_options),
        rid=b.rid,
    )


_NEEDS_CONTENT = frozenset(("system", "user", "developer", "tool", "function"))


def _message(i: int, m: ChatMessage) -> dict[str, Any]:
    where = f"messages[{i}]"
    content = m.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type == "text" and part.text is None:
                raise RequestError("a text content part needs 'text'", param=f"{where}.content[{j}].text")
        if not content:
            content = None
    if (content is None or content == "") and (m.role in _NEEDS_CONTENT or not m.tool_calls):
        raise RequestError(f"a '{m.role}' message needs non-empty 'content'", param=f"{where}.content")
    if m.role == "tool" and m.tool_call_id is None:
        raise RequestError("a 'tool' message needs 'tool_call_id'", param=f"{where}.tool_call_id")
    out: dict[str, Any] = {"role": m.role}
    if isinstance(content, list):
        out["content"] = [msgspec.to_builtins(p) for p in content]
    else:
        out["content"] = content
    return out


def _finish_chat(b: ChatBody) -> GenerationRequest:
    _n_is_one(b.n)
    _check_sampling(b, "")
    if not b.messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    if b.max_completion_tokens is not None:
        max_new = b.max_completion_tokens
    else:
        max_new = b.max_tokens if b.max_tokens is not None else DEFAULT_CHAT_MAX_TOKENS
    return GenerationRequest(
        endpoint="chat",
        model=b.model,
        messages=tuple(_message(i, m) for i, m in enumerate(b.messages)),
        max_new_tokens=max_new,
        stream=bool(b.stream),
        ignore_eos=bool(b.ignore_eos),
        include_usage=_usage(b.stream_options),
        rid=b.rid,
    )


# ------------------------------------------------------------------------------------ entry points

_KINDS: dict[Endpoint, tuple[type[Any], Any]] = {
    "generate": (GenerateBody, _finish_generate),
    "completions": (CompletionBody, _finish_completion),
    "chat": (ChatBody, _finish_chat),
}


def decode_request(endpoint: Endpoint, raw: bytes) -> GenerationRequest:
    """Decode and validate the raw JSON body of a request to ``endpoint``. Pure; no side effects.

    Raises:
        RequestError: not JSON, not an object, nested too deeply, or a field of the wrong type, out of
            range or missing (``param`` names it). Status 400.
    """
    body_type, finish = _KINDS[endpoint]
    return finish(_decode(raw, body_type))  # type: ignore[no-any-return]


def parse_generate(body: Any) -> GenerationRequest:
    """Validate an already-parsed SGLang ``/generate`` body. Raises :class:`RequestError` (400)."""
    return _finish_generate(_convert(body, GenerateBody))


def parse_completion(body: Any) -> GenerationRequest:
    """Validate an already-parsed OpenAI ``/v1/completions`` body. Raises :class:`RequestError` (400)."""
    return _finish_completion(_convert(body, CompletionBody))


def parse_chat(body: Any) -> GenerationRequest:
    """Validate an already-parsed OpenAI ``/v1/chat/completions`` body. Raises :class:`RequestError`."""
    return _finish_chat(_convert(body, ChatBody))


PARSERS = {"generate": parse_generate, "completions": parse_completion, "chat": parse_chat}
PATHS: dict[str, Endpoint] = {
    "/generate": "generate",
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
}
