"""``python -m launch failover-bench``: kill the primary router mid-replay and measure the takeover.

Two runs, each on a fresh ``launch cluster`` (primary + standby, ``--port`` a port found free, the rest
OS-assigned): a **baseline** run replays the trace window untouched; the **kill** run replays the same
window and SIGKILLs the primary router ``--kill-after`` seconds in. The replay is open loop (trace arrival
times divided by ``--rate-scale``), streamed ``/generate`` requests, one TCP connection per request (so a
request "sent" at time t connects at t, and nothing rides on a pooled connection to the dead process).

A prober in its own process (so the replay's busy event loop cannot delay it) sends ``GET /health``
every 10 ms around the kill, a fresh connection each. Reported:

* **takeover** (client's view): kill → the first probe *sent after the kill* that got a 200 from the new
  primary; also kill → the first trace request sent after the kill that succeeded (quantised by the
  trace's arrivals), and the standby's own record (primary seen gone → port bound);
* **requests**: those in flight at the kill (sent before, not finished), those sent in the gap (after the
  kill, before takeover: the kernel refuses their connections while no process listens), and those sent
  after takeover; failures of each (the target: none after takeover);
* **hit ratio** (cached prompt tokens / prompt tokens, as the engines reported them) over the requests
  sent in the ``--window`` seconds after takeover, against the same requests in the baseline run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvindex.protocol.cluster_file import ProcessEntry, read_cluster_file
from launch.procs import start_cluster
from launch.replay import build_body, send_one
from launch.summary import RequestRecord
from launch.trace import DEFAULT_TRACE, DEFAULT_VOCAB_SIZE, TraceError, TraceRequest, load_trace, window

PROBE_INTERVAL = 0.01


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``failover-bench`` subcommand's flags."""
    p.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="Mooncake .jsonl trace (default: the one shipped in launch/traces)",
    )
    p.add_argument(
        "--rate-scale", type=float, default=1.0, help="2 = twice the trace's rate (default %(default)s)"
    )
    p.add_argument(
        "--kill-after",
        type=float,
        default=20.0,
        help="seconds of replay before the kill (default %(default)s)",
    )
    p.add_argument(
        "--window", type=float, default=60.0, help="hit-ratio window after takeover, s (default %(default)s)"
    )
    p.add_argument("--instances", type=int, default=4, help="engine instances (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="router port (default: a free port found at start)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="engines' step-time scale (default %(default)s)"
    )
    p.add_argument(
        "--max-total-tokens", type=int, default=None, help="KV capacity per engine (default: profile's)"
    )
    p.add_argument(
        "--primary-timeout", type=float, default=0.4, help="standby's heartbeat timeout (default %(default)s)"
    )
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the run without a kill (no hit-ratio comparison)"
    )
    p.add_argument(
        "--log-dir", type=Path, default=None, help="keep the clusters' logs here (default: a temp dir)"
    )
    p.add_argument("--summary-json", type=Path, default=None, help="write the figures as JSON here")


@dataclass
class Sent:
    """One trace request of a run: its record plus when it ended (Unix seconds)."""

    rec: RequestRecord
    end: float

    @property
    def ok(self) -> bool:
        return self.rec.status == "ok"


@dataclass
class RunResult:
    """What one run measured. Times are Unix seconds."""

    sent: list[Sent]
    kill_at: float | None = None
    probe_ok_at: float | None = None
    probes: list[tuple[float, bool]] = field(default_factory=list)
    ha: dict[str, Any] = field(default_factory=dict)
    routers_after: list[dict[str, Any]] = field(default_factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def machine() -> str:
    """One line describing this machine (CPU model, cores, OS)."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


async def _start_cluster(
    args: argparse.Namespace, port: int, workdir: Path
) -> tuple[asyncio.subprocess.Process, Path]:
    extra = ["--primary-timeout", str(args.primary_timeout)]
    if args.max_total_tokens:
        extra += ["--max-total-tokens", str(args.max_total_tokens)]
    return await start_cluster(args, port, workdir, extra)


async def _stop_cluster(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def _routers(cfile: Path) -> list[ProcessEntry]:
    return [p for p in read_cluster_file(cfile).processes if p.role.startswith("router")]


async def _kill_primary(cfile: Path) -> float:
    primary = next(p for p in _routers(cfile) if p.role == "router-primary" and p.status == "running")
    t = time.time()
    assert primary.pid is not None  # running
    os.kill(primary.pid, signal.SIGKILL)
    return t


def probe_process(port: int, seconds: float, out: str) -> None:
    """Runs in its own process (so the replay's busy event loop cannot delay it): every
    :data:`PROBE_INTERVAL` for ``seconds``, connect to ``127.0.0.1:port``, ``GET /health``, and record
    ``[sent at (Unix s, taken right before connect), got a 200]``; write the list as JSON to ``out``."""
    probes: list[tuple[float, bool]] = []
    end = time.time() + seconds
    while (t := time.time()) < end:
        ok = False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            ok = s.recv(16).startswith(b"HTTP/1.1 200")
        probes.append((t, ok))
        time.sleep(max(0.0, t + PROBE_INTERVAL - time.time()))
    Path(out).write_text(json.dumps(probes))


async def _run(
    args: argparse.Namespace, plan: list[tuple[float, TraceRequest]], kill: bool, workdir: Path
) -> RunResult:
    port = args.port or free_port()
    proc, cfile = await _start_cluster(args, port, workdir)
    url = f"http://127.0.0.1:{port}"
    result = RunResult(sent=[])
    try:
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=conn) as session:
            start = time.perf_counter()

            async def timed(offset: float, req: TraceRequest) -> Sent:
                body, prompt_len = build_body("generate", None, req, DEFAULT_VOCAB_SIZE)
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = await send_one(session, url, "generate", body, req, prompt_len, 600.0)
                return Sent(rec, time.time())

            async def killer() -> None:
                await asyncio.sleep(max(0.0, start + args.kill_after - 1.0 - time.perf_counter()))
                out = workdir / "probes.json"
                prober = mp.get_context("spawn").Process(target=probe_process, args=(port, 6.0, str(out)))
                prober.start()
                await asyncio.sleep(max(0.0, start + args.kill_after - time.perf_counter()))
                if kill:
                    result.kill_at = await _kill_primary(cfile)
                await asyncio.to_thread(prober.join, 30.0)
                with contextlib.suppress(OSError, ValueError):
                    result.probes = [(float(t), bool(ok)) for t, ok in json.loads(out.read_text())]

            ktask = asyncio.create_task(killer())
            result.sent = list(await asyncio.gather(*(timed(off, r) for off, r in plan)))
            await ktask
        if kill:
            await _settle(cfile, result)
    finally:
        await _stop_cluster(proc)
    return result


async def _settle(cfile: Path, result: RunResult, timeout: float = 30.0) -> None:
    """After a kill: wait for a running standby again, and read the new primary's HA record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        routers = _routers(cfile)
        if any(p.role == "router-standby" and p.status == "running" for p in routers):
            break
        await asyncio.sleep(0.2)
    result.routers_after = [{"role": p.role, "pid": p.pid, "status": p.status} for p in _routers(cfile)]
    primary = next((p for p in _routers(cfile) if p.role == "router-primary"), None)
    if primary is not None and "admin" in primary.endpoints:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
                s.get(primary.endpoints["admin"] + "/router/state") as r,
            ):
                result.ha = (await r.json())["ha"]
    if result.kill_at is not None:
        after = [t for t, ok in sorted(result.probes) if ok and t >= result.kill_at]
        result.probe_ok_at = after[0] if after else None


def _hit(sent: Sequence[Sent]) -> float | None:
    ok = [s.rec for s in sent if s.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    return sum(r.cached_tokens for r in ok) / prompt if prompt else None


def analyse(kill_run: RunResult, baseline: RunResult | None, win: float) -> dict[str, Any]:
    """The figures (see the module doc) from a kill run and, if given, a baseline run."""
    kill_at = kill_run.kill_at
    assert kill_at is not None
    sent = kill_run.sent
    first_ok = min((s.rec.start_time for s in sent if s.ok and s.rec.start_time >= kill_at), default=None)
    takeover_at = kill_run.probe_ok_at if kill_run.probe_ok_at is not None else first_ok
    in_flight = [s for s in sent if s.rec.start_time < kill_at < s.end]
    gap = [s for s in sent if takeover_at is not None and kill_at <= s.rec.start_time < takeover_at]
    after = [s for s in sent if takeover_at is not None and s.rec.start_time >= takeover_at]
    in_flight_ids = {id(s) for s in in_flight}
    before_fail = [s for s in sent if s.rec.start_time < kill_at and not s.ok and id(s) not in in_flight_ids]
    ha = kill_run.ha
    out: dict[str, Any] = {
        "takeover_s_probe": None if kill_run.probe_ok_at is None else kill_run.probe_ok_at - kill_at,
        "takeover_s_first_trace_request": None if first_ok is None else first_ok - kill_at,
        "takeover_s_standby_record": (
            ha["promoted_at"] - ha["primary_lost_at"]
            if ha.get("promoted_at") and ha.get("primary_lost_at")
            else None
        ),
        "detect_s_standby_record": (ha["primary_lost_at"] - kill_at if ha.get("primary_lost_at") else None),
        "probes_refused_in_gap": sum(
            1
            for t, ok in kill_run.probes
            if not ok and kill_at <= t and (kill_run.probe_ok_at is None or t < kill_run.probe_ok_at)
        ),
        "requests": len(sent),
        "in_flight_at_kill": len(in_flight),
        "in_flight_failed": sum(not s.ok for s in in_flight),
        "sent_in_gap": len(gap),
        "gap_failed": sum(not s.ok for s in gap),
        "sent_after_takeover": len(after),
        "after_takeover_failed": sum(not s.ok for s in after),
        "failed_before_kill": len(before_fail),
        "failure_reasons": sorted({s.rec.status[:120] for s in sent if not s.ok})[:8],
        "routers_after": kill_run.routers_after,
    }
    if takeover_at is not None:
        idx = {s.rec.index for s in after if s.rec.start_time < takeover_at + win}
        out["window_requests"] = len(idx)
        out["hit_ratio_after_takeover"] = _hit([s for s in after if s.rec.index in idx])
        if baseline is not None:
            out["hit_ratio_baseline_same_requests"] = _hit([s for s in baseline.sent if s.rec.index in idx])
            out["baseline_failed"] = sum(not s.ok for s in baseline.sent)
    return out


def format_report(fig: dict[str, Any], args: argparse.Namespace) -> str:
    def s(v: float | None, unit: str = " s", scale: float = 1.0, fmt: str = ".3f") -> str:
        return "-" if v is None else f"{v * scale:{fmt}}{unit}"

    lines = [
        f"failover bench: {args.trace.name} at rate scale {args.rate_scale}, {args.instances} instances, "
        f"time scale {args.time_scale}, kill after {args.kill_after:g} s, window {args.window:g} s",
        f"machine: {machine()}",
        f"takeover (client, first /health probe sent after the kill that succeeded): {s(fig['takeover_s_probe'])}"
        f" ({fig['probes_refused_in_gap']} probes failed before it)",
        f"takeover (client, first trace request sent after the kill that succeeded): {s(fig['takeover_s_first_trace_request'])}",
        f"standby's record: primary seen gone {s(fig['detect_s_standby_record'])} after the kill, port bound "
        f"{s(fig['takeover_s_standby_record'])} later",
        f"requests: {fig['requests']} sent; in flight at the kill {fig['in_flight_at_kill']} "
        f"(failed {fig['in_flight_failed']}); sent in the gap {fig['sent_in_gap']} (failed {fig['gap_failed']}); "
        f"sent after takeover {fig['sent_after_takeover']} (failed {fig['after_takeover_failed']})",
    ]
    if "hit_ratio_after_takeover" in fig:
        lines.append(
            f"hit ratio over the {fig['window_requests']} requests sent in the {args.window:g} s after takeover: "
            f"{s(fig['hit_ratio_after_takeover'], '%', 100, '.1f')}"
            + (
                f" vs {s(fig['hit_ratio_baseline_same_requests'], '%', 100, '.1f')} for the same requests without a kill"
                if "hit_ratio_baseline_same_requests" in fig
                else ""
            )
        )
    lines.append(
        "routers after: "
        + ", ".join(f"{r['role']} pid {r['pid']} ({r['status']})" for r in fig["routers_after"])
    )
    for reason in fig["failure_reasons"]:
        lines.append(f"  failure: {reason}")
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs and the analysis. Raises ``TraceError`` / ``RuntimeError``."""
    plan = window(load_trace(args.trace), args.rate_scale, args.kill_after + args.window + 5.0)
    root = args.log_dir or Path(tempfile.mkdtemp(prefix="failover-bench-"))
    baseline = None
    if not args.no_baseline:
        print(f"baseline run ({len(plan)} requests) ...", file=sys.stderr, flush=True)
        baseline = await _run(args, plan, kill=False, workdir=root / "baseline")
    print(f"kill run ({len(plan)} requests) ...", file=sys.stderr, flush=True)
    killed = await _run(args, plan, kill=True, workdir=root / "kill")
    fig = analyse(killed, baseline, args.window)
    fig["logs"] = str(root)
    return fig


def run_failover_bench(args: argparse.Namespace) -> int:
    """Entry point of ``launch failover-bench``; prints the report. Exit 1 if a request sent after
    takeover failed or no takeover happened."""
    if args.instances < 1 or args.rate_scale <= 0 or args.kill_after <= 1.0 or args.window <= 0:
        print(
            "launch failover-bench: --instances >= 1, --rate-scale > 0, --kill-after > 1, --window > 0",
            file=sys.stderr,
        )
        return 2
    try:
        fig = asyncio.run(bench(args))
    except TraceError as exc:
        print(f"launch failover-bench: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"launch failover-bench: {exc}", file=sys.stderr)
        return 1
    print(format_report(fig, args))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(fig, indent=2) + "\n")
    took_over = fig["takeover_s_probe"] is not None or fig["takeover_s_first_trace_request"] is not None
    return 0 if took_over and fig["after_takeover_failed"] == 0 else 1
