"""``python -m launch compare-live``: one live emulated cluster, the same trace window replayed through our
router once per policy and once through SGLang's own router (``sglang-router``, ``--policy cache_aware``).

Starts ``launch cluster`` (``--instances`` emulated engines and their agents; its own router is not used),
then for each run: flushes every engine's cache (``POST /flush_cache``), starts the router under test on
a free loopback port (ours: ``python -m router --policy P --agent ...``; SGLang's: ``python -m
sglang_router.launch_router --worker-urls <the engines' HTTP URLs> --policy cache_aware`` from the
virtual environment ``--sglang-venv``), waits until it routes, replays the window with ``launch replay``
(``/generate`` with ``input_ids``, streamed), stops the router. Prints one table.

SGLang's router runs with ``HF_HUB_OFFLINE=1`` and ``--tokenizer-path`` set to a local copy of the
engines' byte tokenizer; it still tries once per worker to load a tokenizer named after the worker's
model from Hugging Face, which fails (a logged warning) and does not stop it routing ``input_ids``
requests (see ``docs/results.md``). If the virtual environment is missing, its row says so
and the other runs go on. Install it with::

    python3 -m venv .cache/sglang-router-venv && .cache/sglang-router-venv/bin/pip install sglang-router==0.3.2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from launch.sim.live_run import cluster_endpoints, stop_process, wait_router
from launch.trace import DEFAULT_TRACE
from router.model.policies import POLICIES

__all__ = [
    "add_arguments",
    "flush_engines",
    "free_port",
    "run_compare_live",
    "sglang_router_cmd",
    "wait_routing",
    "write_local_tokenizer",
]

SGLANG = "sglang-router"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``compare-live`` subcommand's flags."""
    a = p.add_argument
    a(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="Mooncake .jsonl or Azure .csv trace (default: the Mooncake trace shipped in launch/traces)",
    )
    a("--instances", type=int, default=8, help="engine instances (default %(default)s)")
    a("--profile", default="h20-qwen2.5-7b", help="emulated GPU + model (default %(default)s)")
    a("--rate-scale", type=float, default=0.5, help="arrivals at trace time / X (default %(default)s)")
    a(
        "--duration",
        type=float,
        default=90.0,
        help="replay requests sent in the first S s (default %(default)s)",
    )
    a(
        "--policies",
        default=f"lmetric,vllm_v1,sglang_cache_aware,round_robin,{SGLANG}",
        help=f"our policies, plus {SGLANG} for SGLang's router (default %(default)s)",
    )
    a("--sglang-venv", type=Path, default=Path(".cache/sglang-router-venv"), help="sglang-router's venv")
    a("--ready-timeout", type=float, default=120.0, help="seconds for the cluster / a router to come up")
    a("--json", type=Path, default=None, help="write every summary here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def flush_engines(engines: list[str], timeout: float = 120.0) -> None:
    """Flush every engine's cache, waiting for each to be idle. Raises RuntimeError on timeout."""
    deadline = time.monotonic() + timeout
    for e in engines:
        while _http("POST", e + "/flush_cache")[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine {e} would not flush its cache")
            time.sleep(0.5)


def wait_routing(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Until a tiny ``/generate`` through ``url`` succeeds. Raises RuntimeError if the router exits."""
    deadline = time.monotonic() + timeout
    probe = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with code {proc.returncode}")
        if _http("POST", url + "/generate", probe, timeout=10)[0] == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"router at {url} not routing after {timeout:.0f} s")


def sglang_router_cmd(
    venv: Path, tokenizer_dir: Path, port: int, engines: list[str], policy: str = "cache_aware"
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start sglang-router from ``venv`` on ``127.0.0.1:port`` in
    front of ``engines`` (offline: ``tokenizer_dir`` from :func:`write_local_tokenizer`, no Hugging Face
    access). Also used by ``launch overhead-bench``."""
    py = venv / "bin" / "python"
    cmd = [str(py), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--policy", policy, "--log-level", "warn", "--tokenizer-path", str(tokenizer_dir),
           "--worker-urls", *engines]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return cmd, env


def write_local_tokenizer(directory: Path) -> Path:
    """Save the engines' built-in byte tokenizer as ``directory/tokenizer.json`` (for sglang-router's
    ``--tokenizer-path``, so it loads one at start-up without asking Hugging Face); returns
    ``directory``."""
    from kvindex.protocol.tokenizer import builtin_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    builtin_tokenizer().hf.save(str(directory / "tokenizer.json"))
    return directory


def _router_cmd(
    args: argparse.Namespace, name: str, port: int, agents: list[str], engines: list[str]
) -> tuple[list[str], dict[str, str]]:
    if name == SGLANG:
        return sglang_router_cmd(args.sglang_venv, args.tokenizer_dir, port, engines)
    cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port), "--policy", name,
           "--decisions-port", "off", "--admin-port", "off"]  # fmt: skip
    cmd += [x for ep in agents for x in ("--agent", ep)]
    return cmd, dict(os.environ)


def _one(
    args: argparse.Namespace, name: str, agents: list[str], engines: list[str], tmp: Path
) -> dict[str, Any]:
    if name == SGLANG and not (args.sglang_venv / "bin" / "python").is_file():
        return {"error": f"{args.sglang_venv} missing: see python -m launch compare-live --help"}
    flush_engines(engines)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = _router_cmd(args, name, port, agents, engines)
    with (tmp / f"router-{name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_routing(url, args.ready_timeout, proc)
        flush_engines(engines)  # the probe's blocks: start every run from empty caches
        out = tmp / f"{name}.json"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "launch", "replay", "--trace", str(args.trace), "--url", url,
             "--rate-scale", str(args.rate_scale), "--duration", str(args.duration),
             "--summary-json", str(out), "--no-progress"],
            check=False, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        if not out.is_file():
            return {"error": "launch replay wrote no summary"}
        s: dict[str, Any] = json.loads(out.read_text())
        s["replay_wall_s"] = time.perf_counter() - t0
        return s
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        stop_process(proc)


def _fmt(name: str, s: dict[str, Any]) -> str:
    if "error" in s:
        return f"| {name} | {s['error']} |||||||"
    t, o = s["ttft"], s["tpot"]

    def f(v: float | None, k: float = 1.0, d: int = 3) -> str:
        return "-" if v is None else f"{k * v:.{d}f}"

    return (
        f"| {name} | {f(t['mean'])} | {f(t['p99'])} | {f(o['mean'], 1e3, 1)} | {f(o['p99'], 1e3, 1)} "
        f"| {100 * s['hit_ratio']:.1f} % | {s['requests']} | {s['failed']} |"
    )


def run_compare_live(args: argparse.Namespace) -> int:
    """Entry point of ``launch compare-live``; returns the exit code (2 on bad input, 1 if the cluster
    did not come up)."""
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    for n in names:
        if n != SGLANG and n not in POLICIES:
            print(f"launch compare-live: error: unknown policy {n!r}", file=sys.stderr)
            return 2
    if not args.trace.is_file():
        print(f"launch compare-live: error: trace file not found: {args.trace}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="compare-live-"))
    # A local tokenizer for SGLang's router, so that it loads one at start-up without asking Hugging Face.
    args.tokenizer_dir = write_local_tokenizer(tmp / "tokenizer")
    cluster_file = tmp / "cluster.json"
    cmd = [sys.executable, "-m", "launch", "cluster", "--port", "0", "--no-standby", "--no-metrics",
           "--cluster-file", str(cluster_file), "--log-dir", str(tmp / "logs"),
           "--instances", str(args.instances), "--profile", args.profile]  # fmt: skip
    with (tmp / "cluster.out").open("wb") as out:
        cluster = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    results: dict[str, dict[str, Any]] = {}
    try:
        try:
            wait_router(cluster, cluster_file, args.ready_timeout)
        except RuntimeError as exc:
            print(f"launch compare-live: {exc} (logs in {tmp})", file=sys.stderr)
            return 1
        engines = cluster_endpoints(cluster_file, "engine")
        agents = cluster_endpoints(cluster_file, "agent", "pub")
        print(f"cluster: {len(engines)} x {args.profile} (logs in {tmp})", flush=True)
        for n in names:
            results[n] = _one(args, n, agents, engines, tmp)
            print(f"  {n}: " + ("error: " + results[n]["error"] if "error" in results[n] else
                  f"mean TTFT {results[n]['ttft']['mean']:.3f} s"), flush=True)  # fmt: skip
    finally:
        stop_process(cluster)
    print(
        f"\n{args.trace.name}, first {args.duration:g} s at rate scale {args.rate_scale:g}, "
        f"{args.instances} x {args.profile} (live, emulated engines)\n"
    )
    print(
        "| router / policy | TTFT mean (s) | TTFT p99 (s) | TPOT mean (ms) | TPOT p99 (ms) | hit ratio | requests | failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, s in results.items():
        print(_fmt(n, s))
    if args.json is not None:
        with contextlib.suppress(OSError):
            args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0
