"""Per-request records and their summary, shared by ``launch replay`` and the simulator. Pure.

A record is one request's outcome. The summary is the JSON written by ``--summary-json``::

    {"requests", "failed", "hit_ratio", "throughput_rps", "output_tokens_per_s", "duration_s",
     "ttft": {"mean", "p50", "p90", "p99"}, "tpot": {...}, "e2e": {...}}

Times in seconds. ``hit_ratio`` = cached prompt tokens / prompt tokens over successful requests, as the
engines reported them; ``launch replay`` adds ``ideal_hit_ratio``, what an infinite cache would have
hit on the same requests (:func:`launch.trace.ideal_hit_ratio`), and :func:`format_summary` prints it
beside ``hit_ratio`` when present. ``throughput_rps`` = successful requests / (last completion - first start). TPOT
= (e2e - TTFT) / (output tokens - 1), defined only for requests with at least 2 output tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class RequestRecord:
    """One request's outcome (one JSON line of ``--out``). ``status`` is ``"ok"`` or the error text."""

    start_time: float
    status: str = "ok"
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    index: int = -1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def dist(values: Sequence[float]) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99"}`` of ``values`` (all None when empty)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The summary described in the module docstring."""
    ok = [r for r in records if r.status == "ok"]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    if ok:
        t0 = min(r.start_time for r in ok)
        t1 = max(r.start_time + (r.e2e or 0.0) for r in ok)
        span = max(t1 - t0, 1e-9)
    else:
        span = 0.0
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "hit_ratio": cached / prompt if prompt else 0.0,
        "throughput_rps": len(ok) / span if span else 0.0,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / span if span else 0.0,
        "duration_s": span,
        "ttft": dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot": dist([r.tpot for r in ok if r.tpot is not None]),
        "e2e": dist([r.e2e for r in ok if r.e2e is not None]),
    }


def format_summary(s: dict[str, Any], title: str = "") -> str:
    """A small text table of a summary."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [title] if title else []
    hit = f"hit ratio {100 * s['hit_ratio']:.1f}%"
    if s.get("ideal_hit_ratio") is not None:
        hit += f" (ideal {100 * s['ideal_hit_ratio']:.1f}%)"
    lines.append(
        f"requests {s['requests']}  failed {s['failed']}  {hit}  "
        f"throughput {s['throughput_rps']:.2f} req/s  {s['output_tokens_per_s']:.0f} output tok/s"
    )
    lines.append(f"{'(seconds)':<10}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}")
    for k in ("ttft", "tpot", "e2e"):
        d = s[k]
        lines.append(f"{k.upper():<10}{f(d['mean']):>9}{f(d['p50']):>9}{f(d['p90']):>9}{f(d['p99']):>9}")
    return "\n".join(lines)
