"""Interop with SGLang's own code (sglang 0.5.23, loaded from its wheel without torch: tests/sglang_compat.py).

* Codecs: our ``kvindex.protocol`` encoders produce byte-for-byte what msgspec produces for SGLang's
  ``KVEventBatch`` / events / ``LoadStat``; our decoders read SGLang's bytes (current tagged maps, with
  extra keys such as ``cache_salt``; and the legacy tagged arrays), and SGLang's decoders read ours.
* The agent follows SGLang's real ``ZmqEventPublisher`` (PUB + replay ROUTER on OS-assigned loopback
  ports) behind a stand-in HTTP server: every event type, a late join replayed from seq 0, a gap repaired
  through the replay socket, a gap longer than SGLang's replay buffer, an engine restart (a new publisher
  on the same ports, seq back to 0), and SGLang's ``SchedulerLoadPublisher`` feeding LoadReports.
* Block hashes: ``kvindex.hashing`` equals SGLang's ``get_hash_str``/``hash_str_to_int64`` (its native
  C++ hash, built from the wheel's source) and what its ``KVCacheEventRecorder`` publishes for radix nodes.

Every test skips (with the reason) only when SGLang's wheel cannot be installed or loaded; the hash tests
that need SGLang's native hash also skip when it cannot be built, and golden values taken from it run
regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from zmq.utils.monitor import recv_monitor_message

from agents.agent import Agent, serve
from agents.agent.config import AgentConfig
from agents.agent.counters import AgentCounters
from agents.agent.engine_link import ReplayClient
from kvindex import protocol as wire
from kvindex.hashing import block_hashes, chained_digests
from tests.ports import free_port
from tests.sglang_compat import (
    BUILD_TIMEOUT_S,
    INSTALL_TIMEOUT_S,
    SGLANG_VERSION,
    SGLang,
    SGLangUnavailable,
    load_sglang,
    needs_setup,
)

# Each test is bounded; the session fixture's one-off install and build run inside the first test's bound.
pytestmark = pytest.mark.timeout(20 + (INSTALL_TIMEOUT_S + BUILD_TIMEOUT_S if needs_setup() else 0))

BS = 4  # page size of the stand-in engine, tokens
A = list(range(1, 13))  # three pages
B = list(range(100, 108))  # two pages
C = list(range(200, 204))


@pytest.fixture(scope="session")
def sgl() -> SGLang:
    try:
        return load_sglang()
    except SGLangUnavailable as exc:
        pytest.skip(f"SGLang {SGLANG_VERSION}'s code is unavailable: {exc}")


@pytest.fixture(scope="session")
def sgl_hash(sgl: SGLang) -> SGLang:
    try:
        sgl.require_native_hash()
    except SGLangUnavailable as exc:
        pytest.skip(str(exc))
    return sgl


# --------------------------------------------------------------------------- our events <-> SGLang's


def stored(tokens: Sequence[int], prefix: Sequence[int] = (), bs: int = BS) -> wire.BlockStored:
    """Our BlockStored for the pages of ``tokens`` cached right after the (already cached) ``prefix``."""
    hashes = block_hashes([*prefix, *tokens], bs)
    k = len(prefix) // bs
    return wire.BlockStored(tuple(hashes[k:]), hashes[k - 1] if k else None, tuple(tokens), bs)


def removed(tokens: Sequence[int], prefix: Sequence[int] = (), bs: int = BS) -> wire.BlockRemoved:
    return wire.BlockRemoved(tuple(block_hashes([*prefix, *tokens], bs)[len(prefix) // bs :]))


def sg_medium(kv: Any, medium: str) -> Any:
    """SGLang passes the ``StorageMedium`` str-enum (``record_store``'s default is ``StorageMedium.GPU``)."""
    try:
        return kv.StorageMedium(medium)
    except ValueError:
        return medium


def sg_event(kv: Any, ev: wire.KVEvent) -> Any:
    """SGLang's struct for one of our events, built the way its ``KVCacheEventRecorder`` builds it."""
    if isinstance(ev, wire.BlockStored):
        return kv.BlockStored(
            block_hashes=list(ev.block_hashes),
            parent_block_hash=ev.parent_block_hash,
            token_ids=list(ev.token_ids),
            block_size=ev.block_size,
            lora_id=ev.lora_id,
            medium=sg_medium(kv, ev.medium),
        )
    if isinstance(ev, wire.BlockRemoved):
        return kv.BlockRemoved(block_hashes=list(ev.block_hashes), medium=sg_medium(kv, ev.medium))
    return kv.AllBlocksCleared()


def sg_batch(kv: Any, batch: wire.KVEventBatch) -> Any:
    return kv.KVEventBatch(
        ts=batch.ts, events=[sg_event(kv, e) for e in batch.events], attn_dp_rank=batch.attn_dp_rank
    )


def legacy_classes() -> dict[str, type]:
    """SGLang's event classes as they were before 2026-09 (sglang PR #37482): tagged *arrays*.

    Declared here (``array_like=True`` + ``tag``, fields in the old order) since the 0.5.23 wheel only
    has the tagged-map classes.
    """
    import msgspec

    class LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
        pass

    class LegacyBlockStored(LegacyEvent, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None = None

    class LegacyBlockRemoved(LegacyEvent, tag="BlockRemoved"):
        block_hashes: list[int]
        medium: str | None = None

    class LegacyAllBlocksCleared(LegacyEvent, tag="AllBlocksCleared"):
        pass

    return {
        "BlockStored": LegacyBlockStored,
        "BlockRemoved": LegacyBlockRemoved,
        "AllBlocksCleared": LegacyAllBlocksCleared,
    }


def legacy_event(classes: dict[str, type], ev: wire.KVEvent, omit_medium: bool = False) -> Any:
    """The pre-2026-09 struct for one of our events; ``omit_medium`` leaves ``medium`` at its None default."""
    if isinstance(ev, wire.BlockStored):
        return classes["BlockStored"](
            list(ev.block_hashes),
            ev.parent_block_hash,
            list(ev.token_ids),
            ev.block_size,
            ev.lora_id,
            None if omit_medium else ev.medium,
        )
    if isinstance(ev, wire.BlockRemoved):
        return classes["BlockRemoved"](list(ev.block_hashes), None if omit_medium else ev.medium)
    return classes["AllBlocksCleared"]()


I64_MIN, I64_MAX, U32_MAX = -(2**63), 2**63 - 1, 2**32 - 1

BATCHES: list[wire.KVEventBatch] = [
    wire.KVEventBatch(1761000000.123456, (stored(A),), 0),  # multi-page, root parent (None)
    wire.KVEventBatch(0.5, (stored(B, A), removed(A[8:], A[:8]), wire.AllBlocksCleared()), None),
    wire.KVEventBatch(2.0, (), 7),
    wire.KVEventBatch(
        3.25,
        (
            wire.BlockStored((I64_MIN, I64_MAX, -1, 0), I64_MAX, tuple([U32_MAX, 0, 127, 128] * 4), 4),
            wire.BlockStored((2**31, -(2**31) - 1), -32, (65535, 65536), 1),
            wire.BlockRemoved((I64_MIN, -33, 255, 2**32), "CPU_PINNED"),
        ),
        2**31,
    ),
]


# ------------------------------------------------------------------------------------- codec tests


@pytest.mark.parametrize("i", range(len(BATCHES)))
def test_kv_batch_bytes_equal_sglang_msgspec(sgl: SGLang, i: int) -> None:
    import msgspec

    ours = wire.encode_kv_batch(BATCHES[i])
    theirs = msgspec.msgpack.encode(sg_batch(sgl.kv_events, BATCHES[i]))
    assert ours == theirs, (
        f"MISMATCH kvindex.protocol.encode_kv_batch vs SGLang {sgl.version} KVEventBatch:\n"
        f"ours   {ours.hex()}\ntheirs {theirs.hex()}"
    )
    # and each side reads the other's bytes back to the same values
    assert wire.decode_kv_batch(theirs) == BATCHES[i]
    assert msgspec.msgpack.decode(ours, type=sgl.kv_events.KVEventBatch) == sg_batch(
        sgl.kv_events, BATCHES[i]
    )


def test_sglang_optional_fields_are_read_and_extra_keys_ignored(sgl: SGLang) -> None:
    import msgspec

    kv = sgl.kv_events
    batch = kv.KVEventBatch(
        ts=9.5,
        events=[
            kv.BlockStored(
                block_hashes=[11, 12],
                parent_block_hash=10,
                token_ids=[1, 2, 3, 4],
                block_size=2,
                lora_id=3,
                medium=kv.StorageMedium.CPU,
                cache_salt="salt",
                session_id="sess-1",
                lora_name="my-adapter",
            ),
            kv.BlockStored(
                block_hashes=[5], parent_block_hash=None, token_ids=[9], block_size=1, lora_id=None
            ),
            kv.BlockRemoved(block_hashes=[11]),  # medium None: omitted on the wire
            kv.AllBlocksCleared(),
        ],
        attn_dp_rank=None,
    )
    raw = msgspec.msgpack.encode(batch)
    on_wire = msgpack.unpackb(raw)
    assert on_wire[1][0]["cache_salt"] == "salt" and on_wire[1][0]["lora_name"] == "my-adapter"
    assert "medium" not in on_wire[1][1] and "medium" not in on_wire[1][2]
    assert wire.decode_kv_batch(raw) == wire.KVEventBatch(
        9.5,
        (
            wire.BlockStored((11, 12), 10, (1, 2, 3, 4), 2, 3, "CPU_PINNED"),
            wire.BlockStored((5,), None, (9,), 1, None, "GPU"),  # an omitted medium reads as GPU
            wire.BlockRemoved((11,), "GPU"),
            wire.AllBlocksCleared(),
        ),
        None,
    )


def test_legacy_tagged_arrays(sgl: SGLang) -> None:
    import msgspec

    kv = sgl.kv_events
    legacy = legacy_classes()
    for batch in BATCHES:
        # SGLang's EventBatch (events: list[Any]) around pre-2026-09 events
        events = [legacy_event(legacy, e) for e in batch.events]
        raw = msgspec.msgpack.encode(
            kv.EventBatch(ts=batch.ts, events=events, attn_dp_rank=batch.attn_dp_rank)
        )
        assert raw == wire.encode_kv_batch(batch, legacy_arrays=True), (
            f"MISMATCH legacy arrays:\nours   {wire.encode_kv_batch(batch, legacy_arrays=True).hex()}\n"
            f"theirs {raw.hex()}"
        )
        assert wire.decode_kv_batch(raw) == batch
    # medium left at its None default (msgspec keeps it in the array): it reads as GPU
    raw = msgspec.msgpack.encode(
        kv.EventBatch(
            ts=1.0,
            events=[legacy_event(legacy, stored(C), True), legacy_event(legacy, removed(C), True)],
            attn_dp_rank=0,
        )
    )
    assert [e[-1] for e in msgpack.unpackb(raw)[1]] == [None, None]
    assert wire.decode_kv_batch(raw) == wire.KVEventBatch(1.0, (stored(C), removed(C)), 0)


LOAD_STATS = [
    wire.LoadStat(3, 5, 1200, 50_000, 0, 777, 1300, 64, 9000, 123),
    wire.LoadStat(0, 0, 0, 0, None, 0, 0, 0, 0, 0),
    wire.LoadStat(1024, 70_000, 2**31, 2**40, 15, 2**33, 2**34, 4096, 2**50, 2**62),
]


@pytest.mark.parametrize("stat", LOAD_STATS)
def test_load_stat_bytes_equal_sglang_msgspec(sgl: SGLang, stat: wire.LoadStat) -> None:
    import msgspec

    LoadStat = sgl.load_publisher.LoadStat
    values = {f: getattr(stat, f) for f in wire.LoadStat.__dataclass_fields__}
    ours = wire.encode_load_stat(stat)
    theirs = msgspec.msgpack.encode(LoadStat(**values))
    assert ours == theirs, (
        f"MISMATCH encode_load_stat vs SGLang LoadStat:\nours   {ours.hex()}\ntheirs {theirs.hex()}"
    )
    assert wire.decode_load_stat(theirs) == stat
    assert msgspec.msgpack.decode(ours, type=LoadStat) == LoadStat(**values)
    # SGLang's field order is ours
    assert tuple(LoadStat.__struct_fields__) == tuple(wire.LoadStat.__dataclass_fields__)


def test_load_stat_six_field_prefix(sgl: SGLang) -> None:
    """The #34608-compatible prefix (first six positions) that older servers send; the rest read as 0."""
    import msgspec

    class OldLoadStat(msgspec.Struct, array_like=True, tag="LoadStat"):
        num_running_reqs: int
        num_waiting_reqs: int
        num_tokens: int
        max_total_num_tokens: int
        attn_dp_rank: int | None = None

    raw = msgspec.msgpack.encode(OldLoadStat(2, 1, 300, 4000, 0))
    assert wire.decode_load_stat(raw) == wire.LoadStat(2, 1, 300, 4000, 0, 0, 0, 0, 0, 0)
    # and SGLang 0.5.23 reads it too (it is the same prefix)
    assert msgspec.msgpack.decode(raw, type=sgl.load_publisher.LoadStat).num_tokens == 300


# ----------------------------------------------------------------------------------------- hashing

# Produced by SGLang 0.5.23's own get_hash_str + hash_str_to_int64 (its native hash_binding.cpp, built
# from the wheel by tests/sglang_compat.py), recorded so they are checked even where it cannot be built.
SGLANG_GOLDEN: list[tuple[list[int], int, list[int]]] = [
    (list(range(1, 9)), 1, [7470307888890966271, -1634645291211865391, 7325169757385981536,
                            -4123756397210254169, -8996316855309560295, -5260815463021685453,
                            -8365104043257458777, -755789232781062269]),
    (list(range(1, 9)), 4, [-3488128144981237669, 5674439469042975057]),
    ([(i * 7919) % 152064 for i in range(192)], 64, [3825357307314246122, -4648851892344446747,
                                                      438182375734743505]),
    ([2**32 - 1 - i for i in range(48)], 16, [-2184015880783820853, 5844198836427735722, 3324078464705376474]),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(SGLANG_GOLDEN)))
def test_block_hashes_match_sglang_golden_values(case: int) -> None:
    tokens, page_size, expected = SGLANG_GOLDEN[case]
    assert block_hashes(tokens, page_size) == expected


def _token_lists() -> Iterator[list[int]]:
    yield list(range(1, 9))
    yield [(i * 7919) % 152064 for i in range(64 * 4 + 5)]  # trailing partial page
    yield [(i * 2654435761) % 2**32 for i in range(16 * 8)]  # the whole uint32 range
    yield [0] * 64 + [U32_MAX] * 64
    yield [42] * 130


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_block_hashes_equal_sglang_get_hash_str(sgl_hash: SGLang, page_size: int) -> None:
    u = sgl_hash.mem_cache_utils
    for tokens in _token_lists():
        n = len(tokens) // page_size
        hexes = u.get_hash_str(tokens, None, page_size=page_size)
        # SGLang also hashes a trailing partial page; its radix cache only ever keys full pages.
        assert len(hexes) == -(-len(tokens) // page_size)
        theirs = [u.hash_str_to_int64(h) for h in hexes[:n]]
        ours = block_hashes(tokens, page_size)
        assert ours == theirs, f"MISMATCH block hashes, page_size={page_size}, tokens[:8]={tokens[:8]}"
        digests = chained_digests(tokens, page_size)
        assert [d.hex() for d in digests] == hexes[:n]  # the whole 32-byte digest, not just 8 bytes
        # chaining across radix nodes: SGLang continues from the parent node's last hex digest
        for k in (1, n // 2, n - 1):
            if not 0 < k < n:
                continue
            rest = u.get_hash_str(tokens[k * page_size : n * page_size], hexes[k - 1], page_size=page_size)
            assert [u.hash_str_to_int64(h) for h in rest] == ours[k:]
            assert block_hashes(tokens[k * page_size :], page_size, parent=digests[k - 1]) == ours[k:]


@dataclass(eq=False)
class FakeKey:
    """What SGLang's KVCacheEventRecorder and native hash read from a RadixKey."""

    token_ids: list[int]
    extra_key: str | None = None
    cache_salt: str | None = None
    is_bigram: bool = False

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class FakeNode:
    """What the recorder reads from a radix TreeNode."""

    key: FakeKey
    parent: FakeNode | None
    hash_value: list[str] | None = None
    event_hash_value: list[str] | None = None


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_sglang_event_recorder_publishes_our_hashes(sgl_hash: SGLang, page_size: int) -> None:
    """SGLang's KVCacheEventRecorder on radix nodes emits the events we expect, with our hashes."""
    import msgspec

    kv, ps = sgl_hash.kv_events, page_size
    x = [(i * 31 + 7) % 50_000 for i in range(3 * ps)]
    y = [(i * 17 + 3) % 50_000 for i in range(2 * ps)]
    z = [(i * 13 + 1) % 50_000 for i in range(ps)]
    root = FakeNode(FakeKey([]), None, hash_value=[])
    nx = FakeNode(FakeKey(x), root)
    ny = FakeNode(FakeKey(y), nx)
    nz = FakeNode(FakeKey(z), root)
    nz2 = FakeNode(FakeKey(z), nx)
    rec = sgl_hash.events.KVCacheEventRecorder(enabled=True, page_size=ps)

    def published(events: list[Any]) -> tuple[wire.KVEvent, ...]:
        raw = msgspec.msgpack.encode(kv.KVEventBatch(ts=1.0, events=events, attn_dp_rank=0))
        return wire.decode_kv_batch(raw).events

    rec.record_store(nx)  # one BlockStored per page, merged by the recorder into one event
    rec.record_store(ny)  # continues nx's chain: merged too
    rec.record_store(nz)  # a new root chain
    rec.record_store(nz2)  # below nx, but not contiguous with the queue's tail: its own event
    assert published(rec.take()) == (stored(x + y, bs=ps), stored(z, bs=ps), stored(z, x, bs=ps))
    rec.record_remove(ny)
    rec.record_remove(nz)
    rec.record_all_cleared()
    assert published(rec.take()) == (
        wire.BlockRemoved(tuple(block_hashes(x + y, ps)[3:]) + tuple(block_hashes(z, ps))),
        wire.AllBlocksCleared(),
    )


# ------------------------------------------------------------------------- the agent vs SGLang's publisher


class Handshakes:
    """Counts ZMTP handshakes completed on a publisher's PUB socket (a SUB connected), via a socket monitor.

    SGLang's PUB is not an XPUB, so this is how the test knows the agent's SUB is there before publishing.
    The monitor is attached right after the publisher is built, while its thread is idle (the socket is
    otherwise used only by that thread).
    """

    def __init__(self, pub: Any) -> None:
        self.sock = pub._pub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.count = 0

    def _wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise TimeoutError(f"{self.count} subscriber handshakes, expected {n}")
            if recv_monitor_message(self.sock)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.count += 1

    async def wait(self, n: int, timeout: float = 5.0) -> None:
        await asyncio.to_thread(self._wait, n, timeout)
        await asyncio.sleep(0.05)  # the SUBSCRIBE command follows the handshake

    def close(self) -> None:
        self.sock.close(linger=0)


class TcpProxy:
    """A loopback TCP forwarder in front of SGLang's PUB port: ``cut()`` drops the link (as a network
    failure would), so what SGLang publishes meanwhile is lost for the agent and only replayable."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.open:
                raise ConnectionRefusedError("link cut")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    def resume(self) -> None:
        self.open = True

    def cut(self) -> None:
        self.open = False
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class SGLangEngine:
    """SGLang's real ``ZmqEventPublisher`` (+ optionally its ``SchedulerLoadPublisher``) behind a stand-in
    HTTP server with ``/health``, ``/server_info`` (the ``kv_events`` block SGLang 0.5.23 advertises) and
    ``/v1/models``. ``published`` is the next engine seq."""

    def __init__(self, sgl: SGLang, buffer_steps: int = 1000, proxy: bool = False, advertise: bool = True):
        self.sgl = sgl
        self.kv = sgl.kv_events
        self.buffer_steps = buffer_steps
        self.advertise = advertise  # False: /server_info without kv_events (the agent needs overrides)
        self.healthy = True
        self.published = 0
        self.pub = self._publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", bind=None)
        source = self.pub.describe_local_source(BS)  # SGLang's own description of its bound sockets
        assert source is not None
        self.kv_endpoint: str = source["endpoint"]
        self.replay_endpoint: str = source["replay_endpoint"]
        self.handshakes = Handshakes(self.pub)
        self.proxy = TcpProxy(self._port(self.kv_endpoint)) if proxy else None
        self.load_pub: Any = None
        self.load_port = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _publisher(self, endpoint: str, replay_endpoint: str, bind: bool | None) -> Any:
        pub = self.kv.ZmqEventPublisher(
            attn_dp_rank=0,
            endpoint=endpoint,
            replay_endpoint=replay_endpoint,
            buffer_steps=self.buffer_steps,
            topic="kv",
            bind=bind,
        )
        return pub

    def _port(self, endpoint: str) -> int:
        parsed = self.kv.parse_advertisable_tcp(endpoint)
        assert parsed is not None
        return int(parsed[1])

    @property
    def advertised_kv_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.proxy.port}" if self.proxy else self.kv_endpoint

    async def start(self, load: bool = False) -> None:
        if self.proxy is not None:
            await self.proxy.start()
        if load:
            self.start_load_publisher()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/server_info", self._server_info)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def start_load_publisher(self) -> None:
        """SGLang's SchedulerLoadPublisher, as a server started with ``--load-publish-endpoint`` has it.

        Its real gating and port derivation run; only the bind address is moved from ``*`` (what SGLang
        accepts) to loopback, by wrapping the module function SGLang keeps separate for tests.
        """
        lp: Any = self.sgl.load_publisher
        self.load_port = free_port()
        conf = {"publisher": "zmq", "endpoint": f"tcp://*:{self._port(self.kv_endpoint)}",
                "replay_endpoint": f"tcp://*:{self._port(self.replay_endpoint)}", "topic": "kv"}  # fmt: skip
        original = lp._open_pub_socket
        lp._open_pub_socket = lambda ep: original(ep.replace("tcp://*:", "tcp://127.0.0.1:"))
        try:
            self.load_pub = lp.SchedulerLoadPublisher(
                kv_events_config=json.dumps(conf), load_publish_endpoint=f"tcp://*:{self.load_port}"
            )
        finally:
            lp._open_pub_socket = original
        assert self.load_pub.enable

    def publish_load(self, **counts: int) -> None:
        snapshot = type("LoadSnapshot", (), counts)()
        self.load_pub.publish_load_stat(lambda: snapshot, force=True)

    async def _health(self, _req: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _server_info(self, _req: web.Request) -> web.Response:
        info: dict[str, Any] = {"model_path": "sglang/test-model", "page_size": BS}
        if self.advertise:
            kv_events: dict[str, Any] = {
                "publisher": "zmq",
                "endpoint_host": "127.0.0.1",
                "endpoint_port_base": self._port(self.advertised_kv_endpoint),
                "topic": "kv",
                "block_size": BS,
                "dp_size": 1,
                "replay_endpoint_port_base": self._port(self.replay_endpoint),
            }
            if self.load_pub is not None:
                kv_events |= {"load_endpoint_port_base": self.load_port, "load_topic": self.kv.LOAD_TOPIC}
            info["kv_events"] = kv_events
        return web.json_response(info)

    async def _models(self, _req: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sglang/test-model"}]})

    def publish(self, *events: wire.KVEvent, legacy: bool = False) -> int:
        """Hand one batch to SGLang's publisher (it numbers it); returns its seq."""
        if legacy:
            classes = legacy_classes()
            batch = self.kv.EventBatch(
                ts=1000.0 + self.published, events=[legacy_event(classes, e) for e in events]
            )
        else:
            batch = self.kv.KVEventBatch(
                ts=1000.0 + self.published, events=[sg_event(self.kv, e) for e in events]
            )
        self.pub.publish(batch)
        self.published += 1
        return self.published - 1

    async def drained(self, timeout: float = 5.0) -> None:
        """Until SGLang's publisher thread has sent (and buffered for replay) everything handed to it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pub._event_queue.unfinished_tasks:
            assert loop.time() < deadline, "SGLang's publisher did not drain its queue"
            await asyncio.sleep(0.01)

    async def _shutdown_publisher(self) -> None:
        import atexit

        await asyncio.to_thread(self.pub.shutdown)
        atexit.unregister(self.pub.shutdown)  # it registers itself; a second shutdown at exit costs 1 s
        self.handshakes.close()

    async def restart(self) -> None:
        """An engine restart as seen from outside: a new publisher on the same ports, seq from 0."""
        await self._shutdown_publisher()
        kv_ep = f"tcp://127.0.0.1:{self._port(self.kv_endpoint)}"
        replay_ep = f"tcp://127.0.0.1:{self._port(self.replay_endpoint)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:  # the old sockets' listeners close asynchronously in ZeroMQ's I/O thread
            try:
                self.pub = self._publisher(kv_ep, replay_ep, bind=True)
                break
            except zmq.ZMQError as exc:
                if exc.errno != errno.EADDRINUSE or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self.handshakes = Handshakes(self.pub)
        self.published = 0

    async def stop(self) -> None:
        await self._shutdown_publisher()
        if self.load_pub is not None:
            self.load_pub.close()
        if self.proxy is not None:
            await self.proxy.stop()
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def sglang_engine(sgl: SGLang, load: bool = False, **kw: Any) -> AsyncIterator[SGLangEngine]:
    eng = SGLangEngine(sgl, **kw)
    try:
        await eng.start(load=load)
        yield eng
    finally:
        await eng.stop()


class AgentUnderTest:
    """An in-process agent (``serve``) following ``engine``, and a SUB on the agent's PUB socket."""

    def __init__(self, engine: SGLangEngine, **cfg: Any) -> None:
        self.engine = engine
        settings: dict[str, Any] = {
            "engine_url": engine.url,
            "instance_id": "sgl-0",
            "heartbeat_interval": 0.05,
            "health_interval": 0.05,
            "health_timeout": 0.5,
            "engine_wait": 5.0,
            "replay_timeout": 1.0,
            "publish_token_ids": True,  # these tests compare every field SGLang sent, tokens included
        }
        self.cfg = AgentConfig(**{**settings, **cfg})
        self.ctx = zmq.asyncio.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._task: asyncio.Task[None] | None = None
        self._agent: Agent | None = None

    @property
    def agent(self) -> Agent:
        assert self._agent is not None
        return self._agent

    @property
    def counters(self) -> AgentCounters:
        return self.agent.counters

    async def __aenter__(self) -> AgentUnderTest:
        ready: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(serve(self.cfg, on_ready=ready.set_result, handle_signals=False))
        try:
            self._agent = await asyncio.wait_for(ready, 5)
            self.sub.connect(self.agent.pub_endpoint)
            await self.next(lambda m: isinstance(m, wire.Heartbeat))  # PUB/SUB slow joiner
            await self.engine.handshakes.wait(1)  # the agent's SUB is on SGLang's PUB
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait_for(self._task, 5)
        self.ctx.destroy(linger=0)

    async def next(
        self, pred: Callable[[wire.ClusterMessage], bool] = lambda m: True, timeout: float = 5.0
    ) -> wire.ClusterMessage:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frames = await asyncio.wait_for(self.sub.recv_multipart(), max(0.0, deadline - loop.time()))
            msg = wire.decode_message(wire.split_frame(frames)[2])
            if pred(msg):
                return msg

    async def batches(self, n: int) -> list[wire.EventBatch]:
        out = []
        for _ in range(n):
            m = await self.next(lambda m: isinstance(m, wire.EventBatch))
            assert isinstance(m, wire.EventBatch)
            out.append(m)
        return out

    async def mirror_hashes(self) -> set[int]:
        """The agent's mirror, as its snapshot socket serves it."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.agent.snapshot_endpoint)
        try:
            await dealer.send_multipart([b"", wire.encode_message(wire.SnapshotRequest())])
            _empty, payload = await asyncio.wait_for(dealer.recv_multipart(), 3)
        finally:
            dealer.close(linger=0)
        snap = wire.decode_message(payload)
        assert isinstance(snap, wire.Snapshot)
        out: set[int] = set()
        for ev in snap.events:
            assert isinstance(ev, wire.BlockStored)
            out.update(ev.block_hashes)
        return out


def hashes_of(*events: wire.BlockStored) -> set[int]:
    return {h for ev in events for h in ev.block_hashes}


async def test_agent_decodes_every_event_sglang_publishes(sgl: SGLang) -> None:
    async with sglang_engine(sgl) as eng, AgentUnderTest(eng) as h:
        assert h.agent.engine is not None
        assert (h.agent.engine.kv_endpoint, h.agent.engine.replay_endpoint) == (
            eng.kv_endpoint,
            eng.replay_endpoint,
        )
        plan: list[tuple[tuple[wire.KVEvent, ...], bool]] = [
            ((stored(A),), False),  # three pages in one event
            ((stored(B, A), removed(B[4:], A + B[:4])), False),
            ((stored(C),), True),  # the legacy tagged-array encoding
            ((removed(C),), True),
        ]
        for events, legacy in plan:
            eng.publish(*events, legacy=legacy)
        got = await h.batches(len(plan))
        assert [b.engine_seq for b in got] == [0, 1, 2, 3]
        assert [b.events for b in got] == [events for events, _ in plan]
        assert [b.ts for b in got] == [1000.0, 1001.0, 1002.0, 1003.0]
        assert await h.mirror_hashes() == hashes_of(stored(A), stored(B[:4], A))

        eng.publish(wire.AllBlocksCleared())
        eng.publish(stored(C))
        got = await h.batches(2)
        assert [(b.engine_seq, b.events) for b in got] == [(4, (wire.AllBlocksCleared(),)), (5, (stored(C),))]
        assert await h.mirror_hashes() == hashes_of(stored(C))
        c = h.counters
        assert (c.gaps, c.replayed_batches, c.engine_restarts, c.total_malformed()) == (0, 0, 0, 0)
        assert (c.events["BlockStored"], c.events["BlockRemoved"], c.events["AllBlocksCleared"]) == (4, 2, 1)


async def test_late_join_is_replayed_from_zero_through_sglang_replay(sgl: SGLang) -> None:
    """The agent starts after SGLang published 3 batches (lost live): it replays them from seq 0."""
    async with sglang_engine(sgl, advertise=False) as eng:
        history: list[tuple[wire.KVEvent, ...]] = [(stored(A),), (stored(B),), (removed(A[8:], A[:8]),)]
        for events in history:
            eng.publish(*events)
        await eng.drained()  # sent to nobody, kept in SGLang's replay buffer
        overrides = {"kv_endpoint": eng.kv_endpoint, "replay_endpoint": eng.replay_endpoint}
        async with AgentUnderTest(eng, **overrides) as h:
            eng.publish(stored(C))
            got = await h.batches(4)
            assert [b.engine_seq for b in got] == [0, 1, 2, 3]
            assert [b.events for b in got] == [*history, (stored(C),)]
            assert (h.counters.replayed_batches, h.counters.late_join_incomplete) == (3, 0)
            assert await h.mirror_hashes() == hashes_of(stored(A[:8]), stored(B), stored(C))


async def test_gap_is_repaired_through_sglang_replay(sgl: SGLang) -> None:
    async with sglang_engine(sgl, proxy=True) as eng, AgentUnderTest(eng) as h:
        assert eng.proxy is not None
        eng.publish(stored(A))
        await h.batches(1)
        eng.proxy.cut()  # the link drops: SGLang publishes seqs 1..3 to nobody
        lost: list[tuple[wire.KVEvent, ...]] = [(stored(B),), (removed(A[4:], A[:4]),), (stored(C),)]
        for events in lost:
            eng.publish(*events)
        await eng.drained()
        eng.proxy.resume()
        await eng.handshakes.wait(2)  # the agent's SUB is back
        eng.publish(removed(C))
        got = await h.batches(4)
        assert [b.engine_seq for b in got] == [1, 2, 3, 4]
        assert [b.events for b in got] == [*lost, (removed(C),)]
        c = h.counters
        assert (c.gaps, c.replayed_batches, c.resync_incomplete) == (1, 3, 0)
        assert await h.mirror_hashes() == hashes_of(stored(A[:4]), stored(B))


async def test_gap_longer_than_sglang_buffer_resets_the_mirror(sgl: SGLang) -> None:
    async with sglang_engine(sgl, proxy=True, buffer_steps=2) as eng, AgentUnderTest(eng) as h:
        assert eng.proxy is not None
        eng.publish(stored(A))
        await h.batches(1)
        eng.proxy.cut()
        for ev in (stored(B), removed(A), stored(C, A)):  # seq 1 falls out of the buffer
            eng.publish(ev)
        await eng.drained()
        eng.proxy.resume()
        await eng.handshakes.wait(2)
        eng.publish(stored(B[:4]))
        got = await h.batches(2)
        assert [(b.engine_seq, b.events) for b in got] == [
            (-1, (wire.AllBlocksCleared(),)),
            (4, (stored(B[:4]),)),
        ]
        assert (h.counters.gaps, h.counters.resync_incomplete) == (1, 1)
        assert await h.mirror_hashes() == hashes_of(stored(B[:4]))


async def test_replay_client_against_sglang_router(sgl: SGLang) -> None:
    async with sglang_engine(sgl, buffer_steps=3) as eng:
        batches: list[tuple[wire.KVEvent, ...]] = [
            (stored(A),),
            (stored(B),),
            (removed(B),),
            (stored(C),),
            (wire.AllBlocksCleared(),),
        ]
        for events in batches:
            eng.publish(*events)
        await eng.drained()
        ctx = zmq.asyncio.Context()
        try:
            client = ReplayClient(ctx, eng.replay_endpoint, timeout=2.0)
            items = await client.fetch(0)  # SGLang keeps the last 3 only
            assert [it.seq for it in items] == [2, 3, 4]
            assert [wire.decode_kv_batch(it.payload).events for it in items] == batches[2:]
            assert [wire.decode_kv_batch(it.payload).attn_dp_rank for it in items] == [0, 0, 0]
            assert [it.seq for it in await client.fetch(4)] == [4]
            assert await client.fetch(5) == []
            # the raw replies carry the topic frame: [b"", topic, seq, payload] ... [b"", b"", -1, b""]
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(eng.replay_endpoint)
            await dealer.send_multipart(wire.replay_request(4))
            first = await asyncio.wait_for(dealer.recv_multipart(), 3)
            end = await asyncio.wait_for(dealer.recv_multipart(), 3)
            assert first[:3] == [b"", b"kv", wire.seq_to_bytes(4)]
            assert end == [b"", b"", wire.REPLAY_END, b""]
            assert wire.parse_replay_reply(end).is_end
            client.close()
        finally:
            ctx.destroy(linger=0)


async def test_engine_restart_new_publisher_on_same_ports(sgl: SGLang) -> None:
    async with sglang_engine(sgl) as eng, AgentUnderTest(eng) as h:
        for ev in (stored(A), stored(B), removed(B)):
            eng.publish(ev)
        await h.batches(3)
        eng.healthy = False  # a restarting server does not answer /health
        await h.next(lambda m: isinstance(m, wire.Heartbeat) and not m.engine_healthy)
        await eng.restart()
        await eng.handshakes.wait(1)  # the agent's SUB reconnected to the new publisher
        eng.healthy = True
        eng.publish(stored(C))
        eng.publish(stored(A[:4]))
        got = await h.batches(3)
        assert [(b.engine_seq, b.events) for b in got] == [
            (-1, (wire.AllBlocksCleared(),)),
            (0, (stored(C),)),
            (1, (stored(A[:4]),)),
        ]
        assert h.counters.engine_restarts == 1 and h.counters.resync_incomplete == 0
        assert await h.mirror_hashes() == hashes_of(stored(C), stored(A[:4]))


async def test_sglang_load_publisher_feeds_load_reports(sgl: SGLang) -> None:
    async with sglang_engine(sgl, load=True) as eng, AgentUnderTest(eng) as h:
        assert h.agent.engine is not None
        assert h.agent.engine.load_endpoint == f"tcp://127.0.0.1:{eng.load_port}"
        counts = {
            "num_running_reqs": 3,
            "num_waiting_reqs": 5,
            "num_used_tokens": 1200,
            "max_total_num_tokens": 50_000,
            "num_waiting_uncached_tokens": 777,
            "num_total_tokens": 1300,
            "max_running_requests": 64,
            "total_prefill_uncached_tokens": 9000,
            "total_prefill_busy_us": 0,
        }
        report: wire.ClusterMessage | None = None
        for i in range(100):  # PUB/SUB slow joiner; an unchanged stat is not re-sent within 1 s
            eng.publish_load(**(counts | {"total_prefill_busy_us": i}))
            with contextlib.suppress(asyncio.TimeoutError):
                report = await h.next(lambda m: isinstance(m, wire.LoadReport), timeout=0.1)
                break
        assert isinstance(report, wire.LoadReport)
        assert (report.running, report.waiting, report.queued_prefill_tokens) == (3, 5, 777)
        assert (report.kv_used_tokens, report.kv_capacity_tokens, report.max_running_requests) == (
            1200,
            50_000,
            64,
        )
        # the cumulative prefill counters the router's admission reads (busy time over tokens)
        assert report.total_prefill_uncached_tokens == 9000 and 0 <= report.total_prefill_busy_us < 100
        assert h.counters.total_malformed() == 0
