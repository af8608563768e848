"""``python -m launch overhead-bench``: what a router costs per request, against sglang-router 0.3.2.

One run starts two emulated engines at ``--time-scale 0`` (answers as fast as the CPU allows, so the
path in front of them is what is measured) and, one target after another, puts in front of them:

* ``direct``: no router; the load generator spreads its workers over the two engines;
* ``ours``: ``python -m router`` with an agent per engine (the exact index; the agents run beside the
  engines);
* ``ours-static``: ``python -m router --worker-urls ...`` with no agents (the approximate index kept from
  what it routed: the drop-in for sglang-router users);
* ``sglang-router``: ``sglang_router.launch_router --policy cache_aware`` from its own virtual
  environment (``--sglang-venv``; installed as ``launch compare-live`` documents).

CPU placement: the system under test (engines, agents, router) runs on the first ``--cores`` CPUs this
process may use, the closed-loop load generator (this process, :mod:`launch.bench.loadgen`) on the rest,
both pinned with ``sched_setaffinity`` (children before they exec, so a router's threads inherit it).
Cells: every target x ``--concurrency`` x ``--chars`` (prompts sharing 90 % of their text) x streamed or
not, ``/generate`` with ``max_new_tokens`` 16; ``--cells`` keeps the cells whose id
(``TARGET/cN/CHARS/stream|whole``) matches one of its comma-separated shell patterns.

Per cell: requests/s, p50/p99 latency, the router's CPU time per request (utime + stime of the router
process and its descendants from ``/proc``, over the measured window), the router's RSS at the end, the
engines' (and agents') CPU per request, and errors. Printed as a Markdown table, written as JSON
(``--json``). No figure here is asserted anywhere: this is the performance check, run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.bench.loadgen import PromptMaker, run_cell
from launch.bench.overhead_procs import Proc, Rig, cpu_seconds, rss_bytes, start_router
from launch.compare_live import (
    flush_engines,
    write_local_tokenizer,
)

__all__ = ["TARGETS", "add_arguments", "run_overhead_bench"]

TARGETS = ("direct", "ours", "ours-static", "sglang-router")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``overhead-bench`` subcommand's flags."""
    a = p.add_argument
    a("--targets", default=",".join(TARGETS), help="comma-separated subset of %(default)s")
    a("--cores", type=int, default=1, help="CPUs for the system under test (default %(default)s)")
    a("--concurrency", default="1,16,64", help="closed-loop workers per cell (default %(default)s)")
    a("--chars", default="2000,30000", help="prompt sizes in characters (default %(default)s)")
    a("--stream", choices=("both", "on", "off"), default="both", help="streamed cells, whole, or both")
    a("--cell-seconds", type=float, default=8.0, help="measured seconds per cell (default %(default)s)")
    a("--warmup", type=float, default=None, help="unmeasured seconds before each cell (default: 25 %%)")
    a("--cells", default="*", help="keep cells whose id TARGET/cN/CHARS/stream|whole matches a pattern")
    a("--policy", default="lmetric", help="our routers' --policy (default %(default)s)")
    a("--sglang-venv", type=Path, default=Path(".cache/sglang-router-venv"), help="sglang-router's venv")
    a("--router-arg", action="append", default=[], help="an extra flag for our routers (repeatable)")
    a("--router-env", action="append", default=[], metavar="K=V", help="environment for our routers")
    a("--ready-timeout", type=float, default=60.0, help="seconds for a process to come up")
    a("--json", type=Path, default=None, help="write every row here")
    a(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="profile our router over each measured window with py-spy (pip install py-spy), writing "
        "DIR/CELL.txt (collapsed stacks) and DIR/CELL.top.txt (functions by own and total samples)",
    )
    a("--log-dir", type=Path, default=None, help="children's logs (default: a temporary directory)")


# -------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    target: str
    concurrency: int
    chars: int
    stream: bool

    @property
    def id(self) -> str:
        return f"{self.target}/c{self.concurrency}/{self.chars}/{'stream' if self.stream else 'whole'}"


def plan_cells(args: argparse.Namespace) -> list[Cell]:
    """Every cell the flags ask for, in run order (target-major). Raises ValueError on a bad flag."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r} (known: {', '.join(TARGETS)})")
    concs = [int(x) for x in args.concurrency.split(",") if x.strip()]
    chars = [int(x) for x in args.chars.split(",") if x.strip()]
    streams = {"both": (False, True), "on": (True,), "off": (False,)}[args.stream]
    pats = [p.strip() for p in args.cells.split(",") if p.strip()] or ["*"]
    cells = [Cell(t, c, n, s) for t in targets for n in chars for s in streams for c in concs]
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in pats)]


def _measure(
    cell: Cell, urls: list[str], router_pid: int | None, rig: Rig, args: argparse.Namespace
) -> dict[str, Any]:
    maker = PromptMaker(cell.chars, cell.stream)
    marks: list[tuple[float, float]] = []

    spy: list[subprocess.Popen[bytes]] = []
    spy_out = None
    if args.py_spy is not None and router_pid and cell.target != "sglang-router":
        args.py_spy.mkdir(parents=True, exist_ok=True)
        spy_out = args.py_spy / (cell.id.replace("/", "_") + ".txt")

    def edge() -> None:
        marks.append((cpu_seconds(router_pid) if router_pid else 0.0, rig.others_cpu()))
        if spy_out is not None and router_pid and len(marks) == 1:
            spy.append(_start_py_spy(router_pid, args.cell_seconds, spy_out))

    warm = args.warmup if args.warmup is not None else max(0.2, args.cell_seconds / 4)
    res = asyncio.run(run_cell(urls, maker, cell.stream, cell.concurrency, args.cell_seconds, warm, edge))
    for sp in spy:
        sp.wait(timeout=60)
        if spy_out is not None and spy_out.is_file():
            spy_out.with_suffix(".top.txt").write_text(top_functions(spy_out.read_text()))
    n = max(1, res.requests)
    p50, p99 = res.percentile(0.5), res.percentile(0.99)
    row: dict[str, Any] = {
        "cell": cell.id,
        "target": cell.target,
        "concurrency": cell.concurrency,
        "chars": cell.chars,
        "stream": cell.stream,
        "requests": res.requests,
        "rps": round(res.rps, 1),
        "p50_ms": None if p50 is None else round(1e3 * p50, 2),
        "p99_ms": None if p99 is None else round(1e3 * p99, 2),
        "router_cpu_ms_per_req": None,
        "router_rss_mib": None,
        "others_cpu_ms_per_req": round(1e3 * (marks[1][1] - marks[0][1]) / n, 3) if len(marks) == 2 else None,
        "errors": res.errors,
    }
    if router_pid and len(marks) == 2:
        row["router_cpu_ms_per_req"] = round(1e3 * (marks[1][0] - marks[0][0]) / n, 3)
        row["router_rss_mib"] = round(rss_bytes(router_pid) / 2**20, 1)
    return row


def _start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe if exe.is_file() else "py-spy"), "record", "-p", str(pid), "-d", str(max(1, round(seconds))),
           "-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_functions(collapsed: str, n: int = 25) -> str:
    """The ``n`` functions with the most samples of their own, then the ``n`` with the most in total
    (own + callees), from py-spy's collapsed stacks (``frame;frame;... count`` a line). Pure."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    grand = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        grand += c
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]  # fmt: skip
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            total[f] = total.get(f, 0) + c
    lines = [f"{grand} samples", "", "own %   function"]
    lines += [f"{100 * v / grand:5.1f}  {k}" for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:n]]
    lines += ["", "total % function"]
    lines += [f"{100 * v / grand:5.1f}  {k}" for k, v in sorted(total.items(), key=lambda kv: -kv[1])[:n]]
    return "\n".join(lines) + "\n"


def _run_target(
    target: str, cells: list[Cell], rig: Rig, args: argparse.Namespace, tok: Path
) -> list[dict[str, Any]]:
    if target == "sglang-router" and not (args.sglang_venv / "bin" / "python").is_file():
        return _failed(cells, f"{args.sglang_venv} missing: see python -m launch compare-live --help")
    router: Proc | None = None
    try:
        if target == "ours":
            rig.start_agents()
        else:
            rig.stop_agents()  # the agents' CPU is part of "ours" only
        flush_engines(rig.engine_urls)
        if target == "direct":
            urls = [u + "/generate" for u in rig.engine_urls]
        else:
            router, url = start_router(args, target, rig, tok)
            urls = [url + "/generate"]
        rows = []
        for c in cells:
            row = _measure(c, urls, router.popen.pid if router else None, rig, args)
            print(_fmt_row(row), flush=True)
            rows.append(row)
        return rows
    except RuntimeError as exc:
        return _failed(cells, str(exc))
    finally:
        if router is not None:
            router.stop()


def _failed(cells: list[Cell], error: str) -> list[dict[str, Any]]:
    rows = [{"cell": c.id, "target": c.target, "error": error} for c in cells]
    for r in rows:
        print(_fmt_row(r), flush=True)
    return rows


# ------------------------------------------------------------------------------------------- output

HEADER = (
    "| cell | req/s | p50 ms | p99 ms | router CPU ms/req | router RSS MiB | engines+agents CPU ms/req | errors |\n"
    "|---|---:|---:|---:|---:|---:|---:|---|"
)


def _fmt_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['cell']} | {r['error']} |||||||"

    def f(v: Any) -> str:
        return "-" if v is None else str(v)

    errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
    return (
        f"| {r['cell']} | {f(r['rps'])} | {f(r['p50_ms'])} | {f(r['p99_ms'])} | "
        f"{f(r['router_cpu_ms_per_req'])} | {f(r['router_rss_mib'])} | {f(r['others_cpu_ms_per_req'])} | {errs} |"
    )


def _cpu_sets(cores: int) -> tuple[set[int], set[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    if cores < 1 or cores >= len(cpus):
        raise ValueError(
            f"--cores {cores}: this process may use {len(cpus)} CPU(s) and the load generator needs one"
        )
    return set(cpus[:cores]), set(cpus[cores:])


def run_overhead_bench(args: argparse.Namespace) -> int:
    """Entry point of ``launch overhead-bench``; returns the exit code (2 on bad flags, 1 if the engines
    did not start)."""
    try:
        cells = plan_cells(args)
        sut, gen = _cpu_sets(args.cores)
    except ValueError as exc:
        print(f"launch overhead-bench: error: {exc}", file=sys.stderr)
        return 2
    logs = args.log_dir or Path(tempfile.mkdtemp(prefix="overhead-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    tok = write_local_tokenizer(logs / "tokenizer")
    os.sched_setaffinity(0, gen)
    load = os.getloadavg()
    print(f"system under test on CPU(s) {sorted(sut)}, load generator on {sorted(gen)}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; logs in {logs}", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    rig = Rig(sut, logs, args.ready_timeout)
    rows: list[dict[str, Any]] = []
    try:
        try:
            rig.start_engines()
        except RuntimeError as exc:
            print(f"launch overhead-bench: {exc}", file=sys.stderr)
            return 1
        for target in dict.fromkeys(c.target for c in cells):
            rows += _run_target(target, [c for c in cells if c.target == target], rig, args, tok)
    finally:
        rig.stop()
    meta = {
        "cores": args.cores,
        "sut_cpus": sorted(sut),
        "loadgen_cpus": sorted(gen),
        "cell_seconds": args.cell_seconds,
        "loadavg_start": load,
        "loadavg_end": os.getloadavg(),
        "python": sys.version.split()[0],
    }
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in meta['loadavg_end'])}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0
