"""Malformed, truncated, duplicated and reordered frames on every socket: counted, skipped, never fatal.

Two layers. Hypothesis feeds random frames (random multipart counts, random bytes, valid-looking msgpack)
to the pure frame handlers of every receiving side -- the agent's decoders for the engine's KV, load and
replay-reply frames and for snapshot requests, its :class:`KvFollower`, the router's
:meth:`Subscriber.handle_frames`, :class:`RoutingModel` and :func:`parse_snapshot_reply` -- and checks that
they raise nothing but their documented error, keep their invariants, and still process a valid frame
afterwards. Then one real-socket smoke test per socket mangles a live stream (junk, duplicates, swaps) or
throws junk at a ROUTER, and checks the counters and that the state is still exact or served.

Sockets: engine KV PUB -> agent, engine load PUB -> agent, engine replay replies -> agent, agent PUB ->
router, agent snapshot replies -> router, snapshot requests -> agent ROUTER, replay requests -> engine
ROUTER.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.agent.counters import AgentCounters
from agents.agent.engine_link import ReplayClient, ReplayError
from agents.agent.frames import decode_kv_frame, decode_load_frame, decode_snapshot_request
from agents.agent.kv_follower import KvFollower
from kvindex import protocol as wire
from kvindex.mirror import BlockMirror
from kvindex.protocol.numbered import SnapshotError, parse_snapshot_reply
from launch.fuzz_strategies import (
    BS,
    CLUSTER_PAYLOADS,
    HASH,
    INT64,
    KV_PAYLOADS,
    LOAD_PAYLOADS,
    SEQ_FRAMES,
    frames_of,
    pack,
)
from router.config import RouterConfig
from router.model import sync as router_sync
from router.model.model import RoutingModel, SnapshotJob
from router.server import RouterServer
from router.subscriber import Subscriber
from tests.live_rig import (
    AgentRunner,
    ManglingRelay,
    Traffic,
    agent_config,
    close_all,
    drive,
    engine_blocks,
    engine_config,
    engine_next_seq_seen,
    generate,
    http_session,
    index_blocks,
    junk_frames,
    mirror_blocks,
    quiesce,
    router_config,
    start_engine,
    synced_past,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # the same examples every run (seeded), as every other random choice in these tests
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ------------------------------------------------------------------------------------------- strategies
# Shared with ``python -m launch fuzz`` (launch/fuzz_strategies.py).

# ----------------------------------------------------------------------- pure decoders: only their error


@FUZZ
@given(frames_of([b"kv"], KV_PAYLOADS))
def test_agent_kv_frame_decoder_raises_only_wire_errors(frames: list[bytes]) -> None:
    try:
        seq, batch = decode_kv_frame(frames, b"kv")
    except wire.WireError:
        return
    assert seq >= 0 and frames[0] == b"kv" and isinstance(batch, wire.KVEventBatch)


@FUZZ
@given(frames_of([b"load"], LOAD_PAYLOADS))
def test_agent_load_frame_decoder_raises_only_wire_errors(frames: list[bytes]) -> None:
    try:
        seq, stat = decode_load_frame(frames, b"load")
    except wire.WireError:
        return
    assert seq >= 0 and isinstance(stat, wire.LoadStat)


def test_load_stat_with_inf_or_nan_is_a_wire_error() -> None:
    """Found by the fuzzer: ``decode_load_stat`` raised OverflowError/ValueError (the agent would crash)."""
    for bad in (float("inf"), float("nan")):
        with pytest.raises(wire.WireError):
            decode_load_frame([b"load", wire.seq_to_bytes(1), pack(["LoadStat", bad, 0, 0, 0, 0])], b"load")


@FUZZ
@given(
    st.one_of(
        st.lists(st.binary(max_size=12), max_size=5),
        st.tuples(st.binary(max_size=4), st.just(b""), CLUSTER_PAYLOADS).map(list),
    )
)
def test_snapshot_request_decoder_raises_only_wire_errors(frames: list[bytes]) -> None:
    try:
        ident = decode_snapshot_request(frames)
    except wire.WireError:
        return
    assert ident == frames[0]


@FUZZ
@given(
    st.one_of(
        st.lists(st.binary(max_size=12), max_size=6),
        st.tuples(st.just(b""), st.sampled_from([b"kv", b""]), SEQ_FRAMES, KV_PAYLOADS).map(list),
    )
)
def test_replay_reply_parser_raises_only_wire_errors(frames: list[bytes]) -> None:
    try:
        item = wire.parse_replay_reply(frames)
    except wire.WireError:
        return
    assert isinstance(item.seq, int) and isinstance(item.payload, bytes)


@FUZZ
@given(
    st.one_of(
        st.lists(st.binary(max_size=12), max_size=4),
        st.tuples(st.just(b""), CLUSTER_PAYLOADS).map(list),
    )
)
def test_snapshot_reply_parser_raises_only_snapshot_errors(frames: list[bytes]) -> None:
    try:
        snap = parse_snapshot_reply(frames)
    except SnapshotError as exc:
        assert exc.reason == "bad_reply"
        return
    assert isinstance(snap, wire.Snapshot)


# ------------------------------------------------------------------------------- the agent's KV follower

STORED = st.builds(
    lambda hs, parent: wire.BlockStored(tuple(hs), parent, (), BS),
    st.lists(HASH, min_size=1, max_size=4),
    st.none() | HASH,
)
REMOVED = st.builds(lambda hs: wire.BlockRemoved(tuple(hs)), st.lists(HASH, min_size=1, max_size=4))
EVENTS = st.lists(
    st.one_of(STORED, STORED, REMOVED, st.just(wire.AllBlocksCleared())), min_size=1, max_size=3
).map(tuple)


class ScriptedReplay(ReplayClient):
    """A replay socket without a socket: ``fetch`` answers from ``buffer`` (seq -> payload), optionally
    mangled by ``mangle``, or raises ``fail`` if set."""

    def __init__(self, buffer: dict[int, bytes]) -> None:
        super().__init__(zmq.asyncio.Context.instance(), "inproc://none", 1.0)
        self.buffer = buffer
        self.fail: ReplayError | None = None
        self.mangle: Callable[[list[wire.ReplayItem]], list[wire.ReplayItem]] = lambda items: items

    async def fetch(self, start: int) -> list[wire.ReplayItem]:
        if self.fail is not None:
            raise self.fail
        return self.mangle([wire.ReplayItem(s, p) for s, p in sorted(self.buffer.items()) if s >= start])


def fold(batches: Sequence[tuple[wire.KVEvent, ...]]) -> set[int]:
    out: set[int] = set()
    for events in batches:
        for ev in events:
            if isinstance(ev, wire.BlockStored):
                out.update(ev.block_hashes)
            elif isinstance(ev, wire.BlockRemoved):
                out.difference_update(ev.block_hashes)
            else:
                out.clear()
    return out


VALID_KV_PAYLOADS = st.builds(
    lambda ts, events: wire.encode_kv_batch(wire.KVEventBatch(ts, events, 0)), st.floats(), EVENTS
)
SEQS = st.integers(0, 60) | st.sampled_from([2**40, 2**63 - 1]) | st.integers(0, 2**63 - 1)


@FUZZ
@given(
    junk=st.lists(st.tuples(SEQS, KV_PAYLOADS | VALID_KV_PAYLOADS | VALID_KV_PAYLOADS), max_size=12),
    replay=st.lists(st.tuples(st.integers(0, 60) | INT64, KV_PAYLOADS | VALID_KV_PAYLOADS), max_size=6),
    replay_fails=st.booleans(),
    load_seqs=st.lists(st.integers(0, 40), max_size=4),
)
def test_follower_survives_any_frames_and_then_applies_a_valid_one(
    junk: list[tuple[int, bytes]], replay: list[tuple[int, bytes]], replay_fails: bool, load_seqs: list[int]
) -> None:
    async def run() -> None:
        emitted: list[int] = []

        async def emit(seq: int, _ts: float, _events: tuple[wire.KVEvent, ...]) -> None:
            emitted.append(seq)

        mirror = BlockMirror(BS)
        rep = ScriptedReplay(dict(replay))
        if replay_fails:
            rep.fail = ReplayError("timeout")
        f = KvFollower(mirror, AgentCounters(), rep, emit)
        for k, (seq, payload) in enumerate(junk):
            try:
                batch = wire.decode_kv_batch(payload)
            except wire.WireError:
                continue
            await f.on_batch(seq, batch)
            if k < len(load_seqs):  # suspected restarts interleaved
                await f.verify()
        await f.bootstrap()
        # a valid frame is still processed: in sequence, it is applied as is
        good = wire.KVEventBatch(time.time(), (wire.BlockStored((101, 102), None, (), BS),))
        seq = f.expected if f.expected is not None else 0
        rep.fail, rep.buffer = None, {}
        await f.on_batch(seq, good)
        assert f.expected == seq + 1 and 101 in mirror and 102 in mirror and emitted[-1] == seq

    asyncio.run(run())


@settings(FUZZ, max_examples=80)
@given(
    stream=st.lists(EVENTS, min_size=1, max_size=30),
    faults=st.lists(st.sampled_from(["ok", "ok", "ok", "drop", "dup", "swap", "late", "junk"]), max_size=30),
    mangle_replay=st.booleans(),
)
def test_follower_is_exact_after_drops_duplicates_swaps_and_junk(
    stream: list[tuple[wire.KVEvent, ...]], faults: list[str], mangle_replay: bool
) -> None:
    """An engine stream delivered with faults -- frames dropped, duplicated, swapped with the next, sent
    again just before the end ("late", up to 30 behind), preceded by junk -- and a replay buffer holding all
    of it (its replies possibly shuffled, duplicated and salted with bad payloads): once the last batch
    arrives, the mirror is the fold of the whole stream, and no late frame was taken for a restart."""
    batches = [wire.KVEventBatch(1000.0 + k + 0.5, events, 0) for k, events in enumerate(stream)]
    payloads = {k: wire.encode_kv_batch(b) for k, b in enumerate(batches)}
    rng = random.Random(len(stream) * 31 + len(faults))

    def mangle(items: list[wire.ReplayItem]) -> list[wire.ReplayItem]:
        out = [*items, *items[: len(items) // 2]]
        out += [wire.ReplayItem(it.seq, b"\xc1") for it in items[::3]]
        rng.shuffle(out)
        return out

    async def run() -> None:
        async def emit(_seq: int, _ts: float, _events: tuple[wire.KVEvent, ...]) -> None:
            pass

        mirror = BlockMirror(BS)
        rep = ScriptedReplay(payloads)
        if mangle_replay:
            rep.mangle = mangle
        counters = AgentCounters()
        f = KvFollower(mirror, counters, rep, emit)
        pending: tuple[int, bytes] | None = None  # a swapped frame, sent after the next one
        late: list[tuple[int, bytes]] = []  # frames sent again just before the last one

        async def deliver(seq: int, payload: bytes) -> None:
            try:
                s, batch = decode_kv_frame([b"kv", wire.seq_to_bytes(seq), payload], b"kv")
            except wire.WireError:
                return
            await f.on_batch(s, batch)

        for k in range(len(batches) - 1):
            fault = faults[k] if k < len(faults) else "ok"
            frame = (k, payloads[k])
            if fault == "junk":
                await deliver(k, b"\xc1 junk")
            if fault == "late":
                late.append(frame)
            if fault == "drop":
                continue
            if fault == "swap" and pending is None:
                pending = frame
                continue
            await deliver(*frame)
            if fault == "dup":
                await deliver(*frame)
            if pending is not None and pending != frame:
                await deliver(*pending)
                pending = None
        for frame in reversed(late):
            await deliver(*frame)
        await deliver(len(batches) - 1, payloads[len(batches) - 1])  # the last batch arrives
        assert counters.resync_incomplete == 0 and counters.engine_restarts == 0
        assert set(mirror) == fold([b.events for b in batches])

    asyncio.run(run())


# ----------------------------------------------------------------------------- the router: subscriber + core


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def mono(self) -> float:
        return self.t


def legit_frame(seq: int, msg: wire.ClusterMessage) -> list[bytes]:
    topic = {
        wire.EventBatch: wire.TOPIC_EVENTS,
        wire.LoadReport: wire.TOPIC_LOAD,
        wire.Heartbeat: wire.TOPIC_HEARTBEAT,
    }[type(msg)]
    return wire.make_frame(topic, seq, wire.encode_message(msg))


def heartbeat(epoch: int, healthy: bool = True) -> wire.Heartbeat:
    return wire.Heartbeat("i0", epoch, 0.0, "http://e", healthy, BS, 0, "m", "tcp://snap")


@FUZZ
@given(
    junk=st.lists(
        st.tuples(
            st.sampled_from(["tcp://a", "tcp://evil"]), frames_of(list(wire.CLUSTER_TOPICS), CLUSTER_PAYLOADS)
        ),
        max_size=15,
    ),
    snapshots=st.lists(
        st.builds(
            wire.Snapshot,
            instance=st.sampled_from(["i0", "i0", "i1"]),
            agent_epoch=st.sampled_from([1, 1, 2]),
            seq=st.integers(-5, 60) | st.sampled_from([-(2**63), -(2**40), 2**63 - 1]) | INT64,
            block_size=st.sampled_from([BS, BS, 8]),
            events=EVENTS,
        ),
        max_size=6,
    ),
)
def test_router_core_survives_any_frames_and_snapshots_and_resyncs_exactly(
    junk: list[tuple[str, list[bytes]]], snapshots: list[wire.Snapshot]
) -> None:
    clock = Clock()
    jobs: list[SnapshotJob] = []
    core = RoutingModel(RouterConfig(port=0).model, jobs.append, mono=clock.mono, wall=clock.mono)
    sub = Subscriber([], core.on_message, ctx=zmq.asyncio.Context.instance())
    seq = 0

    def send(msg: wire.ClusterMessage, endpoint: str = "tcp://a") -> None:
        nonlocal seq
        rec = sub.handle_frames(endpoint, legit_frame(seq, msg))
        seq += 1
        assert rec is not None
        core.on_message(rec)

    real = (wire.BlockStored((1, 2, 3), None, (), BS),)
    send(heartbeat(1))
    assert core.on_snapshot(jobs[-1], wire.Snapshot("i0", 1, seq - 1, BS, real))
    seq += 2  # a lost frame: i0 resyncs, so the random snapshot answers below meet a live job
    send(heartbeat(1))
    # junk frames and random snapshot answers: nothing raises, the index stays consistent
    for k in range(max(len(junk), len(snapshots))):
        if k < len(junk):
            endpoint, frames = junk[k]
            rec = sub.handle_frames(endpoint, frames)
            if rec is not None:
                core.on_message(rec)
        if k < len(snapshots):
            core.on_snapshot(jobs[-1], snapshots[k])
        clock.t += 0.3
        core.tick()
        assert core.index is not None
        core.index.check_invariants()
    # The legit agent restarts (new epoch): its instance resyncs from a good snapshot and is exact.
    assert core.index is not None and core.block_size == BS
    seq = 0
    send(heartbeat(9))
    answered: set[int] = set()
    for _ in range(20):
        st0 = core.table.get("i0")
        assert st0 is not None
        if st0.sync == "synced":
            break
        for job in [j for j in jobs if j.generation not in answered]:
            answered.add(job.generation)
            core.on_snapshot(job, wire.Snapshot("i0", 9, seq - 1, BS, real))
        clock.t += 1.0
        core.tick()
        send(heartbeat(9))
    st0 = core.table.get("i0")
    assert st0 is not None and st0.sync == "synced" and st0.is_routable
    assert {h for ev in core.index.dump("i0") for h in ev.block_hashes} == {1, 2, 3}
    core.index.check_invariants()


# ------------------------------------------------------------------------------ real sockets: streams


class ReplayProxy:
    """Between the agent's replay DEALER and the engine's replay ROUTER: forwards each request and mangles
    the answer (items shuffled, some duplicated, malformed replies and bad payloads mixed in; the end
    marker stays last)."""

    def __init__(self, ctx: zmq.asyncio.Context, engine_replay: str, seed: int) -> None:
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.bind("tcp://127.0.0.1:*")
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back = ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.connect(engine_replay)
        self.rng = random.Random(seed)
        self.requests = self.junk = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ReplayProxy:
        self._task = asyncio.create_task(self._serve())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.front.close(0)
        self.back.close(0)

    async def _serve(self) -> None:
        rng = self.rng
        while True:
            ident, *request = await self.front.recv_multipart()
            self.requests += 1
            await self.back.send_multipart(request)
            replies: list[list[bytes]] = []
            while True:
                reply = await self.back.recv_multipart()
                if reply[1] == b"":  # [b"", b"", -1, b""]: the end marker
                    end = reply
                    break
                replies.append(reply)
            out = list(replies)
            out += [r for r in replies if rng.random() < 0.3]  # duplicates
            for r in replies:
                if rng.random() < 0.3:
                    self.junk += 1
                    out.append(
                        rng.choice(
                            [[b"", b"junk"], [b"", r[1], b"\x01\x02", r[3]], [b"", r[1], r[2], b"\xc1"]]
                        )
                    )
            rng.shuffle(out)
            for r in [*out, end]:
                await self.front.send_multipart([ident, *r])


async def test_mangled_kv_load_replay_and_agent_streams_still_end_exact() -> None:
    """Real engine, agent, router. Junk, duplicates and swaps on the engine's KV stream (plus drops, so the
    replay socket is used), on its load stream, on the replay replies and on the agent's stream to the
    router: every malformed frame is counted and skipped, no false restart, and once the streams settle
    the index equals the mirror equals the engine's cache."""
    ctx = zmq.asyncio.Context()
    srv, witness = await start_engine(engine_config())
    closers = [srv.stop]
    try:
        kv = ManglingRelay(
            ctx, srv.endpoints["kv"], [b"kv"], drop=0.15, junk=0.2, duplicate=0.15, swap=0.15, seed=1
        )
        load = ManglingRelay(ctx, srv.endpoints["load"], [b"load"], junk=0.3, duplicate=0.2, swap=0.2, seed=2)
        proxy = ReplayProxy(ctx, srv.endpoints["replay"], seed=3)
        for piece in (kv.start(), load.start(), proxy.start()):
            closers.insert(0, piece.close)
        cfg = agent_config(
            srv.endpoints["http"], "i0", kv_endpoint=kv.endpoint, load_endpoint=load.endpoint,
            replay_endpoint=proxy.endpoint,
        )  # fmt: skip
        runner = await AgentRunner(cfg).start()
        closers.insert(0, runner.stop)
        topics = list(wire.CLUSTER_TOPICS)
        pub = ManglingRelay(ctx, runner.agent.pub_endpoint, topics, junk=0.2, duplicate=0.1, swap=0.1, seed=4)
        closers.insert(0, pub.start().close)
        router = RouterServer(router_config([pub.endpoint]))
        await router.start()
        closers.insert(0, router.stop)
        async with http_session() as http:
            await drive(http, srv.endpoints["http"], Traffic(seed=5), n=150, concurrency=2)
            await quiesce(srv)
            # Settle: the KV stream stops being lossy/mangled and one more batch reveals any last gap.
            kv.drop = 0.0
            kv.mangling(False)
            await kv.flush()
            status, _ = await generate(http, srv.endpoints["http"], Traffic(seed=6).fresh())
            assert status == 200
            await quiesce(srv)
            await wait_until(lambda: engine_next_seq_seen(runner) == witness.next_seq, "agent caught up")
            counters = runner.agent.counters
            assert mirror_blocks(runner) == engine_blocks(srv) == witness.fold()
            assert counters.engine_restarts == 0 and counters.resync_incomplete == 0
            m = counters.malformed
            assert kv.junk and sum(v for (s, _), v in m.items() if s == "kv") > 0
            assert counters.duplicates > 0 and counters.gaps > 0
            await wait_until(
                lambda: sum(v for (s, _), v in m.items() if s == "load") > 0, "load junk counted"
            )
            assert (
                proxy.requests > 0
                and proxy.junk > 0
                and sum(v for (s, _), v in m.items() if s == "replay") > 0
            )

            last = runner.published() - 1  # the agent's stream stays mangled: heartbeats reveal every fault
            await wait_until(lambda: synced_past(router.core, "i0", last), "router synced")
            assert index_blocks(router.core, "i0") == mirror_blocks(runner)
            ss = router.subscriber.stats
            assert sum(ss.malformed.values()) >= 1 and ss.discontinuities["seq_back"] > 0
            assert router.core.stats.resyncs[("i0", "seq_back")] > 0
    finally:
        await close_all(*closers)
        ctx.destroy(linger=0)


# ------------------------------------------------------------------------------ real sockets: ROUTERs


async def test_junk_snapshot_requests_are_counted_and_a_valid_one_is_answered() -> None:
    ctx = zmq.asyncio.Context()
    srv, _ = await start_engine(engine_config())
    runner = await AgentRunner(agent_config(srv.endpoints["http"], "i0")).start()
    try:
        async with http_session() as http:
            await drive(http, srv.endpoints["http"], Traffic(seed=7), n=10)
        await quiesce(srv)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(runner.agent.snapshot_endpoint)
        rng = random.Random(8)
        sent = 0
        for _ in range(60):
            kind = rng.randrange(4)
            if kind == 0:
                frames = [rng.randbytes(rng.randrange(10)) for _ in range(rng.randrange(1, 5))]
            elif kind == 1:
                frames = [b"", rng.randbytes(rng.randrange(20))]
            elif kind == 2:
                frames = [b"", pack({"type": "Heartbeat"})]
            else:
                frames = junk_frames(rng, b"")
            if (
                frames
                and frames[0] == b""
                and len(frames) == 2
                and frames[1] == wire.encode_message(wire.SnapshotRequest())
            ):
                continue
            await dealer.send_multipart(frames)
            sent += 1
        m = runner.agent.counters.malformed
        await wait_until(lambda: sum(v for (s, _), v in m.items() if s == "snapshot") == sent, "junk counted")
        request = [b"", wire.encode_message(wire.SnapshotRequest())]
        await dealer.send_multipart(request)
        await dealer.send_multipart(request)  # a duplicated request is answered twice
        for _ in range(2):
            empty, payload = await asyncio.wait_for(dealer.recv_multipart(), 5)
            snap = wire.decode_message(payload)
            assert empty == b"" and isinstance(snap, wire.Snapshot)
            assert {h for ev in snap.events for h in ev.block_hashes} == engine_blocks(srv)  # type: ignore[union-attr]
        dealer.close(0)
    finally:
        await runner.stop()
        await srv.stop()
        ctx.destroy(linger=0)


async def test_junk_replay_requests_are_counted_and_a_valid_one_is_answered() -> None:
    ctx = zmq.asyncio.Context()
    srv, witness = await start_engine(engine_config())
    try:
        async with http_session() as http:
            await drive(http, srv.endpoints["http"], Traffic(seed=9), n=10)
        await quiesce(srv)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(srv.endpoints["replay"])
        rng = random.Random(10)
        sent = 0
        for _ in range(60):
            n = rng.choice([1, 2, 3])
            frames = [rng.randbytes(rng.choice([0, 3, 8, 9])) for _ in range(n)]
            if n == 2 and frames[0] == b"" and len(frames[1]) == 8:
                frames[1] += b"x"  # would be a valid request
            await dealer.send_multipart(frames)
            sent += 1
        await wait_until(lambda: srv.malformed_replay_requests == sent, "junk counted")
        for _ in range(2):  # a duplicated request is answered twice, each in full
            await dealer.send_multipart(wire.replay_request(0))
        got: list[int] = []
        while len(got) < 2 * (witness.next_seq + 1):
            item = wire.parse_replay_reply(await asyncio.wait_for(dealer.recv_multipart(), 5))
            got.append(item.seq)
        assert got == [*range(witness.next_seq), -1] * 2
        dealer.close(0)
    finally:
        await srv.stop()
        ctx.destroy(linger=0)


async def test_junk_snapshot_replies_are_counted_and_the_instance_still_syncs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fake agent whose snapshot ROUTER answers junk (bad frame counts, not msgpack, the wrong message,
    a snapshot of another instance or block size, one with a bogus seq far below) before a good answer,
    and every answer twice: the router counts each failure, retries, and syncs on the good one."""
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    rtr = ctx.socket(zmq.ROUTER)
    rtr.setsockopt(zmq.LINGER, 0)
    rtr.bind("tcp://127.0.0.1:*")
    snap_ep = rtr.getsockopt_string(zmq.LAST_ENDPOINT)
    seq = 0
    real = (wire.BlockStored((11, 12), None, (), BS),)

    def snap(**kw: Any) -> bytes:
        base: dict[str, Any] = {
            "instance": "i0",
            "agent_epoch": 1,
            "seq": seq - 1,
            "block_size": BS,
            "events": real,
        }
        return wire.encode_message(wire.Snapshot(**{**base, **kw}))

    answers: list[Callable[[], list[bytes]]] = [
        lambda: [b"one frame only"],
        lambda: [b"", b"\xc1 not msgpack"],
        lambda: [b"", wire.encode_message(wire.SnapshotRequest())],
        lambda: [b"", snap(instance="i1")],
        lambda: [b"", snap(block_size=8)],
        lambda: [b"", snap(seq=-(2**63))],  # bogus seq: the frames after it can never all be there
        lambda: [b"", snap()],
    ]

    async def beat() -> None:
        nonlocal seq
        while True:
            hb = wire.Heartbeat("i0", 1, time.time(), "http://127.0.0.1:9", True, BS, 2, "m", snap_ep, 0.03)
            await pub.send_multipart(legit_frame(seq, hb))
            seq += 1
            await asyncio.sleep(0.03)

    async def serve() -> None:
        k = 0
        while True:
            ident, *_request = await rtr.recv_multipart()
            reply = answers[min(k, len(answers) - 1)]()
            k += 1
            await rtr.send_multipart([ident, *reply])
            await rtr.send_multipart([ident, *reply])  # duplicated: the fetch's DEALER is gone by then

    monkeypatch.setattr(router_sync, "SNAPSHOT_RETRY_DELAY", 0.05)  # retry junk answers quickly
    tasks = [asyncio.create_task(beat()), asyncio.create_task(serve())]
    router = RouterServer(router_config([pub.getsockopt_string(zmq.LAST_ENDPOINT)]))
    try:
        await router.start()
        await wait_until(lambda: router.core.routable_count() == 1, "synced on the good snapshot", timeout=20)
        failures = router.core.stats.snapshot_failures
        assert failures["bad_reply"] == 3 and failures["bad_snapshot"] == 2
        assert failures["gap_after_snapshot"] == 1
        assert index_blocks(router.core, "i0") == {11, 12}
    finally:
        await router.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ctx.destroy(linger=0)
