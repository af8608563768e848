"""launch.bench.index_bench and its workload on a tiny synthetic Mooncake trace: the JSON it prints, and that the
workload holds exactly what it says (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvindex.index import GlobalIndex
from kvindex.protocol import decode_message
from launch.bench.index_bench import parse_args
from launch.bench.index_load import block_tokens, build_workload, eviction_payloads
from launch.trace import TraceRequest, load_trace, prompt_tokens

REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "ingest_blocks_per_s",
    "match_p50_us",
    "match_p99_us",
    "route_p99_us",
    "bytes_per_block",
    "memory_method",
    "resident_blocks",
    "distinct_hashes",
    "cpu",
    "python",
    "targets_met",
}


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    """40 requests in 8 conversations, all starting with block 0 (Mooncake's shape), some >= 2,048 tokens."""
    lines = []
    next_id = 1
    convs: list[list[int]] = []
    for _ in range(8):
        convs.append([0, next_id, next_id + 1])
        next_id += 2
    for r in range(40):
        ids = convs[r % 8]
        ids.append(next_id)  # each turn extends its conversation by one block
        next_id += 1
        length = 512 * (len(ids) - 1) + 100 + r
        lines.append(
            json.dumps({"timestamp": r * 10, "input_length": length, "output_length": 5, "hash_ids": ids})
        )
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_bench_prints_figures_and_json_last(trace: Path) -> None:
    args = ["--trace", str(trace), "--blocks", "3000", "--instances", "8", "--queries", "60"]
    args += ["--prompt-tokens", "2048"]
    out = subprocess.run(
        [sys.executable, "-m", "launch.bench.index_bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) > 5 and any(line.startswith("ingest") for line in lines)
    figures = json.loads(lines[-1])
    assert figures.keys() >= KEYS
    assert figures["resident_blocks"] == 3000 and figures["instances"] == 8
    assert figures["match_hit_fraction"] == 1.0  # the prompts were stored: the walk went all the way
    assert set(figures["targets_met"]) == {"ingest_blocks_per_s", "route_p99_us", "bytes_per_block"}
    only = subprocess.run(
        [sys.executable, "-m", "launch.bench.index_bench", *args, "--json", "--queries", "10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert only.returncode == 0, only.stderr
    assert len(only.stdout.strip().splitlines()) == 1
    assert json.loads(only.stdout).keys() >= KEYS


def test_parse_args_defaults_and_errors() -> None:
    cfg = parse_args([])
    assert (cfg.instances, cfg.blocks, cfg.block_size, cfg.prompt_tokens, cfg.seed) == (
        64,
        10_000_000,
        16,
        8192,
        0,
    )
    assert not cfg.json_only
    for bad in (["--block-size", "7"], ["--blocks", "0"], ["--prompt-tokens", "4", "--block-size", "16"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_workload_tokens_follow_launch_trace_rule() -> None:
    req = TraceRequest(0, 0.0, 512, 1, (12345,))
    assert block_tokens(12345).tolist() == prompt_tokens(req)


def test_workload_holds_exactly_the_target_and_replays_tenants(trace: Path) -> None:
    reqs = load_trace(trace)
    assert build_workload(reqs, 4, 100, 16, 1024).residencies == 100  # the last event is cut to fit
    wl = build_workload(reqs, 4, 5000, 16, 1024)
    assert wl.residencies == 5000 and wl.tenants >= 2
    idx = GlobalIndex(16)
    for name, payload in wl.payloads:
        idx.apply_batch(name, decode_message(payload).events)  # type: ignore[union-attr]
    assert sum(idx.blocks_of(n) for n in wl.names) == 5000
    assert idx.stats.unknown_parent == 0  # every event's parent was stored on its instance before
    assert idx.total_blocks() < 5000  # block 0's pages are on several instances
    for req in wl.query_requests[:5]:
        toks = prompt_tokens(req)
        assert max(idx.match(toks).cached_tokens.values()) == len(toks) // 16 * 16
    evict, n = eviction_payloads(wl, 0.5)
    for name, payload in evict:
        idx.apply_batch(name, decode_message(payload).events)  # type: ignore[union-attr]
    assert sum(idx.blocks_of(name) for name in wl.names) == 5000 - n
    assert idx.stats.unknown_removed == 0
    idx.check_invariants()
