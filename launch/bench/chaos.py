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
  for a router, event -> the standby's record of the primary gone;
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from kvindex.protocol import BlockStored, Snapshot, SnapshotRequest, decode_message, encode_message
from kvindex.protocol.cluster_file import ProcessEntry, read_cluster_file
from launch.cluster import ClusterConfig
from launch.failover import free_port, machine
from launch.replay import build_body
from launch.trace import DEFAULT_TRACE, DEFAULT_VOCAB_SIZE, TraceRequest, load_trace, window

READY_TIMEOUT = 180.0
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


@dataclass
class Event:
    """One kill or stop. Times are Unix seconds."""

    at: float
    role: str  # engine, agent, router-primary, router-standby
    instance: str | None
    action: str  # kill or stop
    pid: int
    resumed_at: float | None = None
    detect_s: float | None = None
    heal_s: float | None = None
    index_exact_s: float | None = None
    index_diff: int | None = None

    @property
    def target(self) -> str:
        return self.role + (f"-{self.instance}" if self.instance is not None else "")


@dataclass
class Done:
    start: float
    end: float
    ok: bool
    status: str
    instance: str | None


@dataclass
class Run:
    events: list[Event] = field(default_factory=list)
    requests: list[Done] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    restarted: list[asyncio.subprocess.Process] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ cluster


async def start_cluster(
    args: argparse.Namespace, port: int, workdir: Path, extra: Sequence[str] = ()
) -> tuple[asyncio.subprocess.Process, Path]:
    """``launch cluster`` (plus ``extra`` flags) in a child process; returns it and its cluster file once
    the router is up."""
    cfile = workdir / "cluster.json"
    cmd = [
        sys.executable, "-m", "launch", "cluster", "--instances", str(args.instances), "--port", str(port),
        "--cluster-file", str(cfile), "--log-dir", str(workdir / "logs"), "--time-scale", str(args.time_scale),
        *extra,
    ]  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    errlog = (workdir / "launch.log").open("a")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=errlog, stdin=asyncio.subprocess.DEVNULL
    )
    errlog.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), max(deadline - time.monotonic(), 0.01))
        except asyncio.TimeoutError:
            line = b""
        if not line:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            await proc.wait()
            raise RuntimeError(f"launch cluster did not become ready (logs in {workdir})")
        if line.startswith(b"router: "):
            return proc, cfile


async def stop_cluster(proc: asyncio.subprocess.Process, extra: list[asyncio.subprocess.Process]) -> None:
    for p in [*extra, proc]:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGINT)
    for p in [*extra, proc]:
        try:
            await asyncio.wait_for(p.wait(), 60)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()


def _procs(cfile: Path) -> list[ProcessEntry]:
    return list(read_cluster_file(cfile).processes)


def _primary_admin(cfile: Path) -> str | None:
    for p in _procs(cfile):
        if p.role == "router-primary" and p.status == "running" and "admin" in p.endpoints:
            return p.endpoints["admin"]
    return None


async def restart(entry: ProcessEntry, args: argparse.Namespace, workdir: Path) -> asyncio.subprocess.Process:
    """Start a killed engine or agent again on its old ports."""
    eps = entry.endpoints
    d = ClusterConfig()  # what ``launch cluster`` started it with
    if entry.role == "engine":

        def port(k: str) -> str:
            return eps[k].rsplit(":", 1)[1]

        cmd = [
            "-m", "agents.engine.server", "--host", "127.0.0.1", "--port", port("http"),
            "--kv-events-port", port("kv"), "--kv-replay-port", port("replay"), "--load-port", port("load"),
            "--time-scale", str(args.time_scale), "--profile", d.profile, "--model-name", d.model_name,
            "--page-size", str(d.page_size), "--max-running-requests", str(d.max_running_requests),
        ]  # fmt: skip
    else:
        cmd = [
            "-m", "agents.agent", "--engine-url", eps["engine"], "--instance-id", str(entry.instance),
            "--host", "127.0.0.1", "--pub-port", eps["pub"].rsplit(":", 1)[1],
            "--snapshot-port", eps["snapshot"].rsplit(":", 1)[1],
        ]  # fmt: skip
    log = (workdir / f"restarted-{entry.role}-{entry.instance}-{int(time.time())}.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *cmd, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
    )
    log.close()
    return proc


# ------------------------------------------------------------------------------------------ probes


async def router_state(session: aiohttp.ClientSession, cfile: Path) -> dict[str, Any] | None:
    admin = _primary_admin(cfile)
    if admin is None:
        return None
    try:
        async with session.get(admin + "/router/state", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
            return dict(await r.json())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


def routable(state: dict[str, Any], instance: str) -> bool:
    inst = next((i for i in state.get("instances", ()) if i["name"] == instance), None)
    fwd = state.get("forwarding", {}).get(instance, {})
    return (
        bool(inst and inst["routable"])
        and fwd.get("breaker", "closed") == "closed"
        and not fwd.get("stalled")
    )


async def mirror_blocks(ctx: zmq.asyncio.Context, endpoint: str) -> int | None:
    """The agent's mirror size in blocks (a snapshot over its ROUTER socket), None if no answer in 2 s."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([b"", encode_message(SnapshotRequest())])
        if not await sock.poll(2000):
            return None
        frames = await sock.recv_multipart()
        snap = decode_message(frames[-1])
        if not isinstance(snap, Snapshot):
            return None
        return sum(len(ev.block_hashes) for ev in snap.events if isinstance(ev, BlockStored))
    finally:
        sock.close(0)


def router_blocks(state: dict[str, Any], instance: str) -> int | None:
    inst = next((i for i in state.get("instances", ()) if i["name"] == instance), None)
    return None if inst is None else int(inst["blocks"])


def rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


# -------------------------------------------------------------------------------------------- chaos


async def watch_event(
    ev: Event, cfile: Path, session: aiohttp.ClientSession, ctx: zmq.asyncio.Context, limit: float
) -> None:
    """Fill ``ev``'s detect, heal and index figures (module doc)."""
    t_end = time.time() + limit
    if ev.role.startswith("router"):
        while time.time() < t_end and (ev.detect_s is None or ev.heal_s is None):
            procs = _procs(cfile)
            if ev.detect_s is None:
                state = await router_state(session, cfile)
                ha = (state or {}).get("ha", {})
                lost = ha.get("primary_lost_at")
                if ev.role == "router-primary" and lost and lost >= ev.at - 1:
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
    agent = next((p for p in _procs(cfile) if p.role == "agent" and p.instance == inst), None)
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
            procs = [p for p in _procs(cfile) if p.status == "running" and p.pid]
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
            (p for p in _procs(cfile) if p.role == "router-primary" and p.status == "running"), None
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


# ------------------------------------------------------------------------------------------ analysis


def explained(d: Done, events: list[Event], grace: float) -> Event | None:
    """The event that explains failed request ``d``: its process was hit while ``d`` was in flight (plus
    ``grace`` s for the failure to surface) and ``d`` depended on it (any router; the engine or agent of
    the instance that served ``d``, or any engine/agent if the router could not say which). A standby
    router serves nothing, so it explains nothing."""
    for ev in events:
        hit_until = (ev.resumed_at or ev.at) + grace
        if not (d.start - grace <= hit_until and ev.at <= d.end):
            continue
        if ev.role == "router-primary" or d.instance is None or d.instance == ev.instance:
            return ev
    return None


def analyse(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    failed = [d for d in run.requests if not d.ok]
    unexplained = [d for d in failed if explained(d, run.events, 2.0) is None]
    per_event: dict[int, int] = {}
    for d in failed:
        ev = explained(d, run.events, 2.0)
        if ev is not None:
            per_event[id(ev)] = per_event.get(id(ev), 0) + 1
    rss = run.rss
    return {
        "requests": len(run.requests),
        "failed": len(failed),
        "failed_unexplained": len(unexplained),
        "unexplained_reasons": sorted({d.status[:160] for d in unexplained})[:8],
        "events": [
            {
                "t_s": round(ev.at - (run.requests[0].start if run.requests else ev.at), 1),
                "target": ev.target,
                "action": ev.action,
                "detect_s": ev.detect_s,
                "heal_s": ev.heal_s,
                "index_exact_s": ev.index_exact_s,
                "index_diff": ev.index_diff,
                "failures": per_event.get(id(ev), 0),
            }
            for ev in run.events
        ],
        "router_rss_kib": {
            "start": rss[0][1] if rss else None,
            "end": rss[-1][1] if rss else None,
            "max": max(k for _, k in rss) if rss else None,
            "series": [(round(t - rss[0][0], 1), k) for t, k in rss],
        },
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
    }


def format_report(fig: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = [
        f"chaos bench: {fig['requests']} requests, {fig['failed']} failed, "
        f"{fig['failed_unexplained']} not explained by a killed or stopped process",
        f"machine: {fig['machine']}",
        f"{'t (s)':>7}  {'target':<18} {'action':<6} {'detect s':>9} {'heal s':>8} {'index exact s':>14} {'failures':>9}",
    ]
    for e in fig["events"]:
        lines.append(
            f"{e['t_s']:>7}  {e['target']:<18} {e['action']:<6} {f(e['detect_s']):>9} {f(e['heal_s']):>8} "
            f"{f(e['index_exact_s']):>14} {e['failures']:>9}"
        )
    r = fig["router_rss_kib"]
    lines.append(f"router RSS (KiB): start {f(r['start'])}, end {f(r['end'])}, max {f(r['max'])}")
    for reason in fig["unexplained_reasons"]:
        lines.append(f"  unexplained failure: {reason}")
    return "\n".join(lines)


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
