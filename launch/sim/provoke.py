"""Synthetic traces that provoke LMetric's failure cases, and the simulation that shows them.

``python -m launch.sim.provoke CASE [--out TRACE.jsonl]`` writes the case's trace (Mooncake format) and
simulates it with ``lmetric`` (mitigated), ``lmetric_plain`` (the authors' formula), ``vllm_v1`` and
``linear`` at a few weights, printing one line per policy: TTFT and TPOT (mean, p99), hit ratio, the
failure cases LMetric detected. Cases (``docs/lmetric.md`` derives each):

* ``at_max_running``: one hot prompt, cached on one instance, then a flood of it with long outputs. Its
  product stays 0 there (nothing queued, all cached), so plain LMetric keeps sending it there past the
  instance's ``max_running_requests``, where requests wait for running ones to finish.
* ``zero_product``: the same hot prompt, long (16k tokens: a heavy KV read per decode step), at a rate
  that stays below the cap, over background traffic of distinct prompts. The product is 0 on the
  instance holding it whatever its batch: every hot request joins that one batch.
* ``batch_over_prefill``: readers of one long document, each with a long question and a long answer:
  the instance holding the document accumulates their decodes, until the product sends the next reader
  to an instance with a smaller batch that must prefill the whole document again, which under
  prefill-first scheduling (SGLang's default) is slower for that reader.

Deterministic: the same case and flags give the same trace and numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.sim.cluster import SimConfig, simulate
from launch.sim.run import result_summary
from launch.trace import TRACE_BLOCK_TOKENS, load_trace, window
from router.model.policies import add_param_arguments, make_policy, params_for, params_from_namespace

CASES = ("at_max_running", "zero_product", "batch_over_prefill")


def _line(ts: float, blocks: Sequence[int], out: int, tokens: int | None = None) -> dict[str, object]:
    return {
        "timestamp": round(1000 * ts),
        "input_length": tokens if tokens is not None else TRACE_BLOCK_TOKENS * len(blocks),
        "output_length": out,
        "hash_ids": list(blocks),
    }


def make_trace(case: str) -> list[dict[str, object]]:
    """The requests of ``case`` as Mooncake lines (block ids are disjoint per purpose)."""
    hot = list(range(1, 9))  # 4096 tokens, a whole number of pages: fully cacheable
    lines: list[dict[str, object]] = []
    if case == "at_max_running":
        lines.append(_line(0.0, hot, 8))  # warms one instance
        lines += [_line(3.0 + k / 24, hot, 400) for k in range(480)]  # 24 req/s for 20 s
    elif case == "zero_product":
        long_hot = list(range(1, 33))  # 16384 tokens
        lines.append(_line(0.0, long_hot, 8))
        lines += [_line(6.0 + k / 1.5, long_hot, 600) for k in range(90)]  # 1.5 req/s for 60 s
        lines += [_line(6.0 + k / 1.2, [100_000 + 8 * k + j for j in range(4)], 300) for k in range(72)]
    elif case == "batch_over_prefill":
        doc = list(range(1, 17))  # an 8k-token shared document
        lines.append(_line(0.0, [*doc, 1000], 8))  # its first reader warms one instance
        for k in range(60):  # readers asking 4k-token questions about it, long answers
            lines.append(_line(3.0 + k, doc + [2000 + 8 * k + j for j in range(8)], 1500))
    else:
        raise ValueError(f"unknown case {case!r}; known: {', '.join(CASES)}")
    lines.sort(key=lambda d: float(d["timestamp"]))  # type: ignore[arg-type]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sim.provoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("case", choices=CASES)
    p.add_argument("--out", type=Path, default=None, help="write the trace here (default: a temp file)")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--profile", default="h20-qwen2.5-7b")
    p.add_argument("--max-running-requests", type=int, default=32)
    p.add_argument("--policies", default="lmetric,lmetric_plain,vllm_v1,linear:0,linear:1000,linear:10000")
    p.add_argument("--json", type=Path, default=None, help="write the summaries here")
    add_param_arguments(p)  # --POLICY-PARAM; "linear:B" in --policies sets linear's b on top
    a = p.parse_args(argv)
    try:
        given = params_from_namespace(a)
    except ValueError as exc:
        p.error(str(exc))
    out = a.out
    if out is None:
        import tempfile

        out = Path(tempfile.mkdtemp()) / f"{a.case}.jsonl"
    out.write_text("".join(json.dumps(d) + "\n" for d in make_trace(a.case)))
    plan = window(load_trace(out), 1.0, None)
    # The scenarios place each arrival at an exact time; ingest time would reorder them.
    cfg = SimConfig(
        instances=a.instances,
        profile=a.profile,
        max_running_requests=a.max_running_requests,
        ingest_overhead=0.0,
        ingest_per_token=0.0,
    )
    print(f"== {a.case}: {len(plan)} requests ({out}), {cfg.instances} x {cfg.profile}, "
          f"max running {cfg.max_running_requests}")  # fmt: skip
    print(f"{'policy':<16}{'TTFT mean':>10}{'p99':>8}{'TPOT mean':>11}{'p99':>8}{'hit':>7}  failure cases")
    report = {}
    for spec in a.policies.split(","):
        name, _, b = spec.partition(":")
        params = params_for(given, name) | ({"b": float(b)} if b else {})
        pol = make_policy(name, seed=0, params=params)
        s = result_summary(simulate(plan, pol, cfg))
        label = f"linear b={b}" if b else name
        report[label] = s
        t, o = s["ttft"], s["tpot"]
        print(f"{label:<16}{t['mean']:>10.3f}{t['p99']:>8.2f}{1e3 * o['mean']:>9.1f}ms{1e3 * o['p99']:>6.0f}ms"
              f"{100 * s['hit_ratio']:>6.1f}%  {s['failure_cases'] or ''}")  # fmt: skip
    if a.json is not None:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
