"""Trace loading, token synthesis and summaries (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvindex.protocol.ready import parse_ready
from launch.summary import RequestRecord, summarize
from launch.trace import TraceError, load_trace, prompt_tokens, window

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"


def _mooncake(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_equal_hash_ids_give_equal_prefixes(tmp_path: Path) -> None:
    p = _mooncake(
        tmp_path,
        [
            {"timestamp": 0, "input_length": 1100, "output_length": 3, "hash_ids": [7, 8, 9]},
            {"timestamp": 5, "input_length": 700, "output_length": 3, "hash_ids": [7, 10]},
        ],
    )
    a, b = load_trace(p)
    ta, tb = prompt_tokens(a), prompt_tokens(b)
    assert len(ta) == 1100 and len(tb) == 700
    assert ta[:512] == tb[:512] and ta[512:700] != tb[512:700]
    assert prompt_tokens(a) == ta  # deterministic
    assert all(0 <= t < 32000 for t in ta)


def test_window_scales_and_cuts(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 1000 * i, "input_length": 10, "output_length": 1, "hash_ids": [i]} for i in range(10)
    ]
    reqs = load_trace(_mooncake(tmp_path, rows))
    w = window(reqs, 2.0, 2.0)
    assert [t for t, _ in w] == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(ValueError):
        window(reqs, 0, None)


def test_malformed_trace_line_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{"timestamp": "x"}\n'
    )
    with pytest.raises(TraceError, match=":2:"):
        load_trace(p)
    with pytest.raises(TraceError):
        load_trace(tmp_path / "missing.jsonl")


def test_azure_prompts_are_distinct(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,600,4\n2023-11-16 18:15:47.1805900,600,4\n"
    )
    a, b = load_trace(p)
    assert b.arrival == pytest.approx(0.5)
    assert prompt_tokens(a)[:512] != prompt_tokens(b)[:512]


@pytest.mark.skipif(not (SHARED / "mooncake").is_dir(), reason="shared traces not present")
def test_real_traces_load() -> None:
    m = load_trace(SHARED / "mooncake" / "conversation_trace.jsonl")
    assert len(m) == 12031
    az = load_trace(SHARED / "azure2023" / "AzureLLMInferenceTrace_conv.csv")
    assert len(az) == 19366


def test_summary_shape_and_failures() -> None:
    recs = [
        RequestRecord(
            start_time=0.0,
            ttft=0.1,
            tpot=0.01,
            e2e=1.0,
            prompt_tokens=100,
            cached_tokens=50,
            output_tokens=10,
        ),
        RequestRecord(
            start_time=1.0, ttft=0.3, tpot=0.03, e2e=2.0, prompt_tokens=100, cached_tokens=0, output_tokens=10
        ),
        RequestRecord(start_time=1.0, status="HTTP 503: no instance"),
    ]
    s = summarize(recs)
    assert s["requests"] == 3 and s["failed"] == 1
    assert s["hit_ratio"] == pytest.approx(0.25)
    assert s["throughput_rps"] == pytest.approx(2 / 3.0)
    assert s["ttft"]["mean"] == pytest.approx(0.2)
    assert summarize([])["ttft"]["p99"] is None


def test_ready_line_round_trip() -> None:
    r = parse_ready('READY {"role": "agent", "instance": "0", "pid": 5, "endpoints": {"pub": "tcp://x:1"}}')
    assert r is not None and r.role == "agent" and r.endpoints == {"pub": "tcp://x:1"}
    assert parse_ready("READY {broken") is None and parse_ready("hello") is None
