"""Request traces: loading the Mooncake and Azure formats, and turning a trace line into token ids. Pure.

Formats (see ``launch/traces/README.md``; both traces ship in ``launch/traces/``):

* Mooncake JSON lines (kvcache-ai/Mooncake ``FAST25-release/traces``): ``{"timestamp": ms since start,
  "input_length": tokens, "output_length": tokens, "hash_ids": [one id per 512-token block]}``; ids are
  prefix-chained, the last block may be partial.
* Azure LLM inference CSV (Azure/AzurePublicDataset 2023): ``TIMESTAMP,ContextTokens,GeneratedTokens``,
  wall-clock arrival; no prefix information, so every prompt is made distinct.

Token synthesis: block id ``h`` becomes :data:`TRACE_BLOCK_TOKENS` token ids drawn from a PRNG seeded by
``h`` (NumPy PCG64, ``default_rng(h).integers(0, vocab_size, 512)``), the last block cut to the remaining
length. Equal ids give equal token prefixes, so caches see exactly the reuse the trace had.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

TRACE_BLOCK_TOKENS = 512
DEFAULT_VOCAB_SIZE = 32000
TRACES_DIR = Path(__file__).resolve().parent / "traces"
"""The traces shipped with the package (found relative to this file, not the working directory)."""
MOONCAKE_TRACE = TRACES_DIR / "mooncake" / "conversation_trace.jsonl"
"""Kimi chatbot traffic, 1 h, with prefix-chained block ids: the default ``--trace`` of every command."""
AZURE_TRACE = TRACES_DIR / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
"""Azure LLM inference (conversation), 1 h, no prefix information."""
DEFAULT_TRACE = MOONCAKE_TRACE
_AZURE_SEED_BASE = 1 << 40  # synthetic block ids for Azure prompts, disjoint from Mooncake-sized ids


class TraceError(ValueError):
    """A trace file that cannot be read (missing, unknown format, malformed line with its number)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One trace request. ``arrival`` in seconds since the trace start; lengths in tokens."""

    index: int
    arrival: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Load a Mooncake ``.jsonl`` or Azure ``.csv`` trace, sorted by arrival.

    Raises:
        TraceError: the file is missing, of an unknown format, or holds a malformed line.
    """
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file not found: {p}")
    with p.open() as f:
        first = f.readline()
    if first.lstrip().startswith("{"):
        reqs = list(_read_mooncake(p))
    elif first.upper().startswith("TIMESTAMP"):
        reqs = list(_read_azure(p))
    else:
        raise TraceError(f"{p}: neither Mooncake JSON lines nor an Azure CSV with a TIMESTAMP header")
    reqs.sort(key=lambda r: (r.arrival, r.index))
    return reqs


def _read_mooncake(p: Path) -> Iterator[TraceRequest]:
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                ts, inp, out = float(o["timestamp"]) / 1000.0, int(o["input_length"]), int(o["output_length"])
                ids = tuple(int(h) for h in o.get("hash_ids", []))
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{p}:{n}: malformed Mooncake line ({exc})") from exc
            if inp <= 0 or out < 0:
                raise TraceError(f"{p}:{n}: input_length must be > 0 and output_length >= 0")
            if not ids:
                ids = tuple(_AZURE_SEED_BASE + n * 4096 + k for k in range(_n_blocks(inp)))
            yield TraceRequest(n - 1, ts, inp, out, ids)


def _read_azure(p: Path) -> Iterator[TraceRequest]:
    t0: float | None = None
    with p.open(newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            try:
                ts = _parse_ts(row["TIMESTAMP"])
                inp, out = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{p}:{n}: malformed Azure row ({exc})") from exc
            if t0 is None:
                t0 = ts
            # Every prompt distinct: fresh block ids per request.
            ids = tuple(_AZURE_SEED_BASE + n * 4096 + k for k in range(_n_blocks(max(inp, 1))))
            yield TraceRequest(n - 2, ts - t0, max(inp, 1), max(out, 0), ids)


def _parse_ts(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    # "2023-11-16 18:15:46.6805900" — up to 7 fractional digits; Python takes 6.
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(s).timestamp()


def _n_blocks(tokens: int) -> int:
    return -(-tokens // TRACE_BLOCK_TOKENS)


@lru_cache(maxsize=65536)
def _block_tokens(block_id: int, vocab_size: int) -> tuple[int, ...]:
    rng = np.random.default_rng(block_id)
    return tuple(int(t) for t in rng.integers(0, vocab_size, TRACE_BLOCK_TOKENS))


def prompt_tokens(req: TraceRequest, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[int]:
    """The request's ``input_length`` prompt token ids made from its ``hash_ids``.

    Raises:
        TraceError: ``hash_ids`` holds fewer blocks than ``input_length`` needs.
    """
    need = _n_blocks(req.input_length)
    if len(req.hash_ids) < need:
        raise TraceError(f"request {req.index}: {len(req.hash_ids)} hash_ids for {req.input_length} tokens")
    out: list[int] = []
    for h in req.hash_ids[:need]:
        out.extend(_block_tokens(h, vocab_size))
    del out[req.input_length :]
    return out


def ideal_hit_ratio(reqs: Iterable[TraceRequest]) -> float:
    """The prefix hit ratio of an infinite cache over ``reqs`` taken in the given (arrival) order.

    The fraction of prompt tokens (over all of ``reqs``) that continue, from the first token on, a
    prefix some earlier request of ``reqs`` had: request by request, its ``hash_ids`` blocks (512
    tokens, the last one possibly partial) count while each was seen before, a block with no more
    tokens than it had when seen; the first unseen block (or longer partial block) ends the prefix.
    Nothing is ever evicted and nothing before ``reqs`` counts, so for a trace window this is the best
    any cluster of caches could reach. 0.0 for no requests.
    """
    seen: dict[int, int] = {}  # block id -> most tokens it had in one request so far
    hit = total = 0
    for r in reqs:
        ids = r.hash_ids[: _n_blocks(r.input_length)]
        prefix = True
        for k, h in enumerate(ids):
            size = min(TRACE_BLOCK_TOKENS, r.input_length - k * TRACE_BLOCK_TOKENS)
            before = seen.get(h, 0)
            if prefix:
                hit += min(size, before)
                prefix = before >= size
            if size > before:
                seen[h] = size
        total += r.input_length
    return hit / total if total else 0.0


def window(
    reqs: list[TraceRequest], rate_scale: float, duration: float | None
) -> list[tuple[float, TraceRequest]]:
    """``(send offset in seconds, request)`` pairs: arrivals divided by ``rate_scale``, keeping those < duration.

    ``rate_scale`` 2 sends at twice the trace's rate. ``duration`` in seconds of (scaled) send time.

    Raises:
        ValueError: ``rate_scale`` is not positive.
    """
    if rate_scale <= 0:
        raise ValueError("rate_scale must be positive")
    out = [(r.arrival / rate_scale, r) for r in reqs]
    if duration is not None:
        out = [(t, r) for t, r in out if t < duration]
    return out
