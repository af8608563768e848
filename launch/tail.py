"""``python -m launch tail``: print the agents' ZeroMQ streams live, one line per event or report.

Endpoints come from the cluster file written by ``launch cluster`` (``--cluster``, default
``cluster.json``) or from explicit ``--endpoint tcp://...`` flags (agent PUB sockets). Each KV event is
one line (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` with its block count), each load
report one line (running, waiting, batch size, queued prefill tokens, KV usage); heartbeats only with
``--type heartbeat``. ``--json`` prints one JSON object per line instead. Malformed frames are counted
and reported on stderr, never fatal.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from kvindex import wire

TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared", "load", "heartbeat")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``tail`` subcommand's flags."""
    p.add_argument(
        "--cluster",
        type=Path,
        default=Path("cluster.json"),
        help="cluster file from launch cluster (default %(default)s)",
    )
    p.add_argument(
        "--endpoint", action="append", default=[], help="agent PUB endpoint (repeatable); overrides --cluster"
    )
    p.add_argument("--instance", action="append", default=[], help="only this instance (repeatable)")
    p.add_argument(
        "--type",
        action="append",
        default=[],
        choices=TYPES,
        help="only this message type (repeatable); heartbeats are shown only when asked for",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--count", type=int, default=0, help="exit after printing this many lines (0 = run until Ctrl-C)"
    )
    p.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds (0 = no limit)")


def endpoints_from(args: argparse.Namespace) -> list[str]:
    """Agent PUB endpoints from ``--endpoint`` or the cluster file. Exits with a message if none."""
    if args.endpoint:
        return list(args.endpoint)
    try:
        cluster = json.loads(args.cluster.read_text())
    except FileNotFoundError:
        sys.exit(
            f"launch tail: no cluster file at {args.cluster}; start one with `python -m launch cluster` or pass --endpoint"
        )
    except (OSError, json.JSONDecodeError) as exc:
        sys.exit(f"launch tail: cannot read {args.cluster}: {exc}")
    eps = [
        p["endpoints"]["pub"]
        for p in cluster.get("processes", [])
        if p.get("role") == "agent" and "pub" in p.get("endpoints", {})
    ]
    if not eps:
        sys.exit(f"launch tail: {args.cluster} lists no agent endpoints")
    return eps


def render(seq: int, msg: wire.ClusterMessage) -> Iterator[dict[str, Any]]:
    """The printable records of one message: one per KV event, one per load report or heartbeat."""
    if isinstance(msg, wire.EventBatch):
        for ev in msg.events:
            rec: dict[str, Any] = {
                "instance": msg.instance,
                "seq": seq,
                "ts": msg.ts,
                "type": type(ev).__name__,
            }
            if isinstance(ev, wire.BlockStored | wire.BlockRemoved):
                rec["blocks"] = len(ev.block_hashes)
                rec["block_hashes"] = list(ev.block_hashes)
            if isinstance(ev, wire.BlockStored):
                rec["parent_block_hash"] = ev.parent_block_hash
                rec["block_size"] = ev.block_size
            yield rec
    elif isinstance(msg, wire.LoadReport):
        yield {
            "instance": msg.instance,
            "seq": seq,
            "ts": msg.ts,
            "type": "load",
            "running": msg.running,
            "waiting": msg.waiting,
            "batch_size": msg.batch_size,
            "queued_prefill_tokens": msg.queued_prefill_tokens,
            "kv_used_tokens": msg.kv_used_tokens,
            "kv_capacity_tokens": msg.kv_capacity_tokens,
        }
    elif isinstance(msg, wire.Heartbeat):
        yield {
            "instance": msg.instance,
            "seq": seq,
            "ts": msg.ts,
            "type": "heartbeat",
            "engine_healthy": msg.engine_healthy,
            "cached_blocks": msg.cached_blocks,
            "engine_url": msg.engine_url,
        }


def human(rec: dict[str, Any]) -> str:
    """One human-readable line for a record from :func:`render`."""
    t = time.strftime("%H:%M:%S", time.localtime(rec["ts"])) + f".{int(rec['ts'] * 1000) % 1000:03d}"
    head = f"{t}  instance={rec['instance']:<4} seq={rec['seq']:<7} {rec['type']:<16}"
    typ = rec["type"]
    if typ in ("BlockStored", "BlockRemoved"):
        return f"{head} blocks={rec['blocks']}"
    if typ == "load":
        cap = rec["kv_capacity_tokens"] or 1
        return (
            f"{head} bs={rec['batch_size']} (running={rec['running']} waiting={rec['waiting']}) "
            f"queued_prefill={rec['queued_prefill_tokens']} kv={100.0 * rec['kv_used_tokens'] / cap:.1f}%"
        )
    if typ == "heartbeat":
        return f"{head} engine_healthy={rec['engine_healthy']} cached_blocks={rec['cached_blocks']}"
    return head


def run_tail(args: argparse.Namespace) -> int:
    """Subscribe and print until Ctrl-C, ``--count`` lines, or ``--timeout``. Returns the exit code."""
    eps = endpoints_from(args)
    want_types = set(args.type) or {"BlockStored", "BlockRemoved", "AllBlocksCleared", "load"}
    want_inst = set(args.instance)
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    for ep in eps:
        sub.connect(ep)
    print(f"tailing {len(eps)} agent(s): {' '.join(eps)}", file=sys.stderr, flush=True)
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    bad: Counter[str] = Counter()
    printed = 0
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    try:
        while not stopping:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not sub.poll(200):
                continue
            frames = sub.recv_multipart()
            try:
                _topic, seq, payload = wire.split_frame(frames)
                msg = wire.decode_message(payload)
            except wire.WireError as exc:
                bad[exc.reason] += 1
                print(f"skipped malformed frame ({exc}); so far {dict(bad)}", file=sys.stderr, flush=True)
                continue
            for rec in render(seq, msg):
                if rec["type"] not in want_types or (want_inst and rec["instance"] not in want_inst):
                    continue
                if not args.json:
                    rec.pop("block_hashes", None)
                print(json.dumps(rec) if args.json else human(rec), flush=True)
                printed += 1
                if args.count and printed >= args.count:
                    return 0
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    finally:
        sub.close()
    return 0
