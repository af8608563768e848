"""launch overhead-bench: the cells it plans, the profile summary, and one tiny run's output shape (no
figure is asserted: the benchmark is the performance check, run by hand)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.bench.loadgen import PromptMaker
from launch.bench.overhead import add_arguments, plan_cells, top_functions

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "cell", "target", "concurrency", "chars", "stream", "requests", "rps", "p50_ms", "p99_ms",
    "router_cpu_ms_per_req", "router_rss_mib", "others_cpu_ms_per_req", "errors",
}  # fmt: skip


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_cells_are_every_combination_filtered_by_pattern() -> None:
    cells = plan_cells(_args())
    assert len(cells) == 4 * 3 * 2 * 2
    assert cells[0].id == "direct/c1/2000/whole"
    kept = plan_cells(_args("--cells", "ours*/c16/30000/*,direct/c1/*/stream"))
    assert {c.id for c in kept} == {
        "ours/c16/30000/whole", "ours/c16/30000/stream", "ours-static/c16/30000/whole",
        "ours-static/c16/30000/stream", "direct/c1/2000/stream", "direct/c1/30000/stream",
    }  # fmt: skip
    with pytest.raises(ValueError):
        plan_cells(_args("--targets", "nginx"))


def test_prompts_share_their_prefix_and_are_valid_json() -> None:
    m = PromptMaker(1000, stream=True)
    a, b = json.loads(m.body()), json.loads(m.body())
    assert len(a["text"]) == len(b["text"]) == 1000
    assert a["text"][:900] == b["text"][:900] and a["text"] != b["text"]
    assert a["stream"] is True and a["sampling_params"]["max_new_tokens"] == 16


def test_top_functions_counts_own_and_total_samples() -> None:
    text = "main (a.py:1);f (b.py:2);g (c.py:3) 3\nmain (a.py:1);f (b.py:2) 1\n"
    out = top_functions(text)
    assert out.startswith("4 samples")
    assert " 75.0  g (c.py)" in out and "100.0  main (a.py)" in out


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs a CPU for the system and one for the load"
)
def test_a_tiny_run_writes_one_row_per_cell(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "overhead-bench", "--targets", "direct,ours-static",
         "--concurrency", "2", "--chars", "300", "--stream", "off", "--cell-seconds", "0.3",
         "--warmup", "0.1", "--json", str(out), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"cores", "sut_cpus", "loadgen_cpus", "loadavg_start"} <= set(data["meta"])
    rows = data["rows"]
    assert [r["cell"] for r in rows] == ["direct/c2/300/whole", "ours-static/c2/300/whole"]
    for r in rows:
        assert set(r) == ROW_KEYS, r
        assert r["requests"] > 0 and not r["errors"], r
    assert rows[0]["router_cpu_ms_per_req"] is None
    assert rows[1]["router_cpu_ms_per_req"] is not None and rows[1]["router_rss_mib"] > 0
    assert "| ours-static/c2/300/whole |" in proc.stdout
