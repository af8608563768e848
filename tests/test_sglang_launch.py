"""``launch cluster --engine sglang`` and ``--attach``, without a GPU.

The SGLang command line is checked as data; then the whole path runs for real with the emulated engine
standing in for ``sglang.launch_server`` (it accepts SGLang's own flags: ``--model-path``,
``--kv-events-config``, ``--load-publish-endpoint``), so ports, ``CUDA_VISIBLE_DEVICES``, discovery
through ``/server_info``, the model directory's tokenizer and ``/health`` readiness are all exercised.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from launch.sglang_engines import EnginePorts, parse_gpus, server_args
from tests.test_tokenizer import write_model_dir

ROOT = Path(__file__).resolve().parents[1]


def test_server_args_publish_events_replay_and_load() -> None:
    args = server_args("/models/llama", "127.0.0.1", EnginePorts(8000, 8001, 8002, 8003), 16, ("--tp", "1"))
    assert args[:6] == ["--model-path", "/models/llama", "--host", "127.0.0.1", "--port", "8000"]
    kv = json.loads(args[args.index("--kv-events-config") + 1])
    # the KV stream and replay carry prompt token ids: bound on the engine's host, never on "*"
    assert kv["publisher"] == "zmq" and kv["endpoint"] == "tcp://127.0.0.1:8001" and kv["bind"] is True
    assert kv["replay_endpoint"] == "tcp://127.0.0.1:8002" and kv["topic"] == "kv"
    # SGLang 0.5.23 binds the load stream (counts only) on a wildcard host or not at all
    assert args[args.index("--load-publish-endpoint") + 1] == "tcp://*:8003"
    off = server_args("/m", "10.0.0.5", EnginePorts(8000, 8001, 8002, 8003), 16, load="off")
    assert off[off.index("--load-publish-endpoint") + 1] == "off"
    assert json.loads(off[off.index("--kv-events-config") + 1])["endpoint"] == "tcp://10.0.0.5:8001"
    assert args[args.index("--page-size") + 1] == "16"
    assert args[-2:] == ["--tp", "1"]  # the user's extra arguments come last


def test_parse_gpus() -> None:
    assert parse_gpus(None, 3) == ["0", "1", "2"]
    assert parse_gpus("2,5", 1) == ["2", "5"]
    for bad in ("a,b", "1,1", ""):
        if bad:
            with pytest.raises(ValueError):
                parse_gpus(bad, 1)


def _start(args: list[str], tmp: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    cfile = tmp / "cluster.json"
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "cluster",
        "--port",
        "0",
        "--cluster-file",
        str(cfile),
        "--log-dir",
        str(tmp / "logs"),
    ]
    proc = subprocess.Popen(cmd + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if line.startswith("router: "):
            return proc, json.loads(cfile.read_text())
    proc.kill()
    logs = "".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted((tmp / "logs").glob("*.log")))
    pytest.fail("cluster did not start:\n" + "".join(out) + logs)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    return write_model_dir(d)


def _chat(url: str) -> str:
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=30)
    model = c.models.list().data[0].id
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    return str(r.choices[0].message.content)


def test_engine_sglang_path_end_to_end(tmp_path: Path, model_dir: Path) -> None:
    sglang_cli = [
        "--engine",
        "sglang",
        "--model-path",
        str(model_dir),
        "--gpus",
        "3,5",
        "--sglang-module",
        "agents.engine.server",
        "--no-standby",
        "--no-metrics",
        "--",
        "--load-format",
        "dummy",
        "--time-scale",
        "0.02",
    ]
    proc, info = _start(sglang_cli, tmp_path)
    try:
        engines = [p for p in info["processes"] if p["role"] == "engine"]
        assert sorted(e["endpoints"]["gpu"] for e in engines) == ["3", "5"]
        for e in engines:
            env = Path(f"/proc/{e['pid']}/environ").read_bytes().split(b"\0")
            assert f"CUDA_VISIBLE_DEVICES={e['endpoints']['gpu']}".encode() in env
        router = next(p for p in info["processes"] if p["role"] == "router-primary")
        cmdline = Path(f"/proc/{router['pid']}/cmdline").read_bytes().split(b"\0")
        assert str(model_dir).encode() in cmdline  # the router uses the model's tokenizer
        assert _chat(info["router"])
        # The engines were given SGLang's flags and served the model path as its name.
        models = openai.OpenAI(base_url=info["router"] + "/v1", api_key="none").models.list()
        assert [m.id for m in models.data] == [str(model_dir)]
    finally:
        _stop(proc)


def test_attach_to_running_engines(tmp_path: Path) -> None:
    engines = []
    urls = []
    try:
        for _ in range(2):
            e = subprocess.Popen(
                [sys.executable, "-m", "agents.engine.server", "--port", "0", "--time-scale", "0.02"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            engines.append(e)
            assert e.stdout is not None
            for line in e.stdout:
                if line.startswith("READY "):
                    urls.append(json.loads(line[6:])["endpoints"]["http"])
                    break
        assert len(urls) == 2
        proc, info = _start(["--attach", *urls, "--no-standby", "--no-metrics"], tmp_path)
        try:
            roles = sorted(p["role"] for p in info["processes"])
            assert roles == ["agent", "agent", "router-primary"]  # no engine started
            assert _chat(info["router"])
        finally:
            _stop(proc)
        assert all(e.poll() is None for e in engines), "attached engines must outlive the cluster"
    finally:
        for e in engines:
            e.terminate()
            e.wait(10)
