"""End to end: ``python -m launch cluster`` with two emulated engines over loopback, real processes.

Requests go through the router with the official ``openai`` client and raw HTTP, streamed and not;
``launch tail`` and ``launch replay`` run against it; SIGINT must leave no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.launched import launched_cluster

ROOT = Path(__file__).resolve().parents[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class RunningCluster:
    def __init__(self, proc: subprocess.Popen[str], cluster_file: Path, log_dir: Path) -> None:
        self.proc = proc
        self.cluster_file = cluster_file
        self.log_dir = log_dir
        self.info: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return str(self.info["router"])

    def pids(self) -> list[int]:
        return [int(p["pid"]) for p in self.info["processes"] if p.get("pid")]

    def logs(self) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text()[-3000:]}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    cfile, logs = tmp / "cluster.json", tmp / "logs"
    args = [
        "--instances", "2", "--port", "0",
        "--cluster-file", str(cfile), "--log-dir", str(logs),
        "--time-scale", "0.05", "--max-total-tokens", "20000",
    ]  # fmt: skip
    with launched_cluster(args, logs) as (proc, lines):
        rc = RunningCluster(proc, cfile, logs)
        rc.info = json.loads(cfile.read_text())
        assert rc.url == lines[-1].split("router: ", 1)[1].strip()
        yield rc


def test_cluster_file_lists_every_process(cluster: RunningCluster) -> None:
    roles = sorted(p["role"] for p in cluster.info["processes"])
    assert roles == ["agent", "agent", "engine", "engine", "metrics", "router-primary", "router-standby"]
    for p in cluster.info["processes"]:
        assert p["status"] == "running" and p["endpoints"], p


def test_openai_client_streamed_chat_and_plain_completion(cluster: RunningCluster) -> None:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", timeout=30)
    models = [m.id for m in client.models.list().data]
    assert models, "router lists no model"
    stream = client.chat.completions.create(
        model=models[0], messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)

    comp = client.completions.create(
        model=models[0], prompt="The quick brown fox", max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert comp.choices[0].text
    assert comp.usage is not None and comp.usage.completion_tokens == 8
    assert comp.usage.prompt_tokens == len(b"The quick brown fox")


async def test_generate_streamed_and_not_and_prefix_reuse(cluster: RunningCluster) -> None:
    prompt = list(range(1, 400))
    async with aiohttp.ClientSession() as s:
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
        async with s.post(cluster.url + "/generate", json=body) as r:
            assert r.status == 200, await r.text()
            out = await r.json()
        assert out["meta_info"]["completion_tokens"] == 5 and out["meta_info"]["prompt_tokens"] == 399

        # Precondition: every instance routable. On a starved 2-core machine a heartbeat can miss the
        # router's 1 s timeout and take an instance (and its blocks) out for a moment; that is liveness,
        # tested elsewhere, not what this test is about.
        state = await _wait_all_routable(s, cluster.url)

        # The same prompt again, streamed: the router sends it where the prefix is cached.
        async with s.post(cluster.url + "/generate", json={**body, "stream": True}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = [ln.strip() for ln in (await r.text()).splitlines() if ln.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][5:])
        assert last["meta_info"]["completion_tokens"] == 5
        if last["meta_info"]["cached_tokens"] < 384:  # 24 full pages of 16 tokens
            async with s.get(cluster.url + "/router/state") as r:
                after = await r.json()
            pytest.fail(
                f"prefix not reused: {last['meta_info']}\nstate before: {state}\nstate after: {after}"
            )


async def _wait_all_routable(s: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        async with s.get(url + "/router/state") as r:
            state: dict[str, Any] = await r.json()
        if state["instances"] and all(i["routable"] for i in state["instances"]):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"instances not routable after {timeout} s: {state['instances']}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", None, None),  # malformed JSON
        ("/v1/completions", {"model": "x"}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            "model",
        ),
        ("/generate", {"sampling_params": {"max_new_tokens": 3}}, "text"),
    ],
)
async def test_bad_requests_get_openai_errors(
    cluster: RunningCluster, path: str, body: Any, param: str | None
) -> None:
    async with aiohttp.ClientSession() as s:
        data = b"{not json" if body is None else json.dumps(body).encode()
        async with s.post(cluster.url + path, data=data, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert err["message"] and err["code"] == 400
    if param is not None:
        assert err["param"] == param


def test_tail_and_replay(cluster: RunningCluster, tmp_path: Path) -> None:
    # A tiny Mooncake-format trace with shared prefixes (ids 0, 1 shared by all).
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 100 * i, "input_length": 1200, "output_length": 4, "hash_ids": [0, 1, 100 + i]}
        for i in range(8)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch",
            "tail",
            "--cluster",
            str(cluster.cluster_file),
            "--json",
            "--timeout",
            "60",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(1.0)  # let the SUB sockets connect (slow joiner)
    summary = tmp_path / "summary.json"
    out = tmp_path / "requests.jsonl"
    replay_cmd = [
        sys.executable,
        "-m",
        "launch",
        "replay",
        "--trace",
        str(trace),
        "--url",
        cluster.url,
        "--summary-json",
        str(summary),
        "--out",
        str(out),
        "--no-progress",
    ]
    r = subprocess.run(
        replay_cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(summary.read_text())
    assert s["requests"] == 8 and s["failed"] == 0
    assert s["hit_ratio"] > 0.3  # 2 of 3 blocks shared after the first request
    # an infinite cache: the 2 shared blocks (1024 tokens) of every request after the first
    assert s["ideal_hit_ratio"] == pytest.approx(7 * 1024 / (8 * 1200))
    assert f"(ideal {100 * 7 * 1024 / (8 * 1200):.1f}%)" in r.stdout
    assert set(s["ttft"]) == {"mean", "p50", "p90", "p99"}
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 8 and all(x["status"] == "ok" and x["output_tokens"] == 4 for x in recs)

    time.sleep(0.5)
    tail.send_signal(signal.SIGINT)
    lines = tail.communicate(timeout=20)[0].splitlines()
    types = {json.loads(x)["type"] for x in lines if x.startswith("{")}
    assert {"BlockStored", "load"} <= types, types


def test_sigint_stops_everything(cluster: RunningCluster) -> None:
    pids = cluster.pids()
    assert all(_pid_alive(p) for p in pids)
    cluster.proc.send_signal(signal.SIGINT)
    assert cluster.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _pid_alive(p)], "processes left behind"
    assert not cluster.cluster_file.exists()
