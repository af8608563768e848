"""Value types of the emulated engine's core: its config, requests, scheduled steps and outputs. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["length", "stop"]
StepKind = Literal["prefill", "decode", "mixed"]


class RequestRejected(ValueError):
    """A request the engine cannot serve (too long, empty, duplicate rid). The HTTP layer answers 400."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Scheduler settings (SGLang server-arg names). Tokens unless said otherwise.

    ``max_total_tokens`` overrides the profile's KV capacity; ``chunked_prefill_size <= 0`` disables
    chunking.
    """

    page_size: int = 16
    max_total_tokens: int | None = None
    max_running_requests: int = 128
    chunked_prefill_size: int = 8192
    mixed_chunk: bool = False
    context_length: int = 131072
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay_steps: int = 600


@dataclass(frozen=True, slots=True)
class Request:
    """A generation request. ``arrival`` is the owner's clock (seconds) when it arrived."""

    rid: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool = False
    arrival: float = 0.0


@dataclass(frozen=True, slots=True)
class StepEntry:
    """One sequence in a step: ``new_tokens`` computed on top of ``context_tokens`` already in KV."""

    rid: str
    uid: int
    new_tokens: int
    context_tokens: int
    prefill: bool


@dataclass(frozen=True, slots=True)
class Step:
    """A scheduled forward batch; ``duration`` in seconds (modelled, unscaled), ``start`` the clock."""

    kind: StepKind
    entries: tuple[StepEntry, ...]
    start: float
    duration: float

    @property
    def prefill_tokens(self) -> int:
        """Uncached prompt tokens computed by this step."""
        return sum(e.new_tokens for e in self.entries if e.prefill)


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """What a step produced for one request: ``token_ids`` (0 or 1 new ids), counts so far, finish."""

    rid: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    first_token: bool
    finish_reason: FinishReason | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Aborted:
    """A request ended before it finished: SGLang's ``FINISH_ABORT`` (``srt/managers/schedule_batch.py``).

    ``status_code`` None is a graceful abort (``/abort_request``): the client gets a normal response whose
    finish reason is ``abort``. A status (503 when the server shuts down) makes a non-streamed response
    that error instead, as ``TokenizerManager._handle_abort_finish_reason`` does.
    """

    message: str = "Aborted"
    status_code: int | None = None
