"""``python -m launch overload-bench``: ten times the cluster's capacity; 429s, not collapse.

One ``launch cluster --no-standby --no-metrics`` provides the engines and agents; the bench starts its
own router on them (``python -m router``, default flags plus any ``--router-arg``), so that its flags and
its memory are the bench's. Requests are the Mooncake trace's (in-repo by default), streamed
``/generate`` with ``input_ids``, outputs capped at ``--output-cap`` tokens.

1. **Capacity**: ``--concurrency`` clients send trace requests back to back for ``--calibrate`` seconds;
   capacity = completed requests per second.
2. **At capacity**: open loop (Poisson arrivals) at the capacity for ``--baseline`` seconds: TTFT p50/p99.
3. **Overload**: open loop at ``--factor`` x capacity for ``--duration`` seconds. Reported: answers
   (200 / 429 / other), the 429s' latency on the client (p50, p99, max), the admitted requests' TTFT
   p50/p99 against step 2's, and the router's RSS at the start and the end of the phase (sampled every
   second from ``/proc``).

Targets: 429 in <= 10 ms, admitted p99 TTFT within 2x of at capacity, router RSS within +10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from kvindex.protocol.cluster_file import read_cluster_file
from launch.bench.chaos_cluster import rss_kib, stop_cluster
from launch.failover import free_port, machine
from launch.procs import start_cluster
from launch.trace import DEFAULT_TRACE, DEFAULT_VOCAB_SIZE, TraceRequest, load_trace, prompt_tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``overload-bench`` subcommand's flags."""
    p.add_argument(
        "--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake .jsonl trace (default: in-repo)"
    )
    p.add_argument("--duration", type=float, default=600.0, help="seconds of overload (default %(default)s)")
    p.add_argument("--baseline", type=float, default=60.0, help="seconds at capacity (default %(default)s)")
    p.add_argument(
        "--calibrate", type=float, default=30.0, help="seconds to measure capacity (default %(default)s)"
    )
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients when calibrating")
    p.add_argument(
        "--factor", type=float, default=10.0, help="overload = factor x capacity (default %(default)s)"
    )
    p.add_argument("--instances", type=int, default=4, help="engine instances (default %(default)s)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="engines' step-time scale (default %(default)s)"
    )
    p.add_argument(
        "--output-cap", type=int, default=128, help="max output tokens per request (default %(default)s)"
    )
    p.add_argument(
        "--bodies", type=int, default=400, help="distinct trace requests cycled (default %(default)s)"
    )
    p.add_argument(
        "--router-arg", action="append", default=[], metavar="ARG", help="extra flag for the router (repeat)"
    )
    p.add_argument("--log-dir", type=Path, default=None, help="keep the logs here (default: a temp dir)")
    p.add_argument("--summary-json", type=Path, default=None, help="write the figures as JSON here")


@dataclass
class Answer:
    sent: float
    status: int  # HTTP status, 0 for a transport failure
    latency: float  # to the response headers (the whole answer for a non-200)
    ttft: float | None = None
    prompt_tokens: int = 0


@dataclass
class Phase:
    answers: list[Answer] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    load: list[dict[str, Any]] = field(default_factory=list)
    """Per second: the router's admission (in flight, queued, limit) and the engines' summed load."""


def _bodies(trace: Path, n: int, cap: int) -> list[tuple[bytes, int]]:
    """The first ``n`` trace requests as ``/generate`` bodies, each with its prompt length in tokens."""
    out = []
    for req in load_trace(trace)[:n]:
        tokens = prompt_tokens(req, DEFAULT_VOCAB_SIZE)
        out.append((_body(tokens, req, cap), len(tokens)))
    return out


def _body(tokens: list[int], req: TraceRequest, cap: int) -> bytes:
    params = {"max_new_tokens": max(1, min(cap, req.output_length)), "ignore_eos": True, "temperature": 0.0}
    return json.dumps({"input_ids": tokens, "sampling_params": params, "stream": True}).encode()


async def send(session: aiohttp.ClientSession, url: str, body: bytes) -> Answer:
    t0 = time.perf_counter()
    sent = time.time()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                await r.read()
                return Answer(sent, r.status, time.perf_counter() - t0)
            head = time.perf_counter() - t0
            ttft = None
            async for line in r.content:
                if ttft is None and line.startswith(b"data:") and b'"completion_tokens"' in line:
                    ttft = time.perf_counter() - t0
            return Answer(sent, 200, head, ttft)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return Answer(sent, 0, time.perf_counter() - t0)


async def closed_loop(url: str, bodies: list[tuple[bytes, int]], clients: int, seconds: float) -> float:
    """Requests completed per second by ``clients`` back-to-back senders."""
    done = 0
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < end:
                if (await send(session, url, bodies[i % len(bodies)][0])).status == 200:
                    done += 1
                i += clients

        t0 = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return done / (time.monotonic() - t0)


async def open_loop(
    url: str, bodies: list[tuple[bytes, int]], rate: float, seconds: float, pid: int, seed: int
) -> Phase:
    """Poisson arrivals at ``rate`` for ``seconds``; samples the router's RSS and load every second."""
    phase = Phase()
    rng = random.Random(seed)
    stop = asyncio.Event()

    async def sample(session: aiohttp.ClientSession) -> None:
        t0 = time.time()
        while not stop.is_set():
            kib = rss_kib(pid)
            if kib is not None:
                phase.rss.append((time.time(), kib))
            load = await router_load(session, url)
            if load is not None:
                phase.load.append({"t": round(time.time() - t0, 1), **load})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sampler = asyncio.create_task(sample(session))

        async def one(body: bytes, n_tokens: int) -> None:
            answer = await send(session, url, body)
            answer.prompt_tokens = n_tokens
            phase.answers.append(answer)

        start = time.perf_counter()
        t, i = 0.0, 0
        while t < seconds:
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(*bodies[i % len(bodies)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            t += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        stop.set()
        await sampler
    return phase


async def router_load(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The router's admission (requests in flight, queued, the in-flight limit) and its instances'
    summed engine load (running and waiting requests, queued prefill tokens), from ``/router/state``;
    ``None`` if the router did not answer within 1 s."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
        async with session.get(
            url.replace("/generate", "/router/state"), timeout=aiohttp.ClientTimeout(total=1.0)
        ) as r:
            state = await r.json()
        adm, insts = state["admission"], state["instances"]
        return {
            "inflight": adm["inflight"],
            "queued": adm["queued"],
            "limit": adm["limit"],
            "running": sum(i["running"] for i in insts),
            "waiting": sum(i["waiting"] for i in insts),
            "queued_prefill_tokens": sum(i["queued_prefill_tokens"] for i in insts),
        }
    return None


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def figures(phase: Phase) -> dict[str, Any]:
    a = phase.answers
    ttft = [x.ttft for x in a if x.status == 200 and x.ttft is not None]
    rej = [x.latency for x in a if x.status == 429]
    rss = phase.rss
    return {
        "sent": len(a),
        "ok": sum(x.status == 200 for x in a),
        "rejected_429": len(rej),
        "other": sum(x.status not in (200, 429) for x in a),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "reject_p50_ms": None if not rej else pct(rej, 50) * 1000,  # type: ignore[operator]
        "reject_p99_ms": None if not rej else pct(rej, 99) * 1000,  # type: ignore[operator]
        "reject_max_ms": None if not rej else max(rej) * 1000,
        "rss_start_kib": rss[0][1] if rss else None,
        "rss_end_kib": rss[-1][1] if rss else None,
        "rss_max_kib": max(k for _, k in rss) if rss else None,
        "rss_series_kib": [(round(t - rss[0][0], 1), k) for t, k in rss],
        "ttft_by_prompt": ttft_by_prompt(a),
        "load_mean": {
            k: float(np.mean([s[k] for s in phase.load])) if phase.load else None
            for k in ("inflight", "queued", "limit", "running", "waiting", "queued_prefill_tokens")
        },
        "load_series": phase.load,
    }


PROMPT_BUCKETS = (2048, 8192, 32768)
"""Upper edges (tokens) of the prompt-length buckets the admitted TTFTs are split by."""


def ttft_by_prompt(answers: list[Answer]) -> list[dict[str, Any]]:
    """Admitted TTFT p50/p99 per prompt-length bucket: where a phase's tail comes from."""
    out = []
    lo = 0
    for hi in (*PROMPT_BUCKETS, None):
        ttft = [
            x.ttft
            for x in answers
            if x.status == 200
            and x.ttft is not None
            and x.prompt_tokens > lo
            and (hi is None or x.prompt_tokens <= hi)
        ]
        out.append(
            {"tokens": f"{lo + 1}-{hi or ''}", "n": len(ttft), "p50_s": pct(ttft, 50), "p99_s": pct(ttft, 99)}
        )
        lo = hi or 0
    return out


async def start_router(
    args: argparse.Namespace, cfile: Path, workdir: Path
) -> tuple[asyncio.subprocess.Process, str]:
    agents = [p.endpoints["pub"] for p in read_cluster_file(cfile).processes if p.role == "agent"]
    port = free_port()
    cmd = [sys.executable, "-m", "router", "--port", str(port), "--decisions-port", "off", *args.router_arg]
    cmd += [x for ep in agents for x in ("--agent", ep)]
    log = (workdir / "bench-router.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL
    )
    log.close()
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not line.startswith(b"READY"):
        raise RuntimeError(f"router did not start: {line!r} (log {workdir / 'bench-router.log'})")
    return proc, f"http://127.0.0.1:{port}/generate"


async def index_blocks(url: str) -> int | None:
    """The router's index size in blocks (``GET /router/state``), to tell index growth from a leak."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
        async with aiohttp.ClientSession() as s, s.get(url.replace("/generate", "/router/state")) as r:
            return int((await r.json())["index"]["total_blocks"])
    return None


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.log_dir or Path(tempfile.mkdtemp(prefix="overload-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bodies = _bodies(args.trace, args.bodies, args.output_cap)
    cluster_args = argparse.Namespace(instances=args.instances, time_scale=args.time_scale)
    cluster, cfile = await start_cluster(cluster_args, free_port(), workdir, ["--no-standby", "--no-metrics"])
    router: asyncio.subprocess.Process | None = None
    try:
        router, url = await start_router(args, cfile, workdir)
        print(
            f"calibrating ({args.calibrate:g} s, {args.concurrency} clients) ...", file=sys.stderr, flush=True
        )
        capacity = await closed_loop(url, bodies, args.concurrency, args.calibrate)
        print(
            f"capacity {capacity:.2f} req/s; at capacity for {args.baseline:g} s ...",
            file=sys.stderr,
            flush=True,
        )
        at_cap = await open_loop(url, bodies, capacity, args.baseline, router.pid, 1)
        index_before = await index_blocks(url)
        rate = args.factor * capacity
        print(f"overload at {rate:.1f} req/s for {args.duration:g} s ...", file=sys.stderr, flush=True)
        over = await open_loop(url, bodies, rate, args.duration, router.pid, 2)
        index_after = await index_blocks(url)
    finally:
        await stop_cluster(cluster, [router] if router is not None else [])
    fig = {
        "capacity_rps": capacity,
        "index_blocks_before_overload": index_before,
        "index_blocks_after_overload": index_after,
        "overload_rps": rate,
        "at_capacity": figures(at_cap),
        "overload": figures(over),
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "logs": str(workdir),
    }
    base, o = fig["at_capacity"]["ttft_p99_s"], fig["overload"]
    fig["ttft_p99_ratio"] = None if not base or o["ttft_p99_s"] is None else o["ttft_p99_s"] / base
    fig["rss_growth"] = (
        None if not o["rss_start_kib"] else (o["rss_end_kib"] - o["rss_start_kib"]) / o["rss_start_kib"]
    )
    return fig


def format_report(fig: dict[str, Any]) -> str:
    def f(v: Any, fmt: str = ".3f") -> str:
        return "-" if v is None else (format(v, fmt) if isinstance(v, float) else str(v))

    rows = [("", "at capacity", "overload")]
    keys = [
        ("sent", "sent"), ("ok", "200"), ("rejected_429", "429"), ("other", "other"),
        ("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)"),
        ("reject_p50_ms", "429 p50 (ms)"), ("reject_p99_ms", "429 p99 (ms)"), ("reject_max_ms", "429 max (ms)"),
        ("rss_start_kib", "router RSS start (KiB)"), ("rss_end_kib", "router RSS end (KiB)"),
    ]  # fmt: skip
    for k, name in keys:
        rows.append((name, f(fig["at_capacity"][k]), f(fig["overload"][k])))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"overload bench: capacity {fig['capacity_rps']:.2f} req/s, overload {fig['overload_rps']:.1f} req/s",
        f"machine: {fig['machine']}",
    ]
    lines += [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows]
    lines.append(
        f"router index blocks: {fig['index_blocks_before_overload']} before the overload, "
        f"{fig['index_blocks_after_overload']} after"
    )
    lines.append(
        f"admitted TTFT p99 / at capacity: {f(fig['ttft_p99_ratio'], '.2f')}; "
        f"router RSS growth during overload: {f(None if fig['rss_growth'] is None else 100 * fig['rss_growth'], '.1f')} %"
    )
    for phase in ("at_capacity", "overload"):
        buckets = ", ".join(
            f"{b['tokens']}: {b['n']} {f(b['p50_s'], '.2f')}/{f(b['p99_s'], '.2f')}"
            for b in fig[phase]["ttft_by_prompt"]
        )
        load = ", ".join(f"{k} {f(v, '.1f')}" for k, v in fig[phase]["load_mean"].items())
        lines.append(f"{phase}: TTFT p50/p99 (s) by prompt tokens: {buckets}; mean load: {load}")
    return "\n".join(lines)


def run_overload_bench(args: argparse.Namespace) -> int:
    """Entry point of ``launch overload-bench``; prints the table, writes ``--summary-json``."""
    if min(args.duration, args.baseline, args.calibrate, args.factor) <= 0 or args.concurrency < 1:
        print(
            "launch overload-bench: durations, --factor and --concurrency must be positive", file=sys.stderr
        )
        return 2
    fig = asyncio.run(bench(args))
    print(format_report(fig))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(fig, indent=2) + "\n")
    return 0
