"""In-process cluster pieces over real sockets, for the loss, lifecycle and frame-fuzz tests.

Everything binds OS-assigned ports on 127.0.0.1 (or re-binds ports it was given, for restarts) and runs in
the test's event loop: the emulated engine (:class:`EngineServer`), the agent (:func:`agents.agent.serve`),
the router (:class:`RouterServer`), and a :class:`LossyRelay` put between two of them to drop a seeded
share of frames. Waits are bounded polls on conditions, never assertions on time.

Ground truth for "exact": :func:`engine_blocks` reads the block hashes of the engine's radix cache
in-process; :class:`EngineWitness` records every KV batch the engine publishes (by wrapping its core's
``drain_events``), so a test knows the engine's next seq and can rebuild any suffix of its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from agents.agent import Agent, serve
from agents.agent.config import AgentConfig
from agents.engine.config import ServerConfig
from agents.engine.server import EngineServer
from kvindex import protocol as wire
from router.config import RouterConfig
from router.model.model import RoutingModel

PAGE = 16


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``pred`` every 10 ms; AssertionError naming ``what`` if it is still false after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------ the relay


class LossyRelay:
    """A ZeroMQ SUB -> XPUB relay that drops a seeded-random share of the frames it forwards.

    ``drop`` may be changed at any time (0 = lossless). :meth:`hold` buffers frames instead of forwarding
    them until :meth:`release` (a stream that is merely slow, not lossy). ``subscribed`` is set once a
    downstream SUB has subscribed to the XPUB. ``seqs`` are the seq frames of everything received.
    """

    def __init__(self, ctx: zmq.asyncio.Context, upstream: str, drop: float = 0.0, seed: int = 0) -> None:
        self.upstream = upstream
        self.drop = drop
        self.rng = random.Random(seed)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(upstream)
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.subscribed = asyncio.Event()
        self.received = self.forwarded = self.dropped = 0
        self.seqs: list[int] = []
        self._held: list[list[bytes]] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> LossyRelay:
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch())]
        return self

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sub.close(0)
        self.pub.close(0)

    def hold(self) -> None:
        """Buffer every frame from now on instead of forwarding it."""
        if self._held is None:
            self._held = []

    async def release(self) -> None:
        """Forward the buffered frames (in order, subject to ``drop``) and go back to relaying."""
        held, self._held = self._held or [], None
        for frames in held:
            await self._forward(frames)

    async def _forward(self, frames: list[bytes]) -> None:
        if self.drop and self.rng.random() < self.drop:
            self.dropped += 1
            return
        self.forwarded += 1
        await self.pub.send_multipart(frames)

    async def _pump(self) -> None:
        while True:
            frames = await self.sub.recv_multipart()
            self.received += 1
            if len(frames) == 3 and len(frames[1]) == 8:
                self.seqs.append(int.from_bytes(frames[1], "big"))
            if self._held is not None:
                self._held.append(frames)
            else:
                await self._forward(frames)

    async def _watch(self) -> None:
        while True:
            msg = await self.pub.recv()
            if msg[:1] == b"\x01":
                self.subscribed.set()


def junk_frames(rng: random.Random, topic: bytes) -> list[bytes]:
    """A multipart message that no decoder may accept, starting with ``topic`` (so that SUB filters let
    it through): a wrong frame count, a seq frame of the wrong length, a payload that is not msgpack or
    truncated msgpack, or a longer topic that only prefix-matches."""
    seq = rng.randrange(2**40).to_bytes(8, "big")
    kind = rng.randrange(6)
    if kind == 0:
        return [topic, *(rng.randbytes(rng.randrange(12)) for _ in range(rng.choice((0, 1, 3, 4))))]
    if kind == 1:
        return [topic, rng.randbytes(rng.choice((0, 3, 7, 9))), rng.randbytes(8)]
    if kind == 2:
        return [topic, seq, b"\xc1" + rng.randbytes(rng.randrange(8))]  # 0xc1: never valid msgpack
    if kind == 3:
        return [topic, seq, b"\x93\xcb\x41"]  # an array of 3 whose float is cut short
    if kind == 4:
        return [topic, seq, b"\x81\xa4type\xa5Bogus"]  # {"type": "Bogus"}: no such message
    return [topic + b"~", seq, b"\x90"]  # wrong topic (a prefix match only)


class ManglingRelay(LossyRelay):
    """A :class:`LossyRelay` that also, each with its own seeded probability per frame, sends a junk
    message before the frame (:func:`junk_frames`, one of ``topics``), sends the frame twice, or holds it
    back until the next frame has gone (a swap). Counts what it did in ``junk``/``duplicated``/``swapped``.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        upstream: str,
        topics: Sequence[bytes],
        *,
        drop: float = 0.0,
        junk: float = 0.0,
        duplicate: float = 0.0,
        swap: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(ctx, upstream, drop, seed)
        self.topics = list(topics)
        self.p_junk, self.p_dup, self.p_swap = junk, duplicate, swap
        self.junk = self.duplicated = self.swapped = 0
        self._late: list[bytes] | None = None
        self._on = True

    def mangling(self, on: bool) -> None:
        """Switch junk, duplicates and swaps off (or back on: they keep their shares)."""
        self._on = on

    async def _forward(self, frames: list[bytes]) -> None:
        rng = self.rng
        if self._on and rng.random() < self.p_junk:
            self.junk += 1
            await self.pub.send_multipart(junk_frames(rng, rng.choice(self.topics)))
        if self._on and self._late is None and rng.random() < self.p_swap:
            self._late = frames  # goes out right after the next frame
            return
        await super()._forward(frames)
        if self._on and rng.random() < self.p_dup:
            self.duplicated += 1
            await self.pub.send_multipart(frames)
        if self._late is not None:
            late, self._late = self._late, None
            self.swapped += 1
            await super()._forward(late)

    async def flush(self) -> None:
        """Send a frame still held back for a swap."""
        if self._late is not None:
            late, self._late = self._late, None
            await super()._forward(late)


# ----------------------------------------------------------------------------------- engine + witness


class EngineWitness:
    """Every KV batch an in-process engine publishes, in seq order (the engine's own stream, lossless)."""

    def __init__(self, srv: EngineServer) -> None:
        self.batches: list[tuple[wire.KVEvent, ...]] = []
        core = srv.core
        drain = core.drain_events

        def recording_drain() -> list[wire.KVEvent]:
            events = drain()
            if events:  # the server publishes exactly the non-empty drains, one seq each
                self.batches.append(tuple(events))
            return events

        core.drain_events = recording_drain  # type: ignore[method-assign]

    @property
    def next_seq(self) -> int:
        """The seq the engine's next KV batch will carry."""
        return len(self.batches)

    def fold(self, start: int = 0) -> set[int]:
        """The block hashes cached after applying batches ``start..`` to an empty cache."""
        out: set[int] = set()
        for events in self.batches[start:]:
            for ev in events:
                if isinstance(ev, wire.BlockStored):
                    out.update(ev.block_hashes)
                elif isinstance(ev, wire.BlockRemoved):
                    out.difference_update(ev.block_hashes)
                else:
                    out.clear()
        return out


def engine_config(**overrides: Any) -> ServerConfig:
    """A small, fast emulated engine: 16-token pages, a 1536-token cache (so evictions happen)."""
    base = ServerConfig(
        page_size=PAGE,
        max_total_tokens=1536,
        time_scale=0.01,
        load_interval=0.05,
        log_level="WARNING",
    )
    return replace(base, **overrides)


async def start_engine(cfg: ServerConfig) -> tuple[EngineServer, EngineWitness]:
    srv = EngineServer(cfg)
    witness = EngineWitness(srv)
    await srv.start()
    return srv, witness


def same_ports(srv: EngineServer) -> ServerConfig:
    """``srv``'s config with every port fixed to the one it bound (to restart it in place)."""
    p = srv.ports
    return replace(
        srv.cfg, port=p["http"], kv_events_port=p["kv"], kv_replay_port=p["replay"], load_port=p["load"]
    )


def engine_blocks(srv: EngineServer) -> set[int]:
    """The block hashes the engine's radix cache holds right now."""
    return srv.core.cache.block_hashes()


# ------------------------------------------------------------------------------------------- the agent


class AgentRunner:
    """An in-process agent (``serve``) in a task; ``agent`` once ready. Restartable on the same ports."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._task: asyncio.Task[None] | None = None
        self._agent: Agent | None = None

    @property
    def agent(self) -> Agent:
        assert self._agent is not None, "agent not started"
        return self._agent

    async def start(self) -> AgentRunner:
        ready: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(serve(self.cfg, on_ready=ready.set_result, handle_signals=False))
        both: set[asyncio.Future[Any]] = {ready, self._task}
        done, _ = await asyncio.wait(both, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:  # it failed to start: raise its error
            self._task.result()
        assert ready in done, "agent not ready in time"
        self._agent = ready.result()
        return self

    async def stop(self) -> None:
        """Cancel the agent (``serve`` closes every socket and returns)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait_for(asyncio.gather(self._task, return_exceptions=True), 10)
            self._task = None

    def pinned(self) -> AgentConfig:
        """The config with the PUB and snapshot ports fixed to the bound ones (to restart in place)."""
        a = self.agent
        return replace(
            self.cfg,
            pub_port=int(a.pub_endpoint.rsplit(":", 1)[1]),
            snapshot_port=int(a.snapshot_endpoint.rsplit(":", 1)[1]),
        )

    def published(self) -> int:
        """Frames the agent has published so far (its next cluster seq)."""
        return sum(self.agent.counters.published.values())


def agent_config(engine_url: str, name: str, **overrides: Any) -> AgentConfig:
    base = AgentConfig(
        engine_url=engine_url,
        instance_id=name,
        heartbeat_interval=0.05,
        health_interval=0.05,
        health_timeout=0.5,
        engine_wait=10.0,
        replay_timeout=1.0,
        log_level="WARNING",
    )
    return replace(base, **overrides)


def mirror_blocks(runner: AgentRunner) -> set[int]:
    return set(runner.agent.mirror)


def engine_next_seq_seen(runner: AgentRunner) -> int | None:
    """The next engine seq the agent expects (None before it joined)."""
    f = runner.agent.follower
    return None if f is None else f.expected


# ------------------------------------------------------------------------------------------ the router


def router_config(agents: Sequence[str], **overrides: Any) -> RouterConfig:
    base = RouterConfig(port=0, agents=tuple(agents), heartbeat_timeout=1.0, log_level="WARNING")
    return replace(base, **overrides)


def index_blocks(core: RoutingModel, name: str) -> set[int]:
    """The blocks ``name`` really holds in the router's index (speculative entries excluded)."""
    idx = core.index
    if idx is None:
        return set()
    out = {h for ev in idx.dump(name) for h in ev.block_hashes}
    assert len(out) == idx.blocks_of(name)
    assert all(idx.has_block(name, h) for h in out)
    return out


def synced_past(core: RoutingModel, name: str, seq: int) -> bool:
    """Whether ``name`` is synced and the router has applied its agent's frames through ``seq``."""
    st = core.table.get(name)
    return st is not None and st.sync == "synced" and st.last_seq is not None and st.last_seq >= seq


# ----------------------------------------------------------------------------------------- the traffic


@dataclass
class Traffic:
    """Prompts sharing a few prefixes (system prompts of 2..8 pages), each with its own suffix."""

    seed: int
    families: int = 4
    rng: random.Random = field(init=False)
    prefixes: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.prefixes = [self._tokens(self.rng.randint(2, 8) * PAGE) for _ in range(self.families)]

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(1, 60_000) for _ in range(n)]

    def prompt(self, family: int | None = None) -> list[int]:
        fam = self.rng.randrange(self.families) if family is None else family
        return self.prefixes[fam] + self._tokens(self.rng.randint(1, 6 * PAGE))

    def fresh(self, pages: int = 3) -> list[int]:
        """A prompt sharing nothing with the others (its pages are new to every cache)."""
        return self._tokens(pages * PAGE + 1)


async def generate(
    http: aiohttp.ClientSession, base_url: str, ids: Sequence[int], max_new: int = 4
) -> tuple[int, Any]:
    body = {"input_ids": list(ids), "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}
    async with http.post(base_url + "/generate", json=body) as r:
        return r.status, await r.json(content_type=None)


async def drive(
    http: aiohttp.ClientSession,
    url: str | Callable[[], str],
    traffic: Traffic,
    n: int,
    concurrency: int = 6,
    ok: Callable[[int], bool] = lambda status: status == 200,
) -> list[int]:
    """Send ``n`` prompts from ``traffic`` to ``url`` (or a URL chosen per request), ``concurrency`` at a
    time; returns the statuses (each checked with ``ok``)."""
    prompts = [traffic.prompt() for _ in range(n)]
    statuses: list[int] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(ids: list[int]) -> None:
        async with sem:
            target = url if isinstance(url, str) else url()
            status, body = await generate(http, target, ids)
            assert ok(status), (status, body)
            statuses.append(status)

    await asyncio.gather(*(one(p) for p in prompts))
    return statuses


@contextlib.asynccontextmanager
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def quiesce(srv: EngineServer) -> None:
    """Wait until the engine holds no request (every response already came back)."""
    await wait_until(lambda: not srv.core.busy, "engine idle")


async def close_all(*closers: Callable[[], Awaitable[None]]) -> None:
    """Run every closer, even when one fails (test teardown)."""
    for close in closers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close(), 10)
