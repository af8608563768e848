"""The simulator's output is pinned: the routing model may be restructured, its decisions may not change.

``tests/golden/simulate_mooncake_300s_8x.json`` was written by ``launch simulate`` before the router, the
standby and the simulator were moved onto one routing model (issue 11), with::

    python -m launch simulate --trace launch/traces/mooncake/conversation_trace.jsonl --instances 8 \
        --duration 300 --seed 0 --summary-json OUT --no-progress \
        --policies bailian,dynamo,linear,lmetric,lmetric_plain,power_of_two,random,round_robin,sglang_cache_aware,vllm_v1

Regenerated deliberately once since, for ``lmetric`` only, when its ``stalls_fresh`` mitigation changed
its decisions (issue 16): the same command's ``runs.lmetric`` replaced that entry (``json.dumps(...,
indent=1, sort_keys=True)``); every other policy's entry was checked identical and left as it was.

This test runs the same command and compares every field but the wall-clock ones (``sim_wall_s`` and
the trace's path). A change in any routing decision moves some latency, hit ratio or decision count.
Integers and strings must be equal; floats equal to 12 significant digits, because the same run's means
can differ in their last bit between Python versions (3.12's built-in ``sum`` of floats is compensated,
3.10 and 3.11's is not: ``mean_batch_size_time_weighted`` came out 1 ulp apart).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests/golden/simulate_mooncake_300s_8x.json"
TRACE = ROOT / "launch/traces/mooncake/conversation_trace.jsonl"
POLICIES = (
    "bailian,dynamo,linear,lmetric,lmetric_plain,power_of_two,random,round_robin,sglang_cache_aware,vllm_v1"
)


def _rounded(x: Any) -> Any:
    """``x`` with every float rounded to 12 significant digits (containers walked)."""
    if isinstance(x, float):
        return float(f"{x:.12g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    for run in d["runs"].values():
        run.pop("sim_wall_s", None)
    d["config"].pop("trace", None)
    return d


@pytest.mark.timeout(300)
def test_simulate_matches_golden(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "simulate",
        "--trace",
        str(TRACE),
        "--instances",
        "8",
        "--duration",
        "300",
        "--seed",
        "0",
        "--policies",
        POLICIES,
        "--summary-json",
        str(out),
        "--no-progress",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=280)
    got = _rounded(_strip(json.loads(out.read_text())))
    want = _rounded(json.loads(GOLDEN.read_text()))
    for policy in want["runs"]:
        assert got["runs"][policy] == want["runs"][policy], policy
    assert got == want
