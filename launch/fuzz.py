"""``python -m launch fuzz``: hypothesis over every decoder of network input, and raw malformed HTTP at a
live router. A benchmark: examples, crashes and memory per target.

Targets (each gets ``--examples`` examples; strategies in :mod:`launch.fuzz_strategies`, shared with
tests/test_frame_fuzz.py):

* ZeroMQ decoders: the agent's SGLang KV, LoadStat and snapshot-request frames, SGLang replay replies,
  agent snapshot replies, the router's agent-stream subscriber feeding a routing model, the decision
  stream feeding a standby's mirror and the fence;
* HTTP bodies: JSON decoding then the ``generate``/``completions``/``chat`` parsers;
* ``http_raw``: bytes at a live ``python -m router`` (random request heads, truncated requests, huge
  headers, bodies shorter than their Content-Length), then slow senders holding connections while
  ``/health`` is probed; each slow sender must then get 408 after the router's ``--client-body-timeout``.
  The router must keep answering and its RSS stay bounded.

A *crash* is an exception other than the target's documented error (counted, the first few printed with
their input), or a dead or unresponsive router. Exit status 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SLOW_BODY_TIMEOUT = 2.0
"""The live router's ``--client-body-timeout``: the slow senders must get their 408 after it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=int, default=100_000, help="examples per target (default %(default)s)")
    p.add_argument("--targets", default="", help="comma-separated subset of targets (default: all)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default %(default)s)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")


@dataclass
class Result:
    target: str
    examples: int = 0
    crashes: int = 0
    seconds: float = 0.0
    rss_growth_mb: float = 0.0
    samples: list[str] = field(default_factory=list)

    def crash(self, what: str) -> None:
        self.crashes += 1
        if len(self.samples) < 3:
            self.samples.append(what[:300])


def _rss_mb(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _decoder_targets() -> dict[str, tuple[Any, Callable[[Any], None]]]:
    """name -> (strategy, check); check raises only on a crash (an undocumented exception)."""
    from hypothesis import strategies as st

    from agents.agent.frames import decode_kv_frame, decode_load_frame, decode_snapshot_request
    from kvindex import protocol as wire
    from kvindex.protocol.http import PARSERS, RequestError
    from kvindex.protocol.numbered import SnapshotError, parse_snapshot_reply
    from launch import fuzz_strategies as fs
    from router.decisions import DecisionSubscriber
    from router.fence import Fence
    from router.model.config import ModelConfig
    from router.model.mirror import DecisionMirror
    from router.model.model import RoutingModel
    from router.subscriber import Subscriber

    def only(exc: type[BaseException], fn: Callable[[], Any]) -> None:
        with contextlib.suppress(exc):
            fn()

    core = RoutingModel(ModelConfig(block_size=fs.BS), lambda job: None)
    agent_sub = Subscriber([], core.on_message)
    standby = RoutingModel(ModelConfig(block_size=fs.BS), lambda job: None)
    mirror = DecisionMirror(standby)
    fence = Fence(1, 99, 0.4)

    def on_decision(rec: Any) -> None:
        mirror.on_message(rec)
        if isinstance(rec.msg, wire.RouterHeartbeat):
            fence.observe(rec.msg)

    decision_sub = DecisionSubscriber.__new__(DecisionSubscriber)
    # a subscriber without sockets: only its frame handling is used
    from kvindex.protocol.numbered import DECISION_TOPIC_OF, DecisionReceived, router_epoch
    from kvindex.transport import NumberedSubscriber

    NumberedSubscriber.__init__(
        decision_sub,
        [],
        on_decision,
        topic_of=DECISION_TOPIC_OF,
        epoch_of=router_epoch,
        make=DecisionReceived,
    )

    def agent_stream(x: tuple[str, list[bytes]]) -> None:
        rec = agent_sub.handle_frames(*x)
        if rec is not None:
            core.on_message(rec)
        core.tick()

    def decisions(x: tuple[str, list[bytes]]) -> None:
        rec = decision_sub.handle_frames(*x)
        if rec is not None:
            on_decision(rec)

    def http_body(x: tuple[str, Any, bool]) -> None:
        endpoint, body, as_bytes = x
        if as_bytes:
            try:
                body = json.loads(body)
            except ValueError:
                return
        only(RequestError, lambda: PARSERS[endpoint](body))

    raw_json = st.binary(max_size=60) | fs.HTTP_BODIES.map(
        lambda b: json.dumps(b, default=repr).encode("utf-8", "surrogatepass")
    )
    eps = st.sampled_from(["tcp://a", "tcp://b"])
    return {
        "agent_kv_frame": (fs.frames_of([b"kv"], fs.KV_PAYLOADS), lambda f: only(wire.WireError, lambda: decode_kv_frame(f, b"kv"))),
        "agent_load_frame": (fs.frames_of([b"load"], fs.LOAD_PAYLOADS), lambda f: only(wire.WireError, lambda: decode_load_frame(f, b"load"))),
        "agent_snapshot_request": (
            st.lists(st.binary(max_size=12), max_size=5) | st.tuples(st.binary(max_size=4), st.just(b""), fs.CLUSTER_PAYLOADS).map(list),
            lambda f: only(wire.WireError, lambda: decode_snapshot_request(f)),
        ),
        "sglang_replay_reply": (
            st.lists(st.binary(max_size=12), max_size=6) | st.tuples(st.just(b""), st.sampled_from([b"kv", b""]), fs.SEQ_FRAMES, fs.KV_PAYLOADS).map(list),
            lambda f: only(wire.WireError, lambda: wire.parse_replay_reply(f)),
        ),
        "agent_snapshot_reply": (
            st.lists(st.binary(max_size=12), max_size=4) | st.tuples(st.just(b""), fs.CLUSTER_PAYLOADS).map(list),
            lambda f: only(SnapshotError, lambda: parse_snapshot_reply(f)),
        ),
        "router_agent_stream": (st.tuples(eps, fs.frames_of(list(wire.CLUSTER_TOPICS), fs.CLUSTER_PAYLOADS)), agent_stream),
        "decision_stream_mirror": (st.tuples(eps, fs.frames_of(list(wire.DECISION_TOPICS), fs.DECISION_PAYLOADS)), decisions),
        "http_bodies": (
            st.tuples(st.sampled_from(sorted(PARSERS)), fs.HTTP_BODIES | raw_json, st.booleans()).map(
                lambda t: (t[0], t[1], isinstance(t[1], bytes))
            ),
            http_body,
        ),
    }  # fmt: skip


def run_decoder(name: str, strategy: Any, check: Callable[[Any], None], n: int, seed: int) -> Result:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    res = Result(name)
    rss0 = _rss_mb()

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(x: Any) -> None:
        res.examples += 1
        try:
            check(x)
        except Exception as exc:  # a crash: counted, the run goes on
            res.crash(f"{type(exc).__name__}: {exc} <- {x!r}")

    t0 = time.monotonic()
    prop()
    res.seconds = time.monotonic() - t0
    res.rss_growth_mb = _rss_mb() - rss0
    return res


# ------------------------------------------------------------------------------------ raw HTTP, live


def _start_router() -> tuple[subprocess.Popen[str], str, int]:
    cmd = [sys.executable, "-m", "router", "--port", "0", "--warmup-timeout", "0", "--decisions-port", "off"]
    cmd += ["--client-body-timeout", str(SLOW_BODY_TIMEOUT)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    from kvindex.protocol.ready import parse_ready

    for line in proc.stdout:
        ready = parse_ready(line)
        if ready is not None:
            url = ready.endpoints["http"]
            host, port = url.split("//", 1)[1].rsplit(":", 1)
            return proc, host, int(port)
    raise RuntimeError("the router did not start")


def _exchange(host: str, port: int, data: bytes, close_early: bool) -> None:
    with socket.create_connection((host, port), timeout=2) as s:
        try:
            s.sendall(data)
            if close_early:
                return
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (TimeoutError, OSError):
            pass


def _health(host: str, port: int, tries: int = 3) -> bool:
    """Whether the router answers ``GET /health`` (3 tries of 5 s: the machine may be busy)."""
    for _ in range(tries):
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 "):
                    return True
        except OSError:
            pass
    return False


def run_http_raw(n: int, seed: int) -> Result:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    from launch.fuzz_strategies import HTTP_BODIES

    res = Result("http_raw")
    proc, host, port = _start_router()
    try:
        rss0 = _rss_mb(proc.pid)
        paths = st.sampled_from(
            [
                "/generate",
                "/v1/completions",
                "/v1/chat/completions",
                "/health",
                "/metrics",
                "/router/state",
                "/x",
            ]
        )
        header = st.tuples(st.text(max_size=12), st.text(max_size=30))
        head = st.builds(
            lambda m, p, hs, body, cl, huge: (
                f"{m} {p} HTTP/1.1\r\nHost: x\r\n".encode("utf-8", "replace")
                + b"".join(f"{k}: {v}\r\n".encode("utf-8", "replace") for k, v in hs)
                + (b"X-Huge: " + b"a" * huge + b"\r\n" if huge else b"")
                + f"Content-Length: {cl if cl is not None else len(body)}\r\n\r\n".encode()
                + body
            ),
            st.sampled_from(["GET", "POST", "PUT", "G\x00T", ""]),
            paths,
            st.lists(header, max_size=4),
            HTTP_BODIES.map(lambda b: json.dumps(b, default=repr).encode("utf-8", "surrogatepass"))
            | st.binary(max_size=64),
            st.none() | st.integers(-1, 10**12),
            st.sampled_from([0, 0, 0, 9000, 70000]),
        )
        cases = st.tuples(head | st.binary(max_size=200), st.integers(0, 200), st.booleans())

        @hseed(seed)
        @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(cases)
        def prop(x: tuple[bytes, int, bool]) -> None:
            data, cut, close_early = x
            res.examples += 1
            _exchange(host, port, data[: len(data) - cut] if cut < len(data) else data, close_early)
            if res.examples % 500 == 0 and not _health(host, port):
                res.crash(f"router stopped answering after {data[:120]!r}")

        t0 = time.monotonic()
        prop()
        # slow senders: many connections dribbling a request; the router keeps serving others
        slow = []
        for _ in range(50):
            s = socket.create_connection((host, port), timeout=2)
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            slow.append(s)
        res.examples += 50
        if not _health(host, port):
            res.crash("router stopped answering with 50 slow senders connected")
        for s in slow:  # each is answered 408 once its body stalled for SLOW_BODY_TIMEOUT, then closed
            s.settimeout(SLOW_BODY_TIMEOUT + 10)
            try:
                answer = s.recv(64)
            except OSError as exc:
                answer = repr(exc).encode()
            if not answer.startswith(b"HTTP/1.1 408"):
                res.crash(f"a slow sender got {answer[:40]!r}, not 408 after --client-body-timeout")
            s.close()
        res.seconds = time.monotonic() - t0
        if proc.poll() is not None or not _health(host, port):
            res.crash(f"router dead or silent at the end (exit {proc.poll()})")
        res.rss_growth_mb = _rss_mb(proc.pid) - rss0 if proc.poll() is None else 0.0
    finally:
        proc.kill()
        proc.wait(10)
    return res


def run_fuzz(args: argparse.Namespace) -> int:
    """Run every target; print a table; 1 if anything crashed."""
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        print("launch fuzz needs hypothesis: pip install -e '.[test]'", file=sys.stderr)
        return 2
    import logging

    logging.disable(logging.WARNING)  # the decoders log (rate-limited) what they skip
    wanted = {t for t in args.targets.split(",") if t}
    results = []
    for name, (strategy, check) in _decoder_targets().items():
        if not wanted or name in wanted:
            results.append(run_decoder(name, strategy, check, args.examples, args.seed))
            print(_row(results[-1]), flush=True)
    if not wanted or "http_raw" in wanted:
        results.append(run_http_raw(args.examples, args.seed))
        print(_row(results[-1]), flush=True)
    total = sum(r.crashes for r in results)
    print(f"{len(results)} targets, {sum(r.examples for r in results)} examples, {total} crashes")
    for r in results:
        for s in r.samples:
            print(f"  {r.target}: {s}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([vars(r) for r in results], indent=2) + "\n")
    return 1 if total else 0


def _row(r: Result) -> str:
    return (
        f"{r.target:<24} {r.examples:>8} examples {r.crashes:>4} crashes {r.seconds:>8.1f} s "
        f"RSS +{r.rss_growth_mb:.1f} MB"
    )
