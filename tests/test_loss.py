"""Exactness after loss, over real sockets: a lossy relay drops a seeded share of frames between the engine
and the agent, between the agent and the router, or both; after the next replay or snapshot the router's
index for the instance equals the agent's mirror, which equals the engine's real radix cache.

Topology (one instance; every piece in-process, OS-assigned ports on 127.0.0.1)::

    EngineServer --KV PUB--> [LossyRelay] --> agent --PUB--> [LossyRelay] --> router
         ^  replay ROUTER <------------------- agent (gap repair)      router --snapshot--> agent ROUTER

The engine gets real traffic (prompts sharing a few prefixes, a 1536-token cache so evictions happen).
When the agent-side stream is lossless the traffic goes through the router (so speculative entries are in
the index too); otherwise straight to the engine (a resyncing instance is not routable, by design).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from agents.engine.server import EngineServer
from kvindex import protocol as wire
from router.server import RouterServer
from tests.live_rig import (
    AgentRunner,
    EngineWitness,
    LossyRelay,
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
    mirror_blocks,
    quiesce,
    router_config,
    start_engine,
    synced_past,
    wait_until,
)

pytestmark = pytest.mark.timeout(40)

NAME = "inst-0"
SHARES = (0.01, 0.10, 0.50)
SEED = 9
"""The engine-side relay draws with ``Random(SEED)``, the agent-side one with ``Random(SEED + 1)``: both drop
a frame among their first 30 even at 1 %, so every case really loses frames."""
REQUESTS = 200
FINAL_PROMPTS = (Traffic(seed=1000 + k).fresh() for k in itertools.count())
"""Prompts new to every cache: each one's BlockStored is a batch that reaches the agent."""


@dataclass
class LossCluster:
    srv: EngineServer
    witness: EngineWitness
    kv_relay: LossyRelay
    runner: AgentRunner
    pub_relay: LossyRelay
    router: RouterServer
    http: aiohttp.ClientSession
    ctx: zmq.asyncio.Context


@contextlib.asynccontextmanager
async def loss_cluster(
    engine_drop: float, agent_drop: float, seed: int, **engine_overrides: Any
) -> AsyncIterator[LossCluster]:
    """Engine -> relay -> agent -> relay -> router, both relays seeded; torn down whatever happens."""
    ctx = zmq.asyncio.Context()
    srv, witness = await start_engine(engine_config(**engine_overrides))
    closers = [srv.stop]
    try:
        kv_relay = LossyRelay(ctx, srv.endpoints["kv"], engine_drop, seed).start()
        closers.insert(0, kv_relay.close)
        runner = await AgentRunner(
            agent_config(srv.endpoints["http"], NAME, kv_endpoint=kv_relay.endpoint)
        ).start()
        closers.insert(0, runner.stop)
        pub_relay = LossyRelay(ctx, runner.agent.pub_endpoint, agent_drop, seed + 1).start()
        closers.insert(0, pub_relay.close)
        router = RouterServer(router_config([pub_relay.endpoint]))
        await router.start()
        closers.insert(0, router.stop)
        async with http_session() as http:
            await wait_until(lambda: router.core.routable_count() == 1, "instance routable")
            yield LossCluster(srv, witness, kv_relay, runner, pub_relay, router, http, ctx)
    finally:
        await close_all(*closers)
        ctx.destroy(linger=0)


async def settle_agent(c: LossCluster) -> None:
    """Stop the engine-side loss, make one more batch reach the agent (it reveals any gap before it), and
    wait until the agent has applied every batch the engine published."""
    await quiesce(c.srv)
    c.kv_relay.drop = 0.0
    status, _ = await generate(c.http, c.srv.endpoints["http"], next(FINAL_PROMPTS))
    assert status == 200
    await quiesce(c.srv)
    await wait_until(
        lambda: engine_next_seq_seen(c.runner) == c.witness.next_seq, "agent caught up with the engine"
    )


async def settle_router(c: LossCluster) -> int:
    """Wait until the router is synced past everything the agent has published so far (through the still
    lossy relay: every gap is found by a later heartbeat and repaired by a snapshot). Returns that seq."""
    last = c.runner.published() - 1
    await wait_until(lambda: synced_past(c.router.core, NAME, last), "router synced past the agent's seq")
    return last


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("where", ["engine_to_agent", "agent_to_router", "both"])
async def test_index_is_exact_after_dropped_frames(where: str, share: float) -> None:
    engine_drop = share if where in ("engine_to_agent", "both") else 0.0
    agent_drop = share if where in ("agent_to_router", "both") else 0.0
    async with loss_cluster(engine_drop, agent_drop, SEED) as c:
        url = c.router.url if agent_drop == 0 else c.srv.endpoints["http"]
        await drive(c.http, url, Traffic(seed=int(share * 100)), n=REQUESTS, concurrency=2)
        await settle_agent(c)

        cache = engine_blocks(c.srv)
        assert cache == c.witness.fold(), "witness sanity: the published stream rebuilds the cache"
        counters = c.runner.agent.counters
        assert counters.events["BlockRemoved"] > 0, "the cache is small enough that blocks get evicted"
        assert mirror_blocks(c.runner) == cache
        assert counters.resync_incomplete == 0  # every gap fits the replay buffer
        assert (c.kv_relay.dropped > 0) == (engine_drop > 0)
        if c.kv_relay.dropped:
            assert counters.gaps > 0 and counters.replayed_batches >= c.kv_relay.dropped

        await settle_router(c)
        assert index_blocks(c.router.core, NAME) == mirror_blocks(c.runner) == cache
        assert (c.pub_relay.dropped > 0) == (agent_drop > 0)
        if c.pub_relay.dropped:
            sub = c.router.subscriber.stats
            assert sub.discontinuities["gap"] > 0 and c.router.core.stats.resyncs[(NAME, "gap")] > 0
        if agent_drop == 0:
            assert c.router.core.stats.decisions[("lmetric", NAME)] == REQUESTS


async def test_gap_beyond_the_replay_buffer_clears_and_regrows() -> None:
    """With a replay buffer of 2 batches most gaps cannot be repaired. SGLang offers no full dump, so the
    agent clears its mirror (publishing AllBlocksCleared) and regrows it from the batches after the hole:
    the mirror -- and the router's index -- is then exactly the fold of the engine's stream from the batch
    that revealed the last unrepairable gap, a subset of the real cache (never a stale block), until a
    flush or evictions make them equal again."""
    async with loss_cluster(0.5, 0.0, seed=7, buffer_steps=2) as c:
        tap = c.ctx.socket(zmq.SUB)  # what the agent publishes, losslessly
        tap.setsockopt(zmq.LINGER, 0)
        tap.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_EVENTS)
        tap.connect(c.runner.agent.pub_endpoint)
        batches: list[wire.EventBatch] = []

        async def read_tap() -> None:
            while True:
                msg = wire.decode_message((await tap.recv_multipart())[2])
                assert isinstance(msg, wire.EventBatch)
                batches.append(msg)

        reader = asyncio.create_task(read_tap())
        try:
            # the tap has joined once it sees an EventBatch; before any, send probes straight to the engine
            traffic = Traffic(seed=7)
            while not batches:
                await generate(c.http, c.srv.endpoints["http"], traffic.fresh(1))
                await asyncio.sleep(0.02)
            await drive(c.http, c.srv.endpoints["http"], traffic, n=48)
            await settle_agent(c)
            await wait_until(lambda: batches[-1].engine_seq == c.witness.next_seq - 1, "tap caught up")

            counters = c.runner.agent.counters
            assert counters.resync_incomplete > 0, "some gap was larger than the replay buffer"
            clears = [k for k, b in enumerate(batches) if b.engine_seq == -1]
            assert clears and all(batches[k].events == (wire.AllBlocksCleared(),) for k in clears)
            regrown_from = batches[clears[-1] + 1].engine_seq  # the batch that revealed the last hole
            cache = engine_blocks(c.srv)
            mirror = mirror_blocks(c.runner)
            assert mirror == c.witness.fold(regrown_from)
            assert mirror <= cache
            await settle_router(c)
            assert index_blocks(c.router.core, NAME) == mirror

            # A flush (AllBlocksCleared from the engine itself) makes everything exact again.
            async with c.http.post(c.srv.endpoints["http"] + "/flush_cache") as r:
                assert r.status == 200
            await drive(c.http, c.router.url, traffic, n=12)
            await settle_agent(c)
            await settle_router(c)
            assert index_blocks(c.router.core, NAME) == mirror_blocks(c.runner) == engine_blocks(c.srv)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            tap.close(0)
