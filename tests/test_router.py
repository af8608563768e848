"""The router: its core fed frames without sockets, then the whole process in-memory with fake peers.

Fake agents are a ZeroMQ PUB (heartbeats, load reports, event batches made with :mod:`kvindex.protocol`) and a
ROUTER answering snapshot requests; fake engines are tiny aiohttp apps that record what they receive.
Everything binds OS-assigned ports on 127.0.0.1. Waits are bounded polls; no assertion is on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
import zmq
import zmq.asyncio
from aiohttp import web

from kvindex.hashing import block_hashes
from kvindex.protocol import (
    TOPIC_EVENTS,
    TOPIC_HEARTBEAT,
    TOPIC_LOAD,
    BlockStored,
    EventBatch,
    Heartbeat,
    KVEvent,
    LoadReport,
    Snapshot,
    SnapshotRequest,
    decode_message,
    encode_message,
    make_frame,
)
from router.cli import parse_args
from router.config import RouterConfig
from router.forward import SseEventCounter
from router.model.model import NoLiveInstance, RoutingModel, SnapshotJob
from router.server import RouterServer
from router.subscriber import Subscriber

pytestmark = pytest.mark.timeout(30)

BS = 4
MODEL = "test-model"
PROMPT = "the quick brown fox jumps over the lazy dog!!!!!"  # 48 bytes = 12 blocks of 4


def stored(text: str, bs: int = BS) -> BlockStored:
    """A BlockStored event of every full page of ``text`` (built-in tokenizer: one token per byte)."""
    toks = list(text.encode())
    hashes = block_hashes(toks, bs)
    return BlockStored(tuple(hashes), None, tuple(toks[: len(hashes) * bs]), bs)


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------ core without sockets


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_000_000.0 + self.t


class Feed:
    """Frames of one fake agent, decoded by a real Subscriber (no sockets) and fed to the core."""

    def __init__(self, core: RoutingModel, sub: Subscriber, name: str, clock: Clock) -> None:
        self.core, self.sub, self.name, self.clock = core, sub, name, clock
        self.endpoint = f"tcp://agent-{name}"
        self.epoch = 1
        self.seq = 0

    def send(self, topic: bytes, msg: Any) -> None:
        rec = self.sub.handle_frames(self.endpoint, make_frame(topic, self.seq, encode_message(msg)))
        self.seq += 1
        assert rec is not None
        self.core.on_message(rec)

    def hb(self, healthy: bool = True, block_size: int = BS) -> None:
        self.send(
            TOPIC_HEARTBEAT,
            Heartbeat(
                self.name, self.epoch, self.clock.wall(), f"http://{self.name}", healthy, block_size, 0, MODEL,
                f"tcp://snap-{self.name}",
            ),
        )  # fmt: skip

    def load(self, running: int = 0, waiting: int = 0, queued: int = 0, ts: float | None = None) -> None:
        ts = self.clock.wall() if ts is None else ts
        self.send(TOPIC_LOAD, LoadReport(self.name, self.epoch, ts, running, waiting, queued, 0, 1000, 0))

    def events(self, *evs: KVEvent) -> None:
        self.send(TOPIC_EVENTS, EventBatch(self.name, self.epoch, self.seq, self.clock.wall(), evs))

    def snapshot(self, *evs: KVEvent, seq: int | None = None) -> Snapshot:
        return Snapshot(self.name, self.epoch, self.seq - 1 if seq is None else seq, BS, evs)


@dataclass
class CoreRig:
    core: RoutingModel
    clock: Clock
    jobs: list[SnapshotJob] = field(default_factory=list)

    def feed(self, name: str) -> Feed:
        return Feed(self.core, self.sub, name, self.clock)

    def __post_init__(self) -> None:
        self.sub = Subscriber([], self.core.on_message, ctx=zmq.asyncio.Context.instance())

    def last_job(self, name: str) -> SnapshotJob:
        return [j for j in self.jobs if j.instance == name][-1]


def make_rig(**cfg: Any) -> CoreRig:
    clock = Clock()
    jobs: list[SnapshotJob] = []
    core = RoutingModel(RouterConfig(**cfg).model, jobs.append, mono=clock.mono, wall=clock.wall)
    return CoreRig(core, clock, jobs)


def sync(rig: CoreRig, feed: Feed, *evs: KVEvent) -> None:
    feed.hb()
    assert rig.core.on_snapshot(rig.last_job(feed.name), feed.snapshot(*evs))


def test_core_first_heartbeat_learns_block_size_and_resyncs() -> None:
    rig = make_rig()
    a = rig.feed("a")
    a.events(stored(PROMPT))  # before any heartbeat: dropped, the snapshot covers it
    assert rig.core.stats.batches_dropped == 1
    a.hb()
    assert rig.core.block_size == BS
    st = rig.core.table.get("a")
    assert st is not None and st.up and st.sync == "resyncing" and not st.is_routable
    assert rig.jobs == [SnapshotJob("a", "tcp://snap-a", rig.jobs[0].generation)]
    with pytest.raises(NoLiveInstance):
        rig.core.route(list(PROMPT.encode()))
    assert rig.core.on_snapshot(rig.jobs[0], a.snapshot(stored(PROMPT)))
    assert st.is_routable
    assert rig.core.index is not None and rig.core.index.blocks_of("a") == 12
    assert rig.core.stats.resyncs[("a", "first")] == 1


def test_core_applies_frames_buffered_during_resync_after_the_snapshot() -> None:
    rig = make_rig()
    a = rig.feed("a")
    a.hb()  # seq 0: starts the resync
    snap = a.snapshot(stored(PROMPT[:16]))  # taken at seq 0
    a.events(stored(PROMPT[:32]))  # seq 1, arrives before the snapshot answer
    assert rig.core.on_snapshot(rig.jobs[0], snap)
    assert rig.core.index is not None and rig.core.index.blocks_of("a") == 8


def test_core_refetches_when_a_frame_after_the_snapshot_was_lost() -> None:
    rig = make_rig()
    a = rig.feed("a")
    a.hb()  # seq 0
    snap = a.snapshot()
    a.seq += 1  # seq 1 lost
    a.load()  # seq 2
    assert not rig.core.on_snapshot(rig.jobs[0], snap)
    assert len(rig.jobs) == 2 and rig.core.stats.snapshot_failures["gap_after_snapshot"] == 1
    assert rig.core.on_snapshot(rig.jobs[1], a.snapshot())
    # the superseded job's answer is stale
    assert not rig.core.on_snapshot(rig.jobs[0], a.snapshot())
    assert rig.core.stats.stale_snapshots == 1


def test_core_fetches_one_snapshot_at_a_time_per_instance() -> None:
    rig = make_rig()
    a = rig.feed("a")
    a.hb()  # job 1 in flight
    a.epoch, a.seq = 2, 0
    a.hb()  # the agent restarted meanwhile: a new resync, whose fetch waits for job 1's answer
    assert len(rig.jobs) == 1 and rig.core.stats.resyncs[("a", "epoch")] == 1
    assert not rig.core.on_snapshot(rig.jobs[0], Snapshot("a", 1, 0, BS, ()))
    assert len(rig.jobs) == 2
    rig.core.tick()
    assert len(rig.jobs) == 2
    assert rig.core.on_snapshot(rig.jobs[1], a.snapshot())


def test_core_retries_a_failed_snapshot_fetch() -> None:
    rig = make_rig()
    a = rig.feed("a")
    a.hb()
    rig.core.on_snapshot_failed(rig.jobs[0], "timeout")
    rig.core.tick()
    assert len(rig.jobs) == 1  # not before the retry delay
    rig.clock.t += 1.0
    a.hb()
    rig.core.tick()
    assert len(rig.jobs) == 2 and rig.core.stats.snapshot_failures["timeout"] == 1
    assert rig.core.on_snapshot(rig.jobs[1], a.snapshot())


def test_core_seq_gap_and_epoch_change_trigger_resync() -> None:
    rig = make_rig()
    a = rig.feed("a")
    sync(rig, a)
    a.seq += 3
    a.events(stored(PROMPT))
    st = rig.core.table.get("a")
    assert st is not None and st.sync == "resyncing"
    assert rig.core.stats.resyncs[("a", "gap")] == 1
    assert rig.core.on_snapshot(rig.last_job("a"), a.snapshot(stored(PROMPT)))
    a.epoch, a.seq = 2, 0  # agent restart
    a.hb()
    assert st.sync == "resyncing" and rig.core.stats.resyncs[("a", "epoch")] == 1
    old = a.snapshot()
    old = Snapshot("a", 1, old.seq, BS, ())
    assert not rig.core.on_snapshot(rig.last_job("a"), old)  # from the previous agent life
    assert rig.core.on_snapshot(rig.last_job("a"), a.snapshot())
    assert rig.core.index is not None and rig.core.index.blocks_of("a") == 0


def test_core_heartbeat_timeout_and_unhealthy_engine_take_instance_down() -> None:
    rig = make_rig(heartbeat_timeout=1.0)
    a, b = rig.feed("a"), rig.feed("b")
    sync(rig, a, stored(PROMPT))
    sync(rig, b)
    rig.clock.t += 0.6
    b.hb()
    rig.clock.t += 0.6
    rig.core.tick()
    sa, sb = rig.core.table.get("a"), rig.core.table.get("b")
    assert sa is not None and sb is not None
    assert not sa.up and sa.down_reason == "heartbeat_timeout" and sb.is_routable
    assert rig.core.index is not None and rig.core.index.blocks_of("a") == 0
    assert rig.core.route(list(PROMPT.encode())).instance == "b"
    b.hb(healthy=False)
    assert not sb.up and sb.down_reason == "engine_unhealthy"
    a.hb()  # back up: resync before routable again
    assert sa.up and sa.sync == "resyncing" and rig.core.stats.resyncs[("a", "back_up")] == 1


def test_core_refuses_mismatching_block_size() -> None:
    rig = make_rig(block_size=BS)
    a, c = rig.feed("a"), rig.feed("c")
    sync(rig, a)
    c.hb(block_size=8)
    sc = rig.core.table.get("c")
    assert sc is not None and sc.refused and not sc.up and not sc.is_routable
    assert [j.instance for j in rig.jobs] == ["a"]


def test_core_pending_dispatches_count_until_a_later_load_report() -> None:
    rig = make_rig(load_coverage_margin=0.02)
    a, b = rig.feed("a"), rig.feed("b")
    sync(rig, a)
    sync(rig, b)
    toks = list(PROMPT.encode())
    r1 = rig.core.route(toks)
    r2 = rig.core.route(toks[::-1])
    assert {r1.instance, r2.instance} == {"a", "b"}  # the first dispatch made its instance look busier
    s1 = rig.core.table.get(r1.instance)
    assert s1 is not None
    v = s1.view()
    assert (v.batch_size, v.queued_prefill_tokens, v.inflight) == (1, r1.decision.new_tokens, 1)
    assert s1.queued_prefill_tokens == v.queued_prefill_tokens  # what the in-flight limits read
    feed1 = a if r1.instance == "a" else b
    feed1.load(ts=rig.clock.wall())  # not later than dispatch + margin: still pending
    assert s1.view().batch_size == 1
    feed1.load(running=1, ts=rig.clock.wall() + 0.05)
    assert s1.view().batch_size == 1 and len(s1.pending) == 0 and s1.inflight == 1
    rig.core.finish(r1.instance, r1.ticket)
    assert s1.inflight == 0
    # the speculative entry makes the same prompt stick to the first instance
    assert rig.core.route(toks).decision.cached_tokens == len(toks)


def test_core_suspect_instance_waits_for_a_heartbeat_after_the_cooldown() -> None:
    rig = make_rig(suspect_cooldown=0.5)
    a = rig.feed("a")
    sync(rig, a)
    rig.core.mark_suspect("a")
    st = rig.core.table.get("a")
    assert st is not None and not st.is_routable
    rig.clock.t += 0.1
    a.hb()
    assert not st.is_routable
    rig.clock.t += 0.5
    a.hb()
    assert st.is_routable


def test_subscriber_tracks_discontinuities_and_counts_malformed_frames() -> None:
    got: list[Any] = []
    sub = Subscriber([], got.append, ctx=zmq.asyncio.Context.instance())
    lr = LoadReport("a", 1, 0.0, 0, 0, 0, 0, 0, 0)

    def frame(seq: int, msg: Any = lr, topic: bytes = TOPIC_LOAD) -> list[bytes]:
        return make_frame(topic, seq, encode_message(msg))

    kinds = [sub.handle_frames("e", frame(s)) for s in (5, 6, 9, 2)]
    kinds.append(sub.handle_frames("e", frame(3, LoadReport("a", 2, 0.0, 0, 0, 0, 0, 0, 0))))
    assert [k.discontinuity for k in kinds if k is not None] == ["first", None, "gap", "seq_back", "epoch"]
    assert sub.stats.lost_frames == 2
    assert sub.handle_frames("e", [b"load", b"x"]) is None
    assert sub.handle_frames("e", [b"load", b"\0" * 8, b"\xc1"]) is None
    assert sub.handle_frames("e", frame(4, topic=TOPIC_HEARTBEAT)) is None
    assert sub.handle_frames("e", frame(4, SnapshotRequest())) is None
    assert sub.handle_frames("e", [b"load", b"\0" * 7, b""]) is None
    assert dict(sub.stats.malformed) == {
        "bad_frame_count": 1,
        "bad_msgpack": 1,
        "topic_mismatch": 1,
        "unexpected_type": 1,
        "bad_seq": 1,
    }


def test_sse_event_counter_handles_arbitrary_cuts() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream) - 1):
        c = SseEventCounter()
        c.feed(stream[:cut], 1.0)
        assert not c.done
        c.feed(stream[cut:], 2.0)
        assert c.events == 2 and c.done


def test_parse_args_round_trip() -> None:
    cfg = parse_args(
        ["--port", "0", "--agent", "tcp://a:1", "--agent", "tcp://b:2", "--policy", "round_robin"]
    )
    assert cfg.agents == ("tcp://a:1", "tcp://b:2") and cfg.port == 0 and cfg.policy == "round_robin"
    assert cfg.block_size is None and cfg.max_retries == 2
    with pytest.raises(SystemExit):
        parse_args(["--block-size", "0"])


# ------------------------------------------------------------------------------------- fake peers


class FakeAgent:
    """A PUB socket publishing heartbeats + load reports periodically, and a ROUTER serving snapshots."""

    def __init__(self, ctx: zmq.asyncio.Context, name: str, engine_url: str, interval: float = 0.03) -> None:
        self.name, self.engine_url, self.interval = name, engine_url, interval
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.rtr = ctx.socket(zmq.ROUTER)
        self.rtr.setsockopt(zmq.LINGER, 0)
        self.rtr.bind("tcp://127.0.0.1:*")
        self.snapshot_endpoint = self.rtr.getsockopt_string(zmq.LAST_ENDPOINT)
        self.epoch = 1
        self.seq = 0
        self.block_size = BS
        self.mirror: list[KVEvent] = []
        self.beating = True
        self.healthy = True
        self.load = (0, 0, 0, 0)  # running, waiting, queued prefill tokens, max running
        self.snapshot_requests = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._serve())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pub.close(0)
        self.rtr.close(0)

    async def raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    async def publish(self, topic: bytes, msg: Any) -> None:
        frame = make_frame(topic, self.seq, encode_message(msg))
        self.seq += 1
        await self.pub.send_multipart(frame)

    async def send_events(self, *evs: KVEvent) -> None:
        self.mirror.extend(evs)
        await self.publish(TOPIC_EVENTS, EventBatch(self.name, self.epoch, self.seq, time.time(), evs))

    async def _beat(self) -> None:
        while True:
            if self.beating:
                hb = Heartbeat(
                    self.name, self.epoch, time.time(), self.engine_url, self.healthy, self.block_size,
                    len(self.mirror), MODEL, self.snapshot_endpoint, self.interval,
                )  # fmt: skip
                await self.publish(TOPIC_HEARTBEAT, hb)
                r, w, q, m = self.load
                await self.publish(
                    TOPIC_LOAD, LoadReport(self.name, self.epoch, time.time(), r, w, q, 0, 10_000, m)
                )
            await asyncio.sleep(self.interval)

    async def _serve(self) -> None:
        while True:
            ident, empty, payload = await self.rtr.recv_multipart()
            assert empty == b"" and isinstance(decode_message(payload), SnapshotRequest)
            self.snapshot_requests += 1
            snap = Snapshot(self.name, self.epoch, self.seq - 1, self.block_size, tuple(self.mirror))
            await self.rtr.send_multipart([ident, b"", encode_message(snap)])


class FakeEngine:
    """Answers the generation endpoints; records each (path, body). Streams ``chunks`` SSE events."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.status = 200
        self.chunks = 3
        self.gate: asyncio.Event | None = None  # if set, the stream pauses after its first event
        self.linger = 0.0  # seconds the stream stays open after ``data: [DONE]``
        self.cancelled = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def event(self, i: int) -> bytes:
        return f'data: {{"text": "{self.name}-{i}"}}\n\n'.encode()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append((request.path, body))
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "engine says no", "code": self.status}}, status=self.status
            )
        if not body.get("stream"):
            return web.json_response({"instance": self.name, "text": "ok"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(self.chunks):
                await resp.write(self.event(i))
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
            await resp.write(b"data: [DONE]\n\n")
            await asyncio.sleep(self.linger)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return resp


def dead_url() -> str:
    """An http URL nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Cluster:
    router: RouterServer
    agents: list[FakeAgent]
    engines: list[FakeEngine]
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return self.router.url + path

    def inst(self, name: str) -> Any:
        st = self.router.core.table.get(name)
        assert st is not None
        return st

    async def wait_routable(self, *names: str) -> None:
        await wait_until(
            lambda: all(n in self.router.core.table and self.inst(n).is_routable for n in names),
            f"{names} routable",
        )

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(self.url(path), data=data) as r:
            return r.status, await r.json(content_type=None)

    async def metric(self, name: str) -> float:
        async with self.http.get(self.url("/metrics")) as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith(name + " ") or line == name:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@contextlib.asynccontextmanager
async def cluster(
    n: int = 2, *, start: bool = True, engine_urls: dict[int, str] | None = None, **cfg: Any
) -> AsyncIterator[Cluster]:
    ctx = zmq.asyncio.Context()
    engines = [FakeEngine(f"i{k}") for k in range(n)]
    agents: list[FakeAgent] = []
    router: RouterServer | None = None
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        for e in engines:
            await e.start()
        agents = [FakeAgent(ctx, e.name, (engine_urls or {}).get(k, e.url)) for k, e in enumerate(engines)]
        for a in agents:
            a.start()
        cfg.setdefault("heartbeat_timeout", 0.5)
        router = RouterServer(RouterConfig(port=0, agents=tuple(a.endpoint for a in agents), **cfg))
        await router.start()
        c = Cluster(router, agents, engines, http)
        if start and n:
            await c.wait_routable(*(e.name for e in engines))
        yield c
    finally:
        await http.close()
        if router is not None:
            await router.stop()
        for a in agents:
            await a.close()
        for e in engines:
            await e.stop()
        ctx.destroy(linger=0)


def chosen(c: Cluster) -> list[str]:
    return [e.name for e in c.engines for _ in e.received]


# ------------------------------------------------------------------------------------ router tests


async def test_routes_to_instance_holding_prefix_from_snapshot() -> None:
    async with cluster(3, start=False) as c:
        c.agents[1].mirror.append(stored(PROMPT))  # i1 holds the prompt before the router joins
        await c.wait_routable("i0", "i1", "i2")
        assert c.router.core.index is not None and c.router.core.index.blocks_of("i1") == 12
        for _ in range(3):
            status, body = await c.post("/generate", {"text": PROMPT + " and more", "sampling_params": {}})
            assert (status, body["instance"]) == (200, "i1")
        path, sent = c.engines[1].received[0]
        assert sent.pop("rid").startswith("lmr-")  # the router's request id, for /abort_request
        assert (path, sent) == ("/generate", {"text": PROMPT + " and more", "sampling_params": {}})


async def test_long_prompt_is_routed_by_prefix() -> None:
    long_prompt = PROMPT * 2000  # 96 kB: tokenized and hashed in a worker thread
    async with cluster(2, start=False) as c:
        c.agents[1].mirror.append(stored(long_prompt[:4000]))
        await c.wait_routable("i0", "i1")
        status, body = await c.post("/generate", {"text": long_prompt})
        assert (status, body["instance"]) == (200, "i1")
        messages = [{"role": "user", "content": long_prompt}]
        status, body = await c.post("/v1/chat/completions", {"model": MODEL, "messages": messages})
        assert (status, body["instance"]) == (200, "i0")  # the chat template changes the prefix
        assert c.router.core.stats.decisions[("lmetric", "i0")] == 1


async def test_routes_to_prefix_learned_from_event_batches() -> None:
    async with cluster(2) as c:
        await c.agents[0].send_events(stored(PROMPT))
        await wait_until(lambda: c.router.core.index.blocks_of("i0") == 12, "events applied")  # type: ignore[union-attr]
        status, body = await c.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        assert (status, body["instance"]) == (200, "i0")
        [(path, sent)] = c.engines[0].received
        assert sent.pop("rid").startswith("lmr-")
        assert (path, sent) == ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})


async def test_stream_age_histograms() -> None:
    """The router measures how old each KV event batch (engine ts) and load report (agent ts) is."""
    async with cluster(1) as c:
        await wait_until(lambda: c.inst("i0").load is not None, "a load report")
        a = c.agents[0]
        await a.publish(
            TOPIC_EVENTS, EventBatch(a.name, a.epoch, a.seq, time.time() - 0.3, (stored(PROMPT),))
        )
        await wait_until(lambda: c.router.core.index.blocks_of("i0") == 12, "events applied")  # type: ignore[union-attr]
        assert await c.metric("router_kv_event_age_seconds_count") == 1
        assert await c.metric("router_kv_event_age_seconds_sum") >= 0.3
        assert await c.metric('router_kv_event_age_seconds_bucket{le="0.2"}') == 0
        assert await c.metric("router_load_report_age_seconds_count") >= 1


async def test_load_based_choice_when_nothing_is_cached() -> None:
    async with cluster(2) as c:
        c.agents[0].load = (8, 4, 5000, 0)
        await wait_until(lambda: c.inst("i0").view().queued_prefill_tokens == 5000, "load report")
        status, body = await c.post("/generate", {"text": "nothing cached anywhere"})
        assert (status, body["instance"]) == (200, "i1")
        state = await (await c.http.get(c.url("/router/state"))).json()
        i0 = next(i for i in state["instances"] if i["name"] == "i0")
        assert (i0["batch_size"], i0["queued_prefill_tokens"], i0["synced"], i0["up"]) == (
            12,
            5000,
            True,
            True,
        )


async def test_streamed_chunks_pass_through_in_order_without_buffering() -> None:
    async with cluster(1) as c:
        eng = c.engines[0]
        eng.chunks, eng.gate = 5, asyncio.Event()
        body = {"text": PROMPT, "stream": True, "sampling_params": {"max_new_tokens": 5}}
        async with c.http.post(c.url("/generate"), json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            first = await r.content.readuntil(b"\n\n")
            assert first == eng.event(0)  # arrived while the engine still holds the rest
            eng.gate.set()
            rest = await r.content.read()
        assert first + rest == b"".join(eng.event(i) for i in range(5)) + b"data: [DONE]\n\n"
        assert await c.metric("router_ttft_seconds_count") == 1
        assert await c.metric("router_tpot_seconds_count") == 1


async def test_client_disconnect_closes_the_upstream_request() -> None:
    async with cluster(1) as c:
        eng = c.engines[0]
        eng.gate = asyncio.Event()  # never set: the engine would stream forever
        async with c.http.post(c.url("/generate"), json={"text": PROMPT, "stream": True}) as r:
            assert await r.content.readuntil(b"\n\n") == eng.event(0)
            r.close()
        await wait_until(eng.cancelled.is_set, "engine saw the disconnect")
        await wait_until(lambda: c.inst("i0").inflight == 0, "request finished")


async def test_bad_requests_get_openai_error_bodies() -> None:
    async with cluster(1) as c:
        cases: list[tuple[str, Any, str | None]] = [
            ("/generate", b"{not json", None),
            ("/v1/completions", b"\xff\xfe", None),
            ("/v1/completions", {"model": MODEL}, "prompt"),
            ("/generate", {"sampling_params": {}}, "text"),
            ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
            ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, "model"),
            ("/v1/chat/completions", [1, 2], None),
        ]  # fmt: skip
        for path, body, param in cases:
            status, err = await c.post(path, body)
            assert status == 400, (path, body)
            assert err["error"]["type"] == "invalid_request_error" and err["error"]["code"] == 400
            assert err["error"]["param"] == param and err["error"]["message"]
        assert c.engines[0].received == []
        client = openai.AsyncOpenAI(base_url=c.url("/v1"), api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="not served"):
            await client.completions.create(model="other", prompt="hello")
        done = await client.completions.create(model=MODEL, prompt="hello")
        assert done.model_extra is not None and done.model_extra["instance"] == "i0"
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        await client.close()


async def test_engine_errors_pass_through_unchanged() -> None:
    async with cluster(1) as c:
        c.engines[0].status = 422
        for stream in (False, True):
            status, body = await c.post("/generate", {"text": PROMPT, "stream": stream})
            assert (status, body) == (422, {"error": {"message": "engine says no", "code": 422}})


async def test_503_when_no_instance_is_up() -> None:
    async with cluster(0) as c:
        status, body = await c.post("/generate", {"text": PROMPT})
        assert status == 503 and body["error"]["type"] == "service_unavailable"
        assert "no live engine instance" in body["error"]["message"]
        async with c.http.get(c.url("/health")) as r:
            assert r.status == 503
        assert await c.metric('router_requests_total{endpoint="generate",status="503"}') == 1


async def test_heartbeat_timeout_takes_instance_out_and_drops_its_blocks() -> None:
    async with cluster(2, start=False) as c:
        c.agents[0].mirror.append(stored(PROMPT))
        await c.wait_routable("i0", "i1")
        assert c.router.core.index is not None and c.router.core.index.blocks_of("i0") == 12
        c.agents[0].beating = False
        await wait_until(lambda: not c.inst("i0").up, "heartbeat timeout")
        assert c.inst("i0").down_reason == "heartbeat_timeout"
        assert c.router.core.index.blocks_of("i0") == 0
        status, body = await c.post("/generate", {"text": PROMPT})
        assert (status, body["instance"]) == (200, "i1")
        assert await c.metric("router_instances_up") == 1
        c.agents[0].beating = True  # comes back: resynced from a snapshot, routable again
        await c.wait_routable("i0")
        assert c.router.core.index.blocks_of("i0") == 12


async def test_agent_seq_gap_triggers_snapshot_resync() -> None:
    async with cluster(2) as c:
        a = c.agents[0]
        before = a.snapshot_requests
        a.mirror.append(stored(PROMPT))  # an event batch the router never receives:
        a.seq += 1  # its frame is lost
        await wait_until(lambda: c.router.core.stats.resyncs[("i0", "gap")] == 1, "gap detected")
        await c.wait_routable("i0")
        assert a.snapshot_requests > before
        assert c.router.core.index is not None and c.router.core.index.blocks_of("i0") == 12
        status, body = await c.post("/generate", {"text": PROMPT})
        assert (status, body["instance"]) == (200, "i0")


async def test_malformed_frames_are_counted_and_skipped() -> None:
    async with cluster(1) as c:
        a = c.agents[0]
        await a.raw([b"events", b"only two frames"])
        await a.raw([b"events", (123).to_bytes(8, "big"), b"\xc1 not msgpack"])
        await a.raw([b"events", (124).to_bytes(8, "big"), encode_message(SnapshotRequest())])
        await a.raw([b"hb", (125).to_bytes(8, "big"), json.dumps({"type": "Heartbeat"}).encode()])
        m = 'router_malformed_frames_total{reason="%s"}'
        # the last one is JSON, not msgpack
        for reason, n in (("bad_frame_count", 1), ("bad_msgpack", 2), ("unexpected_type", 1)):
            await wait_until(lambda r=reason, n=n: c.router.subscriber.stats.malformed[r] == n, reason)  # type: ignore[misc]
            assert await c.metric(m % reason) == n
        await c.wait_routable("i0")
        status, _ = await c.post("/generate", {"text": PROMPT})
        assert status == 200
        assert await c.metric('router_frames_total{kind="Heartbeat"}') > 0


async def test_retry_on_another_instance_when_an_engine_refuses_connections() -> None:
    async with cluster(2, start=False, engine_urls={0: dead_url()}, suspect_cooldown=60.0) as c:
        c.agents[0].mirror.append(stored(PROMPT))  # the dead instance is the cache-affine choice
        await c.wait_routable("i0", "i1")
        status, body = await c.post("/generate", {"text": PROMPT})
        assert (status, body["instance"]) == (200, "i1")
        assert await c.metric("router_retries_total") == 1
        assert c.inst("i0").suspect_since is not None and not c.inst("i0").is_routable
        assert c.inst("i0").inflight == 0 and not c.inst("i0").pending
        status, body = await c.post("/generate", {"text": PROMPT})  # no second attempt on the suspect
        assert (status, body["instance"]) == (200, "i1")
        assert await c.metric("router_retries_total") == 1


async def test_all_engines_refusing_gives_502() -> None:
    async with cluster(1, engine_urls={0: dead_url()}, max_retries=3) as c:
        status, body = await c.post("/generate", {"text": PROMPT})
        assert status == 502 and body["error"]["type"] == "server_error"


async def test_health_models_and_state_endpoints() -> None:
    async with cluster(2) as c:
        async with c.http.get(c.url("/health")) as r:
            assert r.status == 200 and (await r.json())["instances_up"] == 2
        async with c.http.get(c.url("/v1/models")) as r:
            assert (await r.json())["data"][0]["id"] == MODEL
        async with c.http.get(c.url("/router/state")) as r:
            state = await r.json()
        assert state["block_size"] == BS and {i["name"] for i in state["instances"]} == {"i0", "i1"}
        async with c.http.get(c.url("/metrics")) as r:
            text = await r.text()
        for name in (
            "router_decisions_total",
            "router_failure_cases_total",
            "router_resyncs_total",
            "router_index_blocks",
            "router_speculative_blocks",
            "router_e2e_latency_seconds",
        ):
            assert name in text, name  # fmt: skip


async def read_sse_until_done(port: int, path: str, body: dict[str, Any]) -> bytes:
    """POST ``body`` over a raw socket, read until ``data: [DONE]``, then close at once (no further read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    writer.write(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data: [DONE]" not in got:
        chunk = await reader.read(65536)
        assert chunk, f"connection closed before [DONE]: {got!r}"
        got += chunk
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return got


@pytest.mark.parametrize("linger", [0.0, 0.3])
async def test_client_closing_right_after_done_counts_as_success(linger: float) -> None:
    """The whole answer was written: status 200 and an end-to-end latency, whatever the final EOF does.

    ``linger`` 0: the engine ends its stream with ``[DONE]`` (the client's close races the router's
    final chunk). 0.3 s: the engine keeps the stream open, so the client is gone before the router ends.
    """
    async with cluster(1) as c:
        c.engines[0].linger = linger
        ok = 'router_requests_total{endpoint="generate",status="200"}'
        for n in range(1, 6):
            got = await read_sse_until_done(c.router.port, "/generate", {"text": PROMPT, "stream": True})
            assert got.startswith(b"HTTP/1.1 200") and b"i0-2" in got
            await wait_until(lambda: c.inst("i0").inflight == 0, "request finished")
            assert await c.metric(ok) == n
            assert await c.metric('router_requests_total{endpoint="generate",status="client_closed"}') == 0
            assert await c.metric("router_e2e_latency_seconds_count") == n


async def test_unknown_path_and_wrong_method_get_openai_error_bodies() -> None:
    async with cluster(1) as c:
        cases = [
            ("GET", "/v1/nope", 404, "no such endpoint: GET /v1/nope"),
            ("POST", "/health", 405, "method POST not allowed on /health"),
            ("GET", "/v1/chat/completions", 405, "method GET not allowed on /v1/chat/completions"),
        ]
        for method, path, status, message in cases:
            async with c.http.request(method, c.url(path)) as r:
                assert r.status == status and r.content_type == "application/json", (method, path)
                body = await r.json()
                if status == 405:
                    assert r.headers["Allow"]
            err = body["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["code"] == status and err["type"] == "invalid_request_error" and err["param"] is None
            assert err["message"].startswith(message)
