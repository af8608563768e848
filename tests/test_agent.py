"""The agent against a fake SGLang engine, over real ZeroMQ and HTTP on loopback (OS-assigned ports).

The fake engine lives here: an aiohttp server (``/health``, ``/server_info`` with the ``kv_events``
block, ``/v1/models``), an XPUB for KV batches and one for load (XPUB so the test can wait until the agent
has subscribed), and a ROUTER replay socket answering SGLang's replay protocol from a buffer of recent
batches. A SUB in the test reads what the agent publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from aiohttp import web

from agents.agent import Agent, serve
from agents.agent.config import AgentConfig, parse_args
from agents.agent.counters import AgentCounters
from agents.agent.engine_link import EngineUnavailableError
from agents.agent.frames import without_token_ids
from agents.agent.kv_follower import DUPLICATE_WINDOW, KvFollower
from kvindex import protocol as wire
from kvindex.hashing import block_hashes
from kvindex.mirror import BlockMirror
from kvindex.protocol.ready import parse_ready

pytestmark = pytest.mark.timeout(20)

BS = 4  # block size of the fake engine, tokens
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ fake engine


def stored(tokens: Sequence[int], prefix: Sequence[int] = ()) -> wire.BlockStored:
    """A BlockStored for the pages of ``tokens`` cached after the (already cached) ``prefix``."""
    assert len(prefix) % BS == 0 and len(tokens) % BS == 0
    hashes = block_hashes([*prefix, *tokens], BS)
    k = len(prefix) // BS
    return wire.BlockStored(tuple(hashes[k:]), hashes[k - 1] if k else None, tuple(tokens), BS)


def removed(tokens: Sequence[int], prefix: Sequence[int] = ()) -> wire.BlockRemoved:
    hashes = block_hashes([*prefix, *tokens], BS)
    return wire.BlockRemoved(tuple(hashes[len(prefix) // BS :]))


class FakeEngine:
    """One SGLang server as the agent sees it. ``cache`` is the reference set of cached block hashes."""

    def __init__(
        self,
        replay: bool = True,
        topic: str = "kv",
        buffer_steps: int = 1000,
        stock: bool = False,
        mute_replay: bool = False,
    ) -> None:
        self.use_replay = replay
        self.stock = stock  # /server_info as stock SGLang has it: kv_events_config JSON, no kv_events block
        self.mute_replay = mute_replay  # replay socket bound but never answering
        self.topic = topic.encode()
        self.healthy = True
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.cache: set[int] = set()
        self.ctx = zmq.asyncio.Context()
        self.kv = self._xpub()
        self.load = self._xpub()
        self.replay_sock = self.ctx.socket(zmq.ROUTER) if replay else None
        self.kv_subscribed = asyncio.Event()
        self.load_subscribed = asyncio.Event()
        self.replay_requests: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _xpub(self) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.LINGER, 0)
        s.bind("tcp://127.0.0.1:*")
        return s

    @staticmethod
    def _port(sock: zmq.asyncio.Socket) -> int:
        return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/server_info", self._server_info)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._tasks.append(asyncio.create_task(self._watch_subs(self.kv, self.kv_subscribed)))
        self._tasks.append(asyncio.create_task(self._watch_subs(self.load, self.load_subscribed)))
        if self.replay_sock is not None:
            self.replay_sock.setsockopt(zmq.LINGER, 0)
            self.replay_sock.bind("tcp://127.0.0.1:*")
            if not self.mute_replay:
                self._tasks.append(asyncio.create_task(self._serve_replay()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        self.ctx.destroy(linger=0)

    async def _health(self, _req: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _server_info(self, _req: web.Request) -> web.Response:
        if self.stock:
            conf = {"publisher": "zmq", "endpoint": f"tcp://*:{self._port(self.kv)}", "topic": "kv"}
            if self.replay_sock is not None:
                conf["replay_endpoint"] = f"tcp://*:{self._port(self.replay_sock)}"
            return web.json_response(
                {
                    "served_model_name": "stock/model",
                    "page_size": BS,
                    "kv_events_config": json.dumps(conf),
                    "load_publish_endpoint": f"tcp://*:{self._port(self.load)}",
                }
            )
        kv_events = {
            "publisher": "zmq",
            "endpoint_host": "*",
            "endpoint_port_base": self._port(self.kv),
            "topic": self.topic.decode(),
            "block_size": BS,
            "dp_size": 1,
            "replay_endpoint_port_base": self._port(self.replay_sock) if self.replay_sock else None,
            "load_endpoint_port_base": self._port(self.load),
            "load_topic": "load",
        }
        return web.json_response({"model_path": "fake/model", "page_size": BS, "kv_events": kv_events})

    async def _models(self, _req: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake/model", "object": "model"}]})

    async def _watch_subs(self, sock: zmq.asyncio.Socket, ev: asyncio.Event) -> None:
        while True:
            msg = await sock.recv()
            if msg[:1] == b"\x01":
                ev.set()

    async def _serve_replay(self) -> None:
        assert self.replay_sock is not None
        sock = self.replay_sock
        while True:
            ident, _empty, start = await sock.recv_multipart()
            first = int.from_bytes(start, "big")
            self.replay_requests.append(first)
            for s, payload in list(self.buffer):
                if s >= first:
                    await sock.send_multipart([ident, b"", self.topic, wire.seq_to_bytes(s), payload])
            await sock.send_multipart([ident, b"", b"", wire.REPLAY_END, b""])

    async def emit(self, *events: wire.KVEvent, legacy: bool = False, publish: bool = True) -> int:
        """Record one batch (seq = next) in the reference cache and replay buffer; publish it unless told not."""
        for ev in events:
            if isinstance(ev, wire.BlockStored):
                self.cache.update(ev.block_hashes)
            elif isinstance(ev, wire.BlockRemoved):
                self.cache.difference_update(ev.block_hashes)
            else:
                self.cache.clear()
        seq = self.seq
        self.seq += 1
        payload = wire.encode_kv_batch(
            wire.KVEventBatch(1000.0 + seq, tuple(events), 0), legacy_arrays=legacy
        )
        self.buffer.append((seq, payload))
        if publish:
            await self.kv.send_multipart([self.topic, wire.seq_to_bytes(seq), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.kv.send_multipart(frames)

    def restart(self) -> None:
        """What an engine restart looks like from outside: empty cache, seq back to 0, empty buffer."""
        self.seq = 0
        self.buffer.clear()
        self.cache.clear()

    async def publish_load(self, stat: wire.LoadStat) -> None:
        await self.load.send_multipart([b"load", wire.seq_to_bytes(0), wire.encode_load_stat(stat)])


# ---------------------------------------------------------------------------------------- agent harness


class Harness:
    """An in-process agent (``serve``) following ``engine``, and a SUB on the agent's PUB socket."""

    def __init__(self, engine: FakeEngine, **cfg: Any) -> None:
        self.engine = engine
        settings: dict[str, Any] = {
            "engine_url": engine.url,
            "instance_id": "inst-0",
            "heartbeat_interval": 0.05,
            "health_interval": 0.05,
            "health_timeout": 0.5,
            "engine_wait": 5.0,
            "replay_timeout": 1.0,
        }
        self.cfg = AgentConfig(**{**settings, **cfg})
        self.ctx = zmq.asyncio.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.seqs: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._agent: Agent | None = None

    @property
    def agent(self) -> Agent:
        assert self._agent is not None
        return self._agent

    @property
    def counters(self) -> AgentCounters:
        return self.agent.counters

    async def __aenter__(self) -> Harness:
        ready: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(serve(self.cfg, on_ready=ready.set_result, handle_signals=False))
        self._agent = await asyncio.wait_for(ready, 5)
        self.sub.connect(self.agent.pub_endpoint)
        await self.next(lambda m: isinstance(m, wire.Heartbeat))  # PUB/SUB slow joiner
        await asyncio.wait_for(self.engine.kv_subscribed.wait(), 5)
        await asyncio.wait_for(self.engine.load_subscribed.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait_for(self._task, 5)  # serve returns normally on cancellation
        self.ctx.destroy(linger=0)

    async def next(
        self, pred: Callable[[wire.ClusterMessage], bool] = lambda m: True, timeout: float = 3.0
    ) -> wire.ClusterMessage:
        """The next published message satisfying ``pred`` (others are read and dropped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frames = await asyncio.wait_for(self.sub.recv_multipart(), max(0.0, deadline - loop.time()))
            topic, seq, payload = wire.split_frame(frames)
            msg = wire.decode_message(payload)
            assert (
                topic
                == {
                    wire.EventBatch: wire.TOPIC_EVENTS,
                    wire.LoadReport: wire.TOPIC_LOAD,
                    wire.Heartbeat: wire.TOPIC_HEARTBEAT,
                }[type(msg)]
            )
            self.seqs.append(seq)
            if pred(msg):
                return msg

    async def batches(self, n: int) -> list[wire.EventBatch]:
        """The next ``n`` EventBatches (heartbeats skipped)."""
        out = []
        for _ in range(n):
            m = await self.next(lambda m: isinstance(m, wire.EventBatch))
            assert isinstance(m, wire.EventBatch)
            out.append(m)
        return out

    async def snapshot(self, request: bytes | None = None) -> wire.Snapshot:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.agent.snapshot_endpoint)
        try:
            await dealer.send_multipart([b"", request or wire.encode_message(wire.SnapshotRequest())])
            empty, payload = await asyncio.wait_for(dealer.recv_multipart(), 3)
        finally:
            dealer.close(linger=0)
        assert empty == b""
        snap = wire.decode_message(payload)
        assert isinstance(snap, wire.Snapshot)
        return snap


def snapshot_hashes(snap: wire.Snapshot) -> set[int]:
    out: set[int] = set()
    for ev in snap.events:
        assert isinstance(ev, wire.BlockStored)
        out.update(ev.block_hashes)
    return out


@pytest.fixture
async def engine() -> Any:
    eng = FakeEngine()
    await eng.start()
    yield eng
    await eng.stop()


async def wait_until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


A = list(range(1, 9))  # two pages
B = list(range(100, 108))
C = list(range(200, 204))


# ------------------------------------------------------------------------------------------------ tests


async def test_token_ids_published_only_when_asked(engine: FakeEngine) -> None:
    async with Harness(engine, publish_token_ids=True) as h:
        await engine.emit(stored(A))
        (got,) = await h.batches(1)
        assert got.events == (stored(A),) and got.events[0].token_ids == tuple(A)  # type: ignore[union-attr]
        snap = await h.snapshot()
        assert any(isinstance(e, wire.BlockStored) and e.token_ids for e in snap.events)
    async with Harness(engine) as h:
        snap = await h.snapshot()
        assert snapshot_hashes(snap) and not any(
            isinstance(e, wire.BlockStored) and e.token_ids for e in snap.events
        )


async def test_events_flow_with_one_seq_counter(
    engine: FakeEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Harness(engine) as h:
        ready = [r for r in map(parse_ready, capsys.readouterr().out.splitlines()) if r]
        assert len(ready) == 1 and ready[0].role == "agent" and ready[0].instance == "inst-0"
        assert ready[0].endpoints == h.agent.endpoints()
        assert set(ready[0].endpoints) == {"pub", "snapshot", "engine"}

        evs: list[wire.KVEvent] = [stored(A), stored(C, A), removed(C, A)]
        for ev in evs:
            await engine.emit(ev)
        got = await h.batches(3)
        assert [b.engine_seq for b in got] == [0, 1, 2]
        # Published without the prompt's token ids (the router never reads them; they are prompt content).
        assert [b.events for b in got] == [without_token_ids([ev]) for ev in evs]
        assert all(not e.token_ids for b in got for e in b.events if isinstance(e, wire.BlockStored))
        assert all(b.instance == "inst-0" and b.agent_epoch == h.agent.epoch for b in got)
        assert got[0].ts == 1000.0

        hb = await h.next(lambda m: isinstance(m, wire.Heartbeat))
        assert isinstance(hb, wire.Heartbeat)
        assert (hb.instance, hb.engine_url, hb.engine_healthy, hb.block_size) == (
            "inst-0",
            engine.url,
            True,
            BS,
        )
        assert (hb.model, hb.snapshot_endpoint, hb.cached_blocks) == (
            "fake/model",
            h.agent.snapshot_endpoint,
            2,
        )
        # one counter across every topic, no holes
        assert h.seqs == list(range(h.seqs[0], h.seqs[0] + len(h.seqs)))
        assert h.counters.published["events"] == 3 and h.counters.events["BlockStored"] == 2
        assert h.counters.gaps == 0 and h.counters.total_malformed() == 0


async def test_legacy_and_map_encodings(engine: FakeEngine) -> None:
    async with Harness(engine, publish_token_ids=True) as h:  # every field decoded, tokens included
        legacy = (stored(A), stored(B), removed(B))
        await engine.emit(*legacy, legacy=True)
        await engine.emit(stored(C, A), wire.AllBlocksCleared())
        await engine.emit(stored(B), legacy=True)
        got = await h.batches(3)
        assert got[0].events == legacy
        assert got[1].events == (stored(C, A), wire.AllBlocksCleared())
        assert got[2].events == (stored(B),)
        snap = await h.snapshot()
        assert snapshot_hashes(snap) == engine.cache == set(stored(B).block_hashes)


async def test_gap_is_repaired_from_replay(engine: FakeEngine) -> None:
    async with Harness(engine) as h:
        await engine.emit(stored(A))
        await engine.emit(stored(B))
        await engine.emit(removed(B), publish=False)  # lost on the way
        await engine.emit(stored(C, A), publish=False)  # lost on the way
        await engine.emit(stored(B[:4]))
        got = await h.batches(5)
        assert [b.engine_seq for b in got] == [0, 1, 2, 3, 4]
        assert got[2].events == (removed(B),)
        assert engine.replay_requests == [2]
        assert (h.counters.gaps, h.counters.replayed_batches, h.counters.resync_incomplete) == (1, 2, 0)
        snap = await h.snapshot()
        assert snapshot_hashes(snap) == engine.cache
        assert len(h.agent.mirror) == len(engine.cache)


async def test_gap_without_replay_clears_the_mirror() -> None:
    eng = FakeEngine(replay=False)
    await eng.start()
    try:
        async with Harness(eng) as h:
            await eng.emit(stored(A))
            await eng.emit(stored(B), publish=False)
            await eng.emit(stored(C, A))
            got = await h.batches(3)
            assert [b.engine_seq for b in got] == [0, -1, 2]
            assert got[1].events == (wire.AllBlocksCleared(),)
            assert (h.counters.gaps, h.counters.resync_incomplete) == (1, 1)
            # the mirror now holds only what came after the hole: a subset, never stale blocks
            assert snapshot_hashes(await h.snapshot()) == set(stored(C, A).block_hashes)
    finally:
        await eng.stop()


async def test_gap_beyond_the_replay_buffer_clears_the_mirror() -> None:
    eng = FakeEngine(buffer_steps=2)
    await eng.start()
    try:
        async with Harness(eng) as h:
            await eng.emit(stored(A))
            for ev in (stored(B), removed(B), stored(C)):
                await eng.emit(ev, publish=False)
            await eng.emit(stored(C, A))  # buffer now holds seqs 3 and 4: 1 and 2 are gone
            got = await h.batches(3)
            assert [b.engine_seq for b in got] == [0, -1, 4]
            assert (h.counters.resync_incomplete, h.counters.replay_failures) == (1, 0)
            assert snapshot_hashes(await h.snapshot()) == set(stored(C, A).block_hashes)
    finally:
        await eng.stop()


async def test_silent_replay_socket_times_out_and_the_agent_goes_on() -> None:
    eng = FakeEngine(mute_replay=True)
    await eng.start()
    try:
        async with Harness(eng, replay_timeout=0.2) as h:
            await eng.emit(stored(A))
            await eng.emit(stored(B), publish=False)
            await eng.emit(stored(C))
            got = await h.batches(3)
            assert [b.engine_seq for b in got] == [0, -1, 2]
            assert (h.counters.replay_failures, h.counters.resync_incomplete) == (1, 1)
            await eng.emit(stored(B))
            assert (await h.batches(1))[0].engine_seq == 3
    finally:
        await eng.stop()


async def test_stock_sglang_server_info_is_understood() -> None:
    eng = FakeEngine(stock=True)
    await eng.start()
    try:
        async with Harness(eng) as h:
            assert h.agent.engine is not None
            assert h.agent.engine.model == "stock/model" and h.agent.engine.block_size == BS
            assert h.agent.engine.kv_endpoint == f"tcp://127.0.0.1:{eng._port(eng.kv)}"
            await eng.emit(stored(A))
            await eng.emit(stored(B), publish=False)
            await eng.emit(stored(C))
            got = await h.batches(3)
            assert [b.engine_seq for b in got] == [0, 1, 2] and h.counters.replayed_batches == 1
            await eng.publish_load(wire.LoadStat(1, 0, 10, 100, 0, 0, 10, 8, 0, 0))
            await h.next(lambda m: isinstance(m, wire.LoadReport))
    finally:
        await eng.stop()


async def test_late_join_replays_history_from_zero(engine: FakeEngine) -> None:
    await engine.emit(stored(A), publish=False)  # before the agent existed
    await engine.emit(stored(B), publish=False)
    await engine.emit(removed(A[4:], A[:4]), publish=False)
    async with Harness(engine) as h:
        await engine.emit(stored(C))
        got = await h.batches(4)
        assert [b.engine_seq for b in got] == [0, 1, 2, 3]
        assert engine.replay_requests == [0]
        assert h.counters.late_join_incomplete == 0 and h.counters.replayed_batches == 3
        assert snapshot_hashes(await h.snapshot()) == engine.cache


async def test_engine_restart_resets_the_mirror(engine: FakeEngine) -> None:
    async with Harness(engine) as h:
        for ev in (stored(A), stored(B), removed(B)):
            await engine.emit(ev)
        await h.batches(3)
        engine.restart()
        await engine.emit(stored(C))
        got = await h.batches(2)
        assert (got[0].engine_seq, got[0].events) == (-1, (wire.AllBlocksCleared(),))
        assert (got[1].engine_seq, got[1].events) == (0, without_token_ids([stored(C)]))
        assert h.counters.engine_restarts == 1
        assert snapshot_hashes(await h.snapshot()) == engine.cache == set(stored(C).block_hashes)
        await engine.emit(stored(A))  # and it goes on from there
        assert (await h.batches(1))[0].engine_seq == 1


async def test_duplicate_frame_is_skipped(engine: FakeEngine) -> None:
    async with Harness(engine) as h:
        await engine.emit(stored(A))
        await engine.emit(stored(B))
        await engine.send_raw([engine.topic, wire.seq_to_bytes(1), engine.buffer[1][1]])
        await engine.emit(stored(C))
        got = await h.batches(3)
        assert [b.engine_seq for b in got] == [0, 1, 2]
        assert (h.counters.duplicates, h.counters.engine_restarts, h.counters.gaps) == (1, 0, 0)


async def test_malformed_frames_are_counted_and_skipped(engine: FakeEngine) -> None:
    async with Harness(engine) as h:
        await engine.emit(stored(A))
        good = engine.buffer[0][1]
        await engine.send_raw([engine.topic, wire.seq_to_bytes(1), b"\xc1\xc1 not msgpack"])
        await engine.send_raw([engine.topic, wire.seq_to_bytes(1)])  # two frames
        await engine.send_raw([engine.topic, b"\x00\x01\x02", good])  # short seq
        await engine.send_raw([engine.topic, wire.seq_to_bytes(1), b"\x93\xcb"])  # truncated msgpack
        bad_event = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": ["x"], "block_size": 4}], 0])
        await engine.send_raw([engine.topic, wire.seq_to_bytes(1), bad_event])
        await engine.send_raw([engine.topic + b"x", wire.seq_to_bytes(1), good])  # prefix-matching topic
        await engine.load.send_multipart([b"load", wire.seq_to_bytes(0), b"garbage"])
        await engine.emit(stored(B))
        got = await h.batches(2)
        assert [b.engine_seq for b in got] == [0, 1]
        await wait_until(lambda: h.counters.malformed[("load", "bad_msgpack")] == 1)
        m = h.counters.malformed
        assert m[("kv", "bad_msgpack")] == 2 and m[("kv", "bad_frame_count")] == 1
        assert m[("kv", "bad_seq")] == 1 and m[("kv", "bad_event")] == 1 and m[("kv", "wrong_topic")] == 1
        assert h.counters.gaps == 0

        # the snapshot socket too
        dealer = h.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(h.agent.snapshot_endpoint)
        await dealer.send_multipart([b"", b"garbage"])
        await dealer.send_multipart([b"no delimiter"])
        await dealer.send_multipart([b"", wire.encode_message(wire.SnapshotRequest()), b"extra"])
        hb = wire.Heartbeat("x", 1, 0.0, "u", True, 4, 0, "m", "e")
        await dealer.send_multipart([b"", wire.encode_message(hb)])
        await wait_until(lambda: sum(v for (s, _), v in m.items() if s == "snapshot") == 4)
        dealer.close(linger=0)  # not before: linger 0 would drop what is still queued
        assert m[("snapshot", "unexpected_message")] == 1 and m[("snapshot", "bad_msgpack")] == 1
        assert snapshot_hashes(await h.snapshot()) == engine.cache


async def test_snapshot_returns_the_mirror(engine: FakeEngine) -> None:
    async with Harness(engine, publish_token_ids=True) as h:  # the mirror is compared with its tokens
        empty = await h.snapshot()
        assert empty.events == () and empty.instance == "inst-0" and empty.agent_epoch == h.agent.epoch
        for ev in (stored(A), stored(C, A), stored(B), removed(B[4:], B[:4])):
            await engine.emit(ev)
        last = (await h.batches(4))[-1]
        snap = await h.snapshot()
        assert snap.block_size == BS
        assert snap.seq >= h.seqs[-1]  # taken after the last batch we saw was published
        rebuilt = BlockMirror(BS)
        rebuilt.apply_batch(snap.events)  # parents first, with tokens
        assert rebuilt == h.agent.mirror
        assert rebuilt.stats.unknown_parent == 0
        assert set(rebuilt) == engine.cache
        assert rebuilt.tokens_of(stored(C, A).block_hashes[0]) == tuple(C)
        assert last.engine_seq == 3


async def test_load_stat_becomes_load_report(engine: FakeEngine) -> None:
    stat = wire.LoadStat(3, 5, 1200, 50_000, 0, 777, 1300, 64, 9000, 123)
    async with Harness(engine) as h:
        await engine.publish_load(stat)
        rep = await h.next(lambda m: isinstance(m, wire.LoadReport))
        assert isinstance(rep, wire.LoadReport)
        assert (rep.instance, rep.agent_epoch) == ("inst-0", h.agent.epoch)
        assert (rep.running, rep.waiting, rep.queued_prefill_tokens) == (3, 5, 777)
        assert (rep.kv_used_tokens, rep.kv_capacity_tokens, rep.max_running_requests) == (1200, 50_000, 64)
        assert rep.batch_size == 8 and rep.ts > 1e9


async def test_heartbeat_reports_unhealthy_engine(engine: FakeEngine) -> None:
    async with Harness(engine) as h:
        engine.healthy = False
        hb = await h.next(lambda m: isinstance(m, wire.Heartbeat) and not m.engine_healthy)
        assert isinstance(hb, wire.Heartbeat) and hb.instance == "inst-0"
        assert h.counters.health_not_ready >= 1  # a 503: the engine says so itself, marked down at once
        engine.healthy = True
        await h.next(lambda m: isinstance(m, wire.Heartbeat) and m.engine_healthy)


async def test_restart_after_unhealthy_is_detected_even_near_expected(engine: FakeEngine) -> None:
    async with Harness(engine) as h:
        for ev in (stored(A), stored(B), stored(C)):
            await engine.emit(ev)
        await h.batches(3)
        engine.healthy = False
        await h.next(lambda m: isinstance(m, wire.Heartbeat) and not m.engine_healthy)
        engine.restart()
        engine.healthy = True
        engine.seq = 2  # the new engine's frames 0 and 1 were lost while the agent reconnected
        engine.buffer.clear()
        await engine.emit(stored(B))
        got = await h.batches(2)
        assert (got[0].engine_seq, got[0].events) == (-1, (wire.AllBlocksCleared(),))
        assert got[1].engine_seq == 2
        assert h.counters.engine_restarts == 1 and h.counters.duplicates == 0


async def test_engine_never_healthy_is_a_clear_error() -> None:
    cfg = AgentConfig(engine_url="http://127.0.0.1:9", engine_wait=0.3)
    with pytest.raises(EngineUnavailableError, match="not healthy"):
        await serve(cfg, handle_signals=False)


# ------------------------------------------------------------------------- the follower, no sockets


async def test_follower_rules_without_replay() -> None:
    out: list[tuple[int, tuple[wire.KVEvent, ...]]] = []

    async def emit(seq: int, _ts: float, events: tuple[wire.KVEvent, ...]) -> None:
        out.append((seq, events))

    c = AgentCounters()
    f = KvFollower(BlockMirror(), c, None, emit)
    batch = wire.KVEventBatch(0.0, (stored(A),))
    await f.on_batch(5, batch)  # late join, no replay: accepted
    assert c.late_join_incomplete == 1 and f.expected == 6
    await f.on_batch(6, batch)
    await f.on_batch(6 - DUPLICATE_WINDOW + 1, batch)  # close below: duplicate
    assert c.duplicates == 1
    await f.on_batch(7 + DUPLICATE_WINDOW, batch)  # gap, no replay: cleared
    assert c.gaps == 1 and c.resync_incomplete == 1
    await f.on_batch(3, batch)  # far below: restart
    assert c.engine_restarts == 1 and f.expected == 4
    assert [s for s, _ in out] == [5, 6, -1, 7 + DUPLICATE_WINDOW, -1, 3]


# ----------------------------------------------------------------------------------------- CLI & main


def test_parse_args_defaults_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_args(["--engine-url", "http://10.0.0.5:30001/"])
    assert cfg.engine_url == "http://10.0.0.5:30001" and cfg.instance() == "10.0.0.5:30001"
    assert (cfg.host, cfg.pub_port, cfg.snapshot_port) == ("127.0.0.1", 0, 0)
    assert (cfg.heartbeat_interval, cfg.health_interval, cfg.engine_wait) == (0.2, 2.0, 120.0)
    assert (cfg.health_timeout, cfg.health_failures) == (5.0, 3)  # SGLang's /health takes >= 1 s
    assert cfg.kv_endpoint is None and cfg.replay_endpoint is None and cfg.load_endpoint is None
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--engine-url", "--instance-id", "--host", "--pub-port", "--snapshot-port",
                 "--heartbeat-interval", "--health-interval", "--health-timeout", "--health-failures",
                 "--engine-wait", "--kv-endpoint",
                 "--replay-endpoint", "--load-endpoint"):  # fmt: skip
        assert flag in text
    with pytest.raises(SystemExit):
        parse_args(["--engine-url", "http://x:1", "--heartbeat-interval", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--engine-url", "http://x:1", "--health-failures", "0"])


async def test_main_process_ready_and_sigterm(engine: FakeEngine) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.agent", "--engine-url", engine.url, "--heartbeat-interval", "0.05",
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        ready = parse_ready(line.decode())
        assert ready is not None and ready.role == "agent", line
        assert ready.endpoints["engine"] == engine.url
        assert ready.instance == engine.url.removeprefix("http://")
        ctx = zmq.asyncio.Context()
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_HEARTBEAT)
            sub.connect(ready.endpoints["pub"])
            frames = await asyncio.wait_for(sub.recv_multipart(), 5)
            assert isinstance(wire.decode_message(frames[2]), wire.Heartbeat)
        finally:
            ctx.destroy(linger=0)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
        err = (await proc.stderr.read()).decode()
        assert rc == 0, err
        assert "Traceback" not in err
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def test_main_exits_nonzero_when_engine_is_down() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agents.agent", "--engine-url", "http://127.0.0.1:9", "--engine-wait", "0.2"],
        cwd=ROOT, capture_output=True, text=True, timeout=15, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode == 1
    assert "not healthy" in res.stderr and "Traceback" not in res.stderr


async def test_sigint_while_waiting_for_the_engine_exits_cleanly() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.agent", "--engine-url", "http://127.0.0.1:9", "--engine-wait", "60",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 10)
        assert b"waiting up to 60 s" in line
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
