"""The global index at production scale: ``python -m launch.bench.index_bench [--json] [--blocks N] ...``.

Builds the workload of :mod:`launch.bench.index_load` (the Mooncake conversation trace replayed onto
``--instances`` engines as the agents' ``EventBatch`` payloads: ``--blocks`` resident (instance, block) pairs
of ``--block-size`` tokens, 10 M by default), then measures, on one Python thread:

* ``ingest_blocks_per_s``: the agents' EventBatch payloads -> :func:`decode_message` + :meth:`GlobalIndex.apply_batch` (the router's path), msgpack decoding included, into
  an index that starts empty and grows to the full size.
* ``bytes_per_block``: growth of the process's resident set size (RSS, ``/proc/self/statm``) across that
  ingestion, divided by resident pairs. RSS, not tracemalloc: allocator rounding, dict slack and freed but
  unreturned memory all count. ``bytes_per_distinct_hash`` divides by distinct hashes instead.
* ``match_p50_us``/``match_p99_us``: :meth:`GlobalIndex.match` of ``--prompt-tokens``-token prompts cut
  from trace requests that were stored (so the walk goes the whole way), chained hashing included.
* ``route_p99_us``: match, then the LMetric score ``(queued + new) * (bs + 1)`` of every instance under a
  fixed random load, and the argmin.
* Extras: eviction (``BlockRemoved`` payloads for 60 % of every instance's blocks, log
  compactions included, with the longest single call); ``dump`` and ``remove_instance`` of the largest
  instance.

Times are this thread's CPU time (``time.thread_time``): on a shared machine that leaves out what other
processes took, and keeps this thread's own stalls (GC, page faults). Wall-clock figures are printed too.
The last line of stdout is one JSON object with every figure; ``--json`` prints only that line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from kvindex.hashing import block_hashes
from kvindex.index import GlobalIndex
from kvindex.protocol import decode_message
from launch.bench.index_load import Workload, build_workload, eviction_payloads
from launch.trace import MOONCAKE_TRACE, TRACE_BLOCK_TOKENS, load_trace, prompt_tokens

TARGETS: dict[str, float] = {"ingest_blocks_per_s": 1_000_000, "route_p99_us": 1_000, "bytes_per_block": 150}
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Bench parameters. ``blocks`` counts resident (instance, block) pairs; sizes in tokens."""

    instances: int = 64
    blocks: int = 10_000_000
    block_size: int = 16
    prompt_tokens: int = 8192
    seed: int = 0
    queries: int = 2000
    trace: str = str(MOONCAKE_TRACE)
    json_only: bool = False


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """Parse the command line into a :class:`BenchConfig` (exits with a usage message on bad input)."""
    p = argparse.ArgumentParser(
        prog="python -m launch.bench.index_bench",
        description="Benchmark the global index at production scale: ingest, memory, match and route "
        "latency on the Mooncake trace replayed onto --instances engines. Prints figures, then one JSON "
        "line (the last line of stdout).",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--instances", type=int, default=64, help="engine instances (default 64)")
    p.add_argument(
        "--blocks", type=int, default=10_000_000, help="resident (instance, block) pairs (default 10,000,000)"
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per block, divides 512 (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=8192, help="tokens per matched prompt (default 8192)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of prompt sampling and instance load (default 0)"
    )
    p.add_argument(
        "--queries", type=int, default=2000, help="timed match calls and route calls, each (default 2000)"
    )
    p.add_argument(
        "--trace",
        default=str(MOONCAKE_TRACE),
        help="Mooncake trace .jsonl (default: the one in launch/traces)",
    )
    a = p.parse_args(argv)
    if min(a.instances, a.blocks, a.queries) < 1 or a.prompt_tokens < a.block_size:
        p.error("--instances, --blocks and --queries must be positive; --prompt-tokens >= --block-size")
    if a.block_size < 1 or TRACE_BLOCK_TOKENS % a.block_size:
        p.error(f"--block-size must divide {TRACE_BLOCK_TOKENS}")
    return BenchConfig(
        a.instances, a.blocks, a.block_size, a.prompt_tokens, a.seed, a.queries, a.trace, a.json
    )


# ------------------------------------------------------------------------------------------ measuring


def rss_bytes() -> int:
    """Resident set size of this process, in bytes (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _thread_usage() -> tuple[float, float, int]:
    """(user s, kernel s, minor page faults) of this thread so far (process-wide where not Linux)."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    r = resource.getrusage(who)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _timed(fn: Callable[[T], object], items: Sequence[T]) -> tuple[list[int], list[int]]:
    """Call ``fn`` on each item (after 50 warm-up calls); per-call thread CPU and wall nanoseconds."""
    for it in items[:50]:
        fn(it)
    cpu: list[int] = []
    wall: list[int] = []
    thread_ns, wall_ns = time.thread_time_ns, time.perf_counter_ns
    for it in items:
        w, c = wall_ns(), thread_ns()
        fn(it)
        c, w = thread_ns() - c, wall_ns() - w
        cpu.append(c)
        wall.append(w)
    return cpu, wall


def _pct_us(samples_ns: list[int], q: float) -> float:
    return round(float(np.percentile(np.array(samples_ns, dtype=np.float64), q)) / 1000.0, 1)


def _route(
    index: GlobalIndex, bs_of: dict[str, int], queued_of: dict[str, int], tokens: Sequence[int]
) -> str:
    """LMetric: argmin ``(queued + new) * (bs + 1)``, ties to lower bs, then fewer new tokens."""
    cached = index.match(tokens).cached_tokens
    n = len(tokens)
    best = ""
    best_key = (0, 0, 0)
    for name, c in cached.items():
        bs = bs_of[name]
        new = n - c
        key = ((queued_of[name] + new) * (bs + 1), bs, new)
        if not best or key < best_key:
            best, best_key = name, key
    return best


def _apply_all(index: GlobalIndex, payloads: Sequence[tuple[str, bytes]]) -> tuple[float, float, int]:
    """Apply every payload; (thread CPU s, wall s, longest single call in thread CPU ns)."""
    apply = index.apply_batch
    thread_ns = time.thread_time_ns
    longest = 0
    t0, c0 = time.perf_counter(), thread_ns()
    for name, payload in payloads:
        c = thread_ns()
        apply(name, decode_message(payload).events)  # type: ignore[union-attr]
        longest = max(longest, thread_ns() - c)
    return (thread_ns() - c0) / 1e9, time.perf_counter() - t0, longest


def _ingest(cfg: BenchConfig, wl: Workload, say: Callable[[str], None]) -> tuple[GlobalIndex, dict[str, Any]]:
    gc.collect()
    rss0 = rss_bytes()
    u0, s0, f0 = _thread_usage()
    index = GlobalIndex(cfg.block_size)
    for name in wl.names:
        index.add_instance(name)
    cpu_s, wall_s, _ = _apply_all(index, wl.payloads)
    u1, s1, f1 = _thread_usage()
    gc.collect()
    mem = rss_bytes() - rss0
    resident = sum(index.blocks_of(n) for n in wl.names)
    distinct = index.total_blocks()
    if resident != wl.residencies:
        raise RuntimeError(f"index holds {resident} pairs, the workload stored {wl.residencies}")
    say(
        f"index: {resident:,} resident (instance, block) pairs of {cfg.block_size} tokens on {cfg.instances} "
        f"instances, {distinct:,} distinct hashes ({resident / distinct:.3f} holders a hash)"
    )
    say(
        f"ingest (decode_message + apply_batch, as the router does): {resident / cpu_s / 1e6:.2f} M blocks/s "
        f"[target >= {TARGETS['ingest_blocks_per_s'] / 1e6:.0f} M]; {cpu_s:.2f} s CPU of which "
        f"{s1 - s0:.2f} s kernel ({f1 - f0:,} first-touch page faults); {resident / wall_s / 1e6:.2f} M/s wall"
    )
    say(
        f"memory (RSS delta): {mem / 2**20:,.0f} MiB = {mem / resident:.1f} bytes per resident pair "
        f"[target <= {TARGETS['bytes_per_block']:.0f}], {mem / distinct:.1f} per distinct hash"
    )
    return index, {
        "ingest_blocks_per_s": round(resident / cpu_s),
        "ingest_blocks_per_s_wall": round(resident / wall_s),
        "ingest_kernel_s": round(s1 - s0, 2),
        "ingest_user_s": round(u1 - u0, 2),
        "ingest_page_faults": f1 - f0,
        "bytes_per_block": round(mem / resident, 1),
        "bytes_per_distinct_hash": round(mem / distinct, 1),
        "memory_method": "rss_delta",
        "resident_blocks": resident,
        "distinct_hashes": distinct,
    }


def _latency(
    cfg: BenchConfig, wl: Workload, index: GlobalIndex, say: Callable[[str], None]
) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed)
    picks = rng.integers(0, len(wl.query_requests), cfg.queries)
    prompts = [prompt_tokens(wl.query_requests[int(k)])[: cfg.prompt_tokens] for k in picks]
    bs_of = {n: int(v) for n, v in zip(wl.names, rng.integers(0, 33, len(wl.names)), strict=True)}
    queued_of = {n: int(v) for n, v in zip(wl.names, rng.integers(0, 16385, len(wl.names)), strict=True)}
    hashed = [block_hashes(p, cfg.block_size) for p in prompts]
    gc.collect()
    hash_cpu, _ = _timed(partial(block_hashes, page_size=cfg.block_size), prompts)
    walk_cpu, _ = _timed(index.match_hashes, hashed)
    match_cpu, match_wall = _timed(index.match, prompts)
    route_cpu, route_wall = _timed(partial(_route, index, bs_of, queued_of), prompts)
    hit = sum(max(index.match_hashes(h).cached_tokens.values()) for h in hashed)
    out = {
        "match_p50_us": _pct_us(match_cpu, 50),
        "match_p99_us": _pct_us(match_cpu, 99),
        "route_p50_us": _pct_us(route_cpu, 50),
        "route_p99_us": _pct_us(route_cpu, 99),
        "hash_p50_us": _pct_us(hash_cpu, 50),
        "walk_p50_us": _pct_us(walk_cpu, 50),
        "walk_p99_us": _pct_us(walk_cpu, 99),
        "match_p99_us_wall": _pct_us(match_wall, 99),
        "route_p99_us_wall": _pct_us(route_wall, 99),
        "match_hit_fraction": round(hit / sum(len(p) for p in prompts), 3),
    }
    say(
        f"match ({cfg.prompt_tokens}-token prompts, {cfg.queries} calls): p50 {out['match_p50_us']:.0f} us, "
        f"p99 {out['match_p99_us']:.0f} us (of which hashing p50 {out['hash_p50_us']:.0f} us, index walk "
        f"p50 {out['walk_p50_us']:.0f} / p99 {out['walk_p99_us']:.0f} us); wall p99 "
        f"{out['match_p99_us_wall']:.0f} us; the best instance holds {out['match_hit_fraction']:.1%} of "
        f"the prompt tokens"
    )
    say(
        f"route (hash + match + LMetric argmin over {len(wl.names)}): p50 {out['route_p50_us']:.0f} us, "
        f"p99 {out['route_p99_us']:.0f} us [target <= {TARGETS['route_p99_us']:.0f}]; wall p99 "
        f"{out['route_p99_us_wall']:.0f} us"
    )
    return out


def _churn_and_rare(wl: Workload, index: GlobalIndex, say: Callable[[str], None]) -> dict[str, Any]:
    evict, n_evict = eviction_payloads(wl, 0.6)
    before = index.total_blocks()
    cpu_s, _wall, longest = _apply_all(index, evict)
    say(
        f"evict (BlockRemoved payloads, 60 % of every instance, log compactions included): "
        f"{n_evict / cpu_s / 1e6:.2f} M blocks/s; longest call {longest / 1e6:.1f} ms; "
        f"{before - index.total_blocks():,} hashes gone"
    )
    big = max(wl.names, key=index.blocks_of)
    held = index.blocks_of(big)
    c = time.thread_time()
    dumped = index.dump(big)
    dump_s = time.thread_time() - c
    c = time.thread_time()
    index.remove_instance(big)
    remove_s = time.thread_time() - c
    say(
        f"rare ops on the largest instance ({held:,} blocks): dump {dump_s * 1e3:.0f} ms "
        f"({len(dumped):,} events), remove_instance {remove_s * 1e3:.0f} ms"
    )
    return {
        "evict_blocks_per_s": round(n_evict / cpu_s),
        "evict_longest_call_ms": round(longest / 1e6, 1),
        "dump_ms": round(dump_s * 1e3, 1),
        "dump_blocks": held,
        "remove_instance_ms": round(remove_s * 1e3, 1),
    }


def run(cfg: BenchConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, ingest, measure; ``say`` gets the human-readable lines. Returns the JSON figures."""
    t_start = time.perf_counter()
    reqs = load_trace(cfg.trace)
    wl = build_workload(reqs, cfg.instances, cfg.blocks, cfg.block_size, cfg.prompt_tokens)
    say(
        f"workload: the {len(reqs):,}-request Mooncake trace x {wl.tenants} tenant(s), {wl.requests:,} "
        f"requests -> {wl.events:,} BlockStored events in as many msgpack batches "
        f"({sum(len(p) for _, p in wl.payloads) / 1e6:,.0f} MB), built in {time.perf_counter() - t_start:.1f} s"
    )
    index, figures = _ingest(cfg, wl, say)
    figures.update(_latency(cfg, wl, index, say))
    figures.update(_churn_and_rare(wl, index, say))
    del index
    gc.collect()
    figures.update(
        {
            "timing": "thread CPU time (time.thread_time); *_wall figures are wall-clock",
            "instances": cfg.instances,
            "block_size": cfg.block_size,
            "prompt_tokens": cfg.prompt_tokens,
            "tenants": wl.tenants,
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "seconds": round(time.perf_counter() - t_start, 1),
        }
    )
    figures["targets_met"] = {
        "ingest_blocks_per_s": figures["ingest_blocks_per_s"] >= TARGETS["ingest_blocks_per_s"],
        "route_p99_us": figures["route_p99_us"] <= TARGETS["route_p99_us"],
        "bytes_per_block": figures["bytes_per_block"] <= TARGETS["bytes_per_block"],
    }
    say(
        f"machine: {figures['cpu']}, {figures['cpus']} CPUs, Python {figures['python']}; "
        f"{figures['seconds']} s in all"
    )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m launch.bench.index_bench``; returns the exit status."""
    cfg = parse_args(argv)

    def say(line: str) -> None:
        if not cfg.json_only:
            print(line, flush=True)

    print(json.dumps(run(cfg, say)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
