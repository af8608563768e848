"""``python -m launch chaos-bench``: kill or stop random processes of a live cluster under a trace replay.

One ``launch cluster`` (``--instances`` emulated engines, their agents, primary + standby routers, the
metrics daemon). The Mooncake trace (the in-repo one by default) is replayed in open loop against the
router (streamed ``/generate``, one connection per request) for ``--duration`` seconds. Every
``--interval`` seconds a random engine, agent or router gets ``kill -9``, or ``SIGSTOP`` and ``--stop-for``
seconds later ``SIGCONT``. A killed engine or agent is started again ``--restart-after`` seconds later
with its old ports (so its peers reconnect); a killed router is replaced by the launcher (the standby
takes over, a new standby starts).

Measured, per event, from the primary router's ``/router/state`` (admin port, polled every 50 ms) and
the cluster file:

* **detect**: event -> the router stops routing to the instance (not routable, breaker open or stalled);
  for a router, event -> the standby's record of the primary gone (for a stopped primary, read from the
  standby while the primary is stopped; a stopped primary keeps its port, so the standby cannot take over
  and the stop is survived, not failed over);
* **heal**: event -> the instance routable again (after the restart or SIGCONT), or a standby running
  again after a router event;
* **index exact**: heal -> the router's block count of the instance equal to its agent's mirror (a
  snapshot fetched from the agent), polled every 0.25 s for 5 s.

Per request: failures, each attributed to an event whose process the request depended on while it was in
flight (the instance that served it, from the router's ``X-Router-Instance`` header, or the primary router);
the target is 0 unexplained failures. The primary router's RSS is sampled every 2 s. A table and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from launch.bench.chaos_cluster import (
    cluster_procs,
    mirror_blocks,
    restart,
    routable,
    router_blocks,
    router_state,
    rss_kib,
    stop_cluster,
)
from launch.bench.chaos_report import Done, Event, Run, analyse, format_report
from launch.failover import free_port
from launch.procs import start_cluster
from launch.replay import build_body
from launch.trace import DEFAULT_TRACE, DEFAULT_VOCAB_SIZE, TraceRequest, load_trace, window

POLL = 0.05


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``chaos-bench`` subcommand's flags."""
    p.add_argument(
        "--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake .jsonl trace (default: in-repo)"
    )
    p.add_argument("--duration", type=float, default=600.0, help="seconds of replay (default %(default)s)")
    p.add_argument(
        "--interval", type=float, default=20.0, help="seconds between events (default %(default)s)"
    )
    p.add_argument(
        "--stop-for", type=float, default=5.0, help="SIGSTOP lasts this long (default %(default)s)"
    )
    p.add_argument(
        "--restart-after",
        type=float,
        default=2.0,
        help="a killed engine/agent restarts after (default %(default)s)",
    )
    p.add_argument(
        "--rate-scale", type=float, default=1.0, help="trace rate multiplier (default %(default)s)"
    )
    p.add_argument("--instances", type=int, default=4, help="engine instances (default %(default)s)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="engines' step-time scale (default %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=13, help="random seed of the event schedule (default %(default)s)"
    )
    p.add_argument(
        "--log-dir", type=Path, default=None, help="keep the cluster's logs here (default: a temp dir)"
    )
    p.add_argument("--summary-json", type=Path, default=None, help="write the figures as JSON here")


# -------------------------------------------------------------------------------------------- chaos


async def watch_event(
    ev: Event, cfile: Path, session: aiohttp.ClientSession, ctx: zmq.asyncio.Context, limit: float
) -> None:
    """Fill ``ev``'s detect, heal and index figures (module doc)."""
    t_end = time.time() + limit
    if ev.role.startswith("router"):
        while time.time() < t_end and (ev.detect_s is None or ev.heal_s is None):
            procs = cluster_procs(cfile)
            if ev.detect_s is None:
                # A killed primary's standby is the primary by now; a stopped one is still the primary
                # (and answers nothing while stopped): the standby's record of the silence is asked.
                role = "router-standby" if ev.action == "stop" else "router-primary"
                state = await router_state(session, cfile, role)
                ha = (state or {}).get("ha", {})
                lost = ha.get("primary_lost_at")
                # Only a loss noticed while this event's process was hit (a later event's would qualify
                # otherwise: a stop's resume is not a loss).
                until = ev.resumed_at + 1.0 if ev.resumed_at is not None else float("inf")
                if ev.role == "router-primary" and lost and ev.at - 1 <= lost <= until:
                    ev.detect_s = max(0.0, lost - ev.at)
                elif (
                    ev.role == "router-standby"
                    and ev.action == "kill"
                    and any(p.pid == ev.pid and p.status != "running" for p in procs)
                ):
                    ev.detect_s = time.time() - ev.at
            standby = any(
                p.role == "router-standby"
                and p.status == "running"
                and (ev.action == "stop" or p.pid != ev.pid)
                for p in procs
            )
            healed = standby and any(p.role == "router-primary" and p.status == "running" for p in procs)
            if ev.heal_s is None and healed and (ev.action == "kill" or ev.resumed_at is not None):
                ev.heal_s = time.time() - ev.at
            await asyncio.sleep(POLL)
        return
    inst = str(ev.instance)
    while time.time() < t_end:
        state = await router_state(session, cfile)
        now = time.time()
        if state is not None:
            ok = routable(state, inst)
            if ev.detect_s is None and not ok:
                ev.detect_s = now - ev.at
            if ev.detect_s is not None and ok and ev.heal_s is None and (ev.resumed_at or 0) > 0:
                ev.heal_s = now - ev.at
                break
        await asyncio.sleep(POLL)
    if ev.heal_s is None:
        return
    agent = next((p for p in cluster_procs(cfile) if p.role == "agent" and p.instance == inst), None)
    if agent is None:
        return
    t0 = time.time()
    while time.time() < t0 + 5.0:
        state = await router_state(session, cfile)
        mirror = await mirror_blocks(ctx, agent.endpoints["snapshot"])
        got = router_blocks(state, inst) if state else None
        if mirror is not None and got is not None:
            ev.index_diff = got - mirror
            if got == mirror:
                ev.index_exact_s = time.time() - t0
                return
        await asyncio.sleep(0.25)


async def chaos(args: argparse.Namespace, cfile: Path, workdir: Path, run: Run, stop: asyncio.Event) -> None:
    rng = random.Random(args.seed)
    ctx = zmq.asyncio.Context()
    watchers: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
            if stop.is_set():
                break
            procs = [p for p in cluster_procs(cfile) if p.status == "running" and p.pid]
            candidates = [
                p for p in procs if p.role in ("engine", "agent", "router-primary", "router-standby")
            ]
            busy = {(e.role, e.instance) for e in run.events if e.heal_s is None and time.time() - e.at < 30}
            candidates = [p for p in candidates if (p.role, p.instance) not in busy]
            if not candidates:
                continue
            target = rng.choice(candidates)
            action = rng.choice(("kill", "stop"))
            assert target.pid is not None
            ev = Event(time.time(), target.role, target.instance, action, target.pid)
            os.kill(target.pid, signal.SIGKILL if action == "kill" else signal.SIGSTOP)
            run.events.append(ev)
            print(f"[{ev.at:.1f}] {action} {ev.target} (pid {ev.pid})", file=sys.stderr, flush=True)
            watchers.append(asyncio.create_task(watch_event(ev, cfile, session, ctx, args.interval + 15)))
            if action == "stop":
                await asyncio.sleep(args.stop_for)
                os.kill(target.pid, signal.SIGCONT)
                ev.resumed_at = time.time()
            elif not target.role.startswith("router"):
                await asyncio.sleep(args.restart_after)
                run.restarted.append(await restart(target, args, workdir))
                ev.resumed_at = time.time()
        await asyncio.gather(*watchers, return_exceptions=True)
    ctx.destroy(linger=0)


async def sample_rss(cfile: Path, run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        primary = next(
            (p for p in cluster_procs(cfile) if p.role == "router-primary" and p.status == "running"), None
        )
        if primary is not None and primary.pid:
            kib = rss_kib(primary.pid)
            if kib is not None:
                run.rss.append((time.time(), kib))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)


async def replay(url: str, plan: list[tuple[float, TraceRequest]], run: Run) -> None:
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        start = time.perf_counter()

        async def one(offset: float, req: TraceRequest) -> None:
            body, _ = build_body("generate", None, req, DEFAULT_VOCAB_SIZE)
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.time()
            status, inst = "ok", None
            try:
                async with session.post(
                    url + "/generate", data=body, headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=600),
                ) as r:  # fmt: skip
                    inst = r.headers.get("X-Router-Instance")
                    if r.status != 200:
                        status = f"HTTP {r.status}: {(await r.text())[:200]}"
                    else:
                        data = await r.read()
                        if b'"error"' in data:
                            status = "stream error: " + data[data.index(b'"error"') :][:200].decode(
                                errors="replace"
                            )
                        elif b"[DONE]" not in data:
                            status = "stream ended without [DONE]"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = f"{type(exc).__name__}: {exc}"[:200]
            run.requests.append(Done(t0, time.time(), status == "ok", status, inst))

        await asyncio.gather(*(one(off, r) for off, r in plan))


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = window(load_trace(args.trace), args.rate_scale, args.duration)
    workdir = args.log_dir or Path(tempfile.mkdtemp(prefix="chaos-bench-"))
    port = free_port()
    proc, cfile = await start_cluster(args, port, workdir)
    run = Run()
    stop = asyncio.Event()
    try:
        tasks = [
            asyncio.create_task(chaos(args, cfile, workdir, run, stop)),
            asyncio.create_task(sample_rss(cfile, run, stop)),
        ]
        await replay(f"http://127.0.0.1:{port}", plan, run)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await stop_cluster(proc, run.restarted)
    fig = analyse(run, args)
    fig["logs"] = str(workdir)
    return fig


def run_chaos_bench(args: argparse.Namespace) -> int:
    """Entry point of ``launch chaos-bench``. Exit 1 if a failure is not explained by an event."""
    if args.duration <= 0 or args.interval <= 0 or args.instances < 2:
        print("launch chaos-bench: --duration > 0, --interval > 0, --instances >= 2", file=sys.stderr)
        return 2
    fig = asyncio.run(bench(args))
    print(format_report(fig))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(fig, indent=2) + "\n")
    return 0 if fig["failed_unexplained"] == 0 else 1
