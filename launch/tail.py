"""``python -m launch tail``: print the cluster's ZeroMQ streams live, one line per event or report.

Agent streams: endpoints come from the cluster file written by ``launch cluster`` (``--cluster``, default
``cluster.json``) or from explicit ``--endpoint tcp://...`` flags (agent PUB sockets). Each KV event is
one line (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` with its block count), always; a
load report one line (running, waiting, batch size, queued prefill tokens, KV usage), but only when it
differs from the last one printed for its instance (an idle agent reports the same load every second),
and with ``--load-every S`` no sooner than S seconds after that one; heartbeats only with ``--type
heartbeat``.

Decision streams (``--type decision``): every router's decisions, one line per ``RequestRouted``
(instance, policy, prompt and new prefill tokens, LMetric score, speculative blocks) and per
``RequestFinished`` (status); ``--type router_heartbeat`` adds the routers' heartbeats (role, index
size, requests in flight). Endpoints are the routers' ``decisions`` endpoints in the cluster file (which
is re-read every second, so a standby started after a failover is followed too) or
``--decisions-endpoint`` flags. ``--instance`` filters decisions by the chosen instance.

``--json`` prints one JSON object per line instead. Malformed frames are counted and reported on
stderr, never fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from kvindex import protocol as wire
from kvindex.protocol.cluster_file import ClusterFile, ClusterFileError, read_cluster_file
from kvindex.transport import make_socket

AGENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared", "load", "heartbeat")
DECISION_TYPES = ("decision", "router_heartbeat")
TYPES = AGENT_TYPES + DECISION_TYPES


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
    p.add_argument(
        "--decisions-endpoint",
        action="append",
        default=[],
        help="a router's decision stream (repeatable; for --type decision); overrides --cluster",
    )
    p.add_argument("--instance", action="append", default=[], help="only this instance (repeatable)")
    p.add_argument(
        "--type",
        action="append",
        default=[],
        choices=TYPES,
        help="only this message type (repeatable); heartbeats are shown only when asked for; "
        "'decision' and 'router_heartbeat' read the routers' decision streams",
    )
    p.add_argument(
        "--load-every",
        type=float,
        default=0.0,
        metavar="S",
        help="print an instance's load report only if it changed since the last one printed and at "
        "least S seconds have passed since that one (default %(default)s: on every change)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--count", type=int, default=0, help="exit after printing this many lines (0 = run until Ctrl-C)"
    )
    p.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds (0 = no limit)")


def _read_cluster(path: Path) -> ClusterFile:
    try:
        return read_cluster_file(path)
    except FileNotFoundError:
        sys.exit(
            f"launch tail: no cluster file at {path}; start one with `python -m launch cluster` or pass --endpoint"
        )
    except (OSError, ClusterFileError) as exc:
        sys.exit(f"launch tail: cannot read {path}: {exc}")


def decision_endpoints_in(cluster: ClusterFile) -> list[str]:
    """Decision streams of the routers a cluster file lists (running ones)."""
    return cluster.endpoints("router-", "decisions", running_only=True)


def endpoints_from(args: argparse.Namespace) -> list[str]:
    """Agent PUB endpoints from ``--endpoint`` or the cluster file. Exits with a message if none."""
    if args.endpoint:
        return list(args.endpoint)
    eps = _read_cluster(args.cluster).endpoints("agent", "pub")
    if not eps:
        sys.exit(f"launch tail: {args.cluster} lists no agent endpoints")
    return eps


def decision_endpoints_from(args: argparse.Namespace) -> list[str]:
    """Routers' decision streams from ``--decisions-endpoint`` or the cluster file. Exits if none."""
    if args.decisions_endpoint:
        return list(args.decisions_endpoint)
    eps = decision_endpoints_in(_read_cluster(args.cluster))
    if not eps:
        sys.exit(f"launch tail: {args.cluster} lists no router decision streams")
    return eps


def render(seq: int, msg: wire.WireMessage) -> Iterator[dict[str, Any]]:
    """The printable records of one message: one per KV event, one per load report, heartbeat or
    decision-stream message."""
    if isinstance(msg, wire.RequestRouted | wire.RequestFinished | wire.RouterHeartbeat):
        yield render_decision(seq, msg)
    elif isinstance(msg, wire.EventBatch):
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


def render_decision(
    seq: int, msg: wire.RequestRouted | wire.RequestFinished | wire.RouterHeartbeat
) -> dict[str, Any]:
    """The record of one decision-stream message (type ``decision`` or ``router_heartbeat``)."""
    rec: dict[str, Any] = {"router": f"{msg.router_epoch:x}", "seq": seq, "ts": msg.ts}
    if isinstance(msg, wire.RouterHeartbeat):
        rec.update(type="router_heartbeat", instance=None, role=msg.role, http=msg.http, pid=msg.pid)
        rec.update(index_blocks=msg.index_blocks, speculative_blocks=msg.speculative_blocks)
        rec.update(inflight=msg.inflight, instances_routable=msg.instances_routable)
        return rec
    rec.update(type="decision", event=type(msg).__name__, instance=msg.instance)
    rec.update(request_id=msg.request_id, ticket=msg.ticket)
    if isinstance(msg, wire.RequestRouted):
        rec.update(policy=msg.policy, prompt_tokens=msg.prompt_tokens, new_tokens=msg.new_tokens)
        rec.update(cached_tokens=msg.prompt_tokens - msg.new_tokens, score=msg.score)
        rec.update(blocks=len(msg.block_hashes), failure_cases=list(msg.failure_cases))
        rec["block_hashes"] = list(msg.block_hashes)
    else:
        rec["status"] = msg.status
    return rec


LOAD_FIELDS = ("running", "waiting", "queued_prefill_tokens", "kv_used_tokens", "kv_capacity_tokens")
"""What a load report says; its ``seq`` and ``ts`` change every time and do not count as a change."""


class LoadFilter:
    """Which load reports ``tail`` prints: per instance, one that differs from the last printed (in
    :data:`LOAD_FIELDS`) and comes at least ``every`` seconds after it. Mutates only itself; pure."""

    def __init__(self, every: float = 0.0) -> None:
        if every < 0:
            raise ValueError("every must be >= 0 seconds")
        self.every = every
        self._last: dict[str, tuple[tuple[Any, ...], float]] = {}  # instance -> (fields, printed at)

    def wants(self, rec: dict[str, Any], now: float) -> bool:
        """Whether to print the load record ``rec`` (from :func:`render`) seen at ``now`` (seconds,
        monotonic); if so, it becomes its instance's last printed one."""
        fields = tuple(rec[k] for k in LOAD_FIELDS)
        last = self._last.get(rec["instance"])
        if last is not None and (last[0] == fields or now - last[1] < self.every):
            return False
        self._last[rec["instance"]] = (fields, now)
        return True


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def human_decision(rec: dict[str, Any]) -> str:
    """One human-readable line for a record from :func:`render_decision`."""
    head = f"{_clock(rec['ts'])}  router={rec['router'][:8]} seq={rec['seq']:<7}"
    if rec["type"] == "router_heartbeat":
        return (
            f"{head} {'RouterHeartbeat':<16} role={rec['role']} http={rec['http']} pid={rec['pid']} "
            f"index={rec['index_blocks']} speculative={rec['speculative_blocks']} "
            f"inflight={rec['inflight']} routable={rec['instances_routable']}"
        )
    if rec["event"] == "RequestFinished":
        return f"{head} {'RequestFinished':<16} instance={rec['instance']} status={rec['status']} id={rec['request_id']}"
    fails = f" failure_cases={','.join(rec['failure_cases'])}" if rec["failure_cases"] else ""
    return (
        f"{head} {'RequestRouted':<16} instance={rec['instance']} policy={rec['policy']} "
        f"prompt={rec['prompt_tokens']} new={rec['new_tokens']} score={rec['score']:.0f} "
        f"speculative_blocks={rec['blocks']} id={rec['request_id']}{fails}"
    )


def human(rec: dict[str, Any]) -> str:
    """One human-readable line for a record from :func:`render`."""
    if rec["type"] in DECISION_TYPES:
        return human_decision(rec)
    t = _clock(rec["ts"])
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
    want_types = set(args.type) or {"BlockStored", "BlockRemoved", "AllBlocksCleared", "load"}
    want_inst = set(args.instance)
    if args.load_every < 0:
        sys.exit("launch tail: --load-every must be >= 0 seconds")
    loads = LoadFilter(args.load_every)
    agent_eps = endpoints_from(args) if want_types & set(AGENT_TYPES) else []
    router_eps = decision_endpoints_from(args) if want_types & set(DECISION_TYPES) else []
    follow_file = bool(router_eps) and not args.decisions_endpoint
    sub: zmq.Socket[bytes] = make_socket(zmq.Context.instance(), zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    connected: set[str] = set()
    for ep in agent_eps + router_eps:
        sub.connect(ep)
        connected.add(ep)
    if agent_eps:
        print(f"tailing {len(agent_eps)} agent(s): {' '.join(agent_eps)}", file=sys.stderr, flush=True)
    if router_eps:
        print(f"tailing {len(router_eps)} router(s): {' '.join(router_eps)}", file=sys.stderr, flush=True)
    next_reread = time.monotonic() + 1.0
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
            if follow_file and time.monotonic() >= next_reread:  # a new standby after a failover
                next_reread = time.monotonic() + 1.0
                with contextlib.suppress(OSError, ValueError):
                    for ep in decision_endpoints_in(read_cluster_file(args.cluster)):
                        if ep not in connected:
                            sub.connect(ep)
                            connected.add(ep)
                            print(f"tailing router {ep}", file=sys.stderr, flush=True)
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
                if rec["type"] == "load" and not loads.wants(rec, time.monotonic()):
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
