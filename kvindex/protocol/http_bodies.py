"""The serving API's request bodies as ``msgspec`` types: field types with their bounds and one ``Struct``
per body (``/generate``, ``/v1/completions``, ``/v1/chat/completions``).

Decoding and the checks a type cannot express live in :mod:`kvindex.protocol.http`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

MAX_TOKEN_ID = 2**32 - 1  # block hashing packs ids as uint32
MAX_SHORT = 256
"""Longest name-like string accepted (model, rid, user, tool and message names), in characters."""
MAX_STOP = 32
"""Most stop strings (or stop token ids) in one request."""
MAX_TOKENS = 2**31 - 1
"""Largest token count accepted (``max_tokens`` and friends): engines keep it in an int32."""

Short = Annotated[str, Meta(max_length=MAX_SHORT)]
TokenCount = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
TokenId = Annotated[int, Meta(ge=0, le=MAX_TOKEN_ID)]
Temperature = Annotated[float, Meta(ge=0.0)]
OpenAITemperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=2.0)]
TopK = Annotated[int, Meta(ge=-1, le=MAX_TOKENS)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Stop = str | Annotated[list[str], Meta(max_length=MAX_STOP)]
StopIds = Annotated[list[TokenId], Meta(max_length=MAX_STOP)]
LogitBias = Annotated[dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=4096)]
Role = Literal["system", "user", "assistant", "tool", "developer", "function"]
PartType = Literal["text", "image_url", "input_audio", "audio_url", "video_url", "file"]


class Body(Struct, omit_defaults=True):
    """Base of the body types: unknown fields are allowed (forwarded untouched)."""


class SamplingParams(Body):
    """SGLang's ``sampling_params`` (``srt/sampling/sampling_params.py`` ``SamplingParams.verify``)."""

    max_new_tokens: TokenCount | None = None
    min_new_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: Stop | None = None
    stop_token_ids: StopIds | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    n: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: LogitBias | None = None
    sampling_seed: Seed | None = None


class StreamOptions(Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class GenerateBody(Body):
    text: str | None = None
    input_ids: list[TokenId] | None = None
    sampling_params: SamplingParams | None = None
    stream: bool | None = None
    rid: Short | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: Annotated[int, Meta(ge=0, le=MAX_TOKENS)] | None = None
    return_text_in_logprobs: bool | None = None
    lora_path: str | None = None
    model: Short | None = None


class OpenAIBody(Body):
    """Fields the OpenAI completions and chat bodies share, with SGLang's extensions."""

    model: Short | None = None
    max_tokens: TokenCount | None = None
    temperature: OpenAITemperature | None = None
    top_p: TopP | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    seed: Seed | None = None
    user: Short | None = None
    # SGLang's extensions (openai/protocol.py CompletionRequest / ChatCompletionRequest)
    ignore_eos: bool | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    min_tokens: TokenCount | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: StopIds | None = None
    skip_special_tokens: bool | None = None
    regex: str | None = None
    ebnf: str | None = None
    rid: Short | None = None


class CompletionBody(OpenAIBody):
    prompt: Any = None  # str | list[int] | [str] | [list[int]]: checked by _completion_prompt
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None


class ContentPart(Body):
    type: PartType
    text: str | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]


class ChatMessage(Body):
    role: Role
    content: str | list[ContentPart] | None = None
    name: Short | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Short | None = None
    reasoning_content: str | None = None


class ChatBody(OpenAIBody):
    messages: list[ChatMessage] | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Meta(max_length=1024)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
