"""Lifecycle guarantees over real sockets: engine restarts, a router joining late, an agent whose heartbeats
stop and that comes back, and speculative entries (visible at once, expiring unless confirmed).

Every piece runs in-process on 127.0.0.1 with OS-assigned ports (fixed only to restart something in
place). "Exact" compares three sets: the block hashes of the engine's radix cache, the agent's mirror and
the router's index for that instance (real entries; speculative ones excluded).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from agents.engine.server import EngineServer
from kvindex.hashing import block_hashes
from router.config import RouterConfig
from router.main import serve
from router.model.model import Routed, RoutingModel
from router.server import RouterServer
from tests.live_rig import (
    PAGE,
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
    same_ports,
    start_engine,
    synced_past,
    wait_until,
)

pytestmark = pytest.mark.timeout(40)


@dataclass
class Node:
    """One instance: engine, its witness, its agent (and the relay the router reads it through, if any)."""

    name: str
    srv: EngineServer
    witness: EngineWitness
    runner: AgentRunner
    relay: LossyRelay | None = None

    @property
    def url(self) -> str:
        return self.srv.endpoints["http"]

    @property
    def feed(self) -> str:
        """The endpoint the router subscribes to for this instance."""
        return self.relay.endpoint if self.relay is not None else self.runner.agent.pub_endpoint


@dataclass
class Rig:
    nodes: list[Node]
    http: aiohttp.ClientSession
    ctx: zmq.asyncio.Context
    closers: list[Callable[[], Any]] = field(default_factory=list)
    router: RouterServer | None = None

    @property
    def core(self) -> RoutingModel:
        assert self.router is not None
        return self.router.core

    async def start_router(self, **cfg: Any) -> RouterServer:
        self.router = RouterServer(router_config([n.feed for n in self.nodes], **cfg))
        await self.router.start()
        self.closers.insert(0, self.router.stop)
        return self.router


@contextlib.asynccontextmanager
async def rig(
    n: int, *, relays: bool = False, agent_cfg: dict[str, Any] | None = None, **engine_cfg: Any
) -> AsyncIterator[Rig]:
    """``n`` engines with their agents (and lossless relays if asked); no router yet."""
    ctx = zmq.asyncio.Context()
    closers: list[Callable[[], Any]] = []  # run first to last at the end
    try:
        nodes = []
        for k in range(n):
            srv, witness = await start_engine(engine_config(**engine_cfg))
            closers.insert(0, srv.stop)
            cfg = agent_config(srv.endpoints["http"], f"i{k}", **(agent_cfg or {}))
            runner = await AgentRunner(cfg).start()
            closers.insert(0, runner.stop)
            relay = None
            if relays:
                relay = LossyRelay(ctx, runner.agent.pub_endpoint).start()
                closers.insert(0, relay.close)
            nodes.append(Node(f"i{k}", srv, witness, runner, relay))
        async with http_session() as http:
            yield Rig(nodes, http, ctx, closers)
    finally:
        await close_all(*closers)
        ctx.destroy(linger=0)


async def restart_engine(r: Rig, node: Node, between: Callable[[], Awaitable[None]] | None = None) -> None:
    """Stop ``node``'s engine (awaiting ``between`` while it is down) and start a new one on the same
    ports: empty cache, KV and load seqs from 0."""
    old = node.srv
    cfg = same_ports(old)
    await old.stop()
    if between is not None:
        await between()
    node.srv, node.witness = await start_engine(cfg)
    r.closers[r.closers.index(old.stop)] = node.srv.stop


async def settle(node: Node, http: aiohttp.ClientSession | None = None) -> None:
    """Wait until the engine is idle and its agent has applied every batch the engine published.

    A lost batch is repaired when a later one reveals the gap. Where the tail of the stream may have been
    lost (right after a restart, the agent's SUB reconnects), pass ``http``: while the agent lags, a fresh
    prompt is sent straight to the engine every 0.3 s, so that a last batch does arrive.
    """
    prompts = (Traffic(seed=9000 + k).fresh() for k in itertools.count())
    while True:
        await quiesce(node.srv)
        with contextlib.suppress(AssertionError):
            await wait_until(
                lambda: (engine_next_seq_seen(node.runner) or 0) == node.witness.next_seq,
                f"agent of {node.name} caught up",
                timeout=0.3 if http is not None else 10.0,
            )
            return
        if http is None:
            raise AssertionError(f"agent of {node.name} did not catch up")
        status, _ = await generate(http, node.url, next(prompts))
        assert status == 200


async def settle_router(core: RoutingModel, node: Node) -> None:
    """Wait until the router is synced past every frame ``node``'s agent has published so far."""
    last = node.runner.published() - 1
    await wait_until(lambda: synced_past(core, node.name, last), f"router synced on {node.name}")


def exact(core: RoutingModel, node: Node) -> bool:
    """Index == mirror == engine cache for ``node``."""
    cache = engine_blocks(node.srv)
    return index_blocks(core, node.name) == mirror_blocks(node.runner) == cache


class RouteLog:
    """Wraps ``core.route_hashes`` (what the router calls, with the prompt's hashes) to record, per
    decision, the instance and what held at that moment."""

    def __init__(self, core: RoutingModel, probe: Callable[[str], Any] = lambda name: None) -> None:
        self.entries: list[tuple[str, str, Any]] = []  # (instance, its sync status, probe(instance))
        orig = core.route_hashes

        def route_hashes(prompt_tokens: int, hashes: Sequence[int], **kw: Any) -> Routed:
            routed = orig(prompt_tokens, hashes, **kw)
            st = core.table.get(routed.instance)
            assert st is not None
            self.entries.append((routed.instance, st.sync, probe(routed.instance)))
            return routed

        core.route_hashes = route_hashes  # type: ignore[method-assign]

    def to(self, name: str) -> list[tuple[str, str, Any]]:
        return [e for e in self.entries if e[0] == name]


# ---------------------------------------------------------------------------------------- engine restart


@pytest.mark.parametrize("health_poll", [True, False], ids=["noticed_by_health", "noticed_by_streams"])
async def test_engine_restart_mid_stream_resyncs_the_instance(health_poll: bool) -> None:
    """The engine is stopped while requests are in flight and a new one starts on the same ports.

    With the agent's health poll on, the agent reports the engine down (the router takes the instance down
    and drops its blocks) and, when the engine answers again, checks through the replay socket whether it
    is the same process. With the poll too slow to notice, the new engine's first KV batches (seq back
    near 0) or its load stream tell. Either way: AllBlocksCleared, and everything equals the NEW cache."""
    agent_cfg = {} if health_poll else {"health_interval": 30.0}
    async with rig(1, agent_cfg=agent_cfg) as r:
        node = r.nodes[0]
        router = await r.start_router()
        await wait_until(lambda: r.core.routable_count() == 1, "routable")
        traffic = Traffic(seed=21)
        await drive(r.http, router.url, traffic, n=60)
        await settle(node)
        await settle_router(r.core, node)
        before = engine_blocks(node.srv)
        assert before and exact(r.core, node)

        background = asyncio.create_task(
            drive(r.http, router.url, traffic, n=400, concurrency=2, ok=lambda s: True)
        )
        seq0 = node.witness.next_seq
        await wait_until(lambda: node.witness.next_seq > seq0 + 5, "traffic flowing")
        agent = node.runner.agent
        if health_poll:
            st = r.core.table.get(node.name)
            assert st is not None

            async def down() -> None:
                await wait_until(lambda: not agent.engine_healthy, "agent saw the engine down")
                await wait_until(lambda: not st.up, "router took the instance down")
                assert r.core.index is not None and r.core.index.blocks_of(node.name) == 0

            await restart_engine(r, node, between=down)
        else:
            # Nothing may drive the new engine past the old one's seq before the agent's SUB has
            # reconnected: its first batch would then look like a gap, not a restart (a short-lived
            # engine only; see docs/kvindex.md). So the in-flight requests are cut with the engine.
            background.cancel()
            await restart_engine(r, node)
        await asyncio.gather(background, return_exceptions=True)
        counters = agent.counters
        if health_poll:
            await wait_until(lambda: counters.engine_restarts >= 1, "agent saw the engine restart")
            assert r.core.stats.down_transitions["engine_unhealthy"] == 1
            await wait_until(lambda: r.core.routable_count() == 1, "routable again")
            assert r.core.stats.resyncs[(node.name, "back_up")] == 1

        await drive(r.http, router.url, traffic, n=30, ok=lambda s: s in (200, 502, 503))
        await settle(node, r.http)
        await settle_router(r.core, node)
        assert counters.engine_restarts >= 1
        cache = engine_blocks(node.srv)
        assert cache == node.witness.fold()  # the new engine's own stream, from its seq 0
        assert exact(r.core, node)
        assert not (before - cache) & index_blocks(r.core, node.name)  # nothing of the old life is left


async def test_idle_engine_restart_is_noticed_without_new_traffic() -> None:
    """The engine restarts faster than the agent's health poll (here: never polled in time) and then gets
    no request, so its KV stream says nothing. Its load stream restarts at seq 0: the agent verifies
    through the replay socket, finds a new process, drops the old engine's blocks (the new cache is empty)
    and so does the router."""
    # the health poll never fires; load frames every 10 ms
    async with rig(1, agent_cfg={"health_interval": 30.0}, load_interval=0.01) as r:
        node = r.nodes[0]
        # The new engine's load seq must go back: let the old one publish more load frames than the new
        # one will have published by the time the agent has reconnected (a ZeroMQ reconnect is ~0.1 s).
        load_in = node.runner.agent.counters.frames_in
        await wait_until(lambda: load_in["load"] >= 80, "old engine's load seq well past a reconnect")
        router = await r.start_router()
        await wait_until(lambda: r.core.routable_count() == 1, "routable")
        await drive(r.http, router.url, Traffic(seed=22), n=40)
        await settle(node)
        await settle_router(r.core, node)
        assert index_blocks(r.core, node.name) and exact(r.core, node)

        await restart_engine(r, node)
        counters = node.runner.agent.counters
        await wait_until(lambda: counters.engine_restarts >= 1, "agent saw the engine restart")
        await wait_until(lambda: not mirror_blocks(node.runner), "mirror emptied")
        await settle_router(r.core, node)
        assert engine_blocks(node.srv) == set() and exact(r.core, node)
        # and it goes on exactly from there
        await drive(r.http, router.url, Traffic(seed=23), n=20)
        await settle(node, r.http)
        await settle_router(r.core, node)
        assert exact(r.core, node)


# ------------------------------------------------------------------------------------------ late router


async def test_late_router_matches_the_agents_before_its_first_request() -> None:
    async with rig(2) as r:
        traffic = [Traffic(seed=31), Traffic(seed=32)]
        for node, t in zip(r.nodes, traffic, strict=True):
            await drive(r.http, node.url, t, n=40)  # straight to the engines: no router exists yet
        for node in r.nodes:
            await settle(node)

        ready: asyncio.Future[RouterServer] = asyncio.get_running_loop().create_future()
        at_ready: dict[str, bool] = {}

        def on_ready(server: RouterServer) -> None:  # runs right after warm-up, before anything is routed
            for node in r.nodes:
                at_ready[node.name] = exact(server.core, node)
            ready.set_result(server)

        stop = asyncio.Event()
        cfg: RouterConfig = router_config([n.runner.agent.pub_endpoint for n in r.nodes], warmup_timeout=10)
        task = asyncio.create_task(serve(cfg, stop=stop, on_ready=on_ready))
        try:
            server = await asyncio.wait_for(asyncio.shield(ready), 15)
            assert server.core.routable_count() == 2
            assert at_ready == {"i0": True, "i1": True}
            log = RouteLog(server.core, lambda name: exact(server.core, r.nodes[int(name[1:])]))
            # A prompt on i1's cached prefix goes to i1 with its very first request.
            status, _ = await generate(r.http, server.url, traffic[1].prompt(0))
            assert status == 200
            assert log.entries[0] == ("i1", "synced", True)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


# -------------------------------------------------------------------------------------- heartbeat timeout


async def test_silent_agent_goes_down_and_comes_back_through_a_snapshot() -> None:
    async with rig(2) as r:
        # The default timeout (1 s): a shorter one can also expire the healthy agent on a starved machine.
        router = await r.start_router(heartbeat_timeout=1.0)
        await wait_until(lambda: r.core.routable_count() == 2, "both routable")
        await drive(r.http, router.url, Traffic(seed=41), n=60)
        for node in r.nodes:
            await settle(node)
        i0 = r.nodes[0]
        await settle_router(r.core, i0)
        assert index_blocks(r.core, "i0") and exact(r.core, i0)

        pinned = i0.runner.pinned()
        await i0.runner.stop()  # its heartbeats stop
        st = r.core.table.get("i0")
        assert st is not None
        await wait_until(lambda: not st.up, "i0 marked down")
        assert (
            st.down_reason == "heartbeat_timeout" and r.core.stats.down_transitions["heartbeat_timeout"] == 1
        )
        assert r.core.index is not None and r.core.index.blocks_of("i0") == 0  # its blocks are dropped
        assert r.core.routable_count() == 1

        log = RouteLog(r.core, lambda name: exact(r.core, i0) if name == "i0" else None)
        await drive(r.http, router.url, Traffic(seed=42), n=20)
        assert {e[0] for e in log.entries} == {"i1"}, "nothing is routed to a down instance"

        # The agent comes back on the same ports (a new epoch). Asked for a snapshot before any KV batch,
        # it learns its (idle) engine's cache from the replay buffer; the router resyncs the instance from
        # that snapshot, and only then routes to it: at its first request the index is exact.
        i0.runner = await AgentRunner(pinned).start()
        r.closers.insert(0, i0.runner.stop)

        async def keep_sending() -> None:
            t = Traffic(seed=43)
            while not log.to("i0"):
                await drive(r.http, router.url, t, n=4, concurrency=4)

        await asyncio.wait_for(keep_sending(), 20)
        first = log.to("i0")[0]
        assert first[1] == "synced" and first[2] is True, first  # synced, and exact, at its first request
        assert all(e[1] == "synced" for e in log.to("i0"))
        assert r.core.stats.resyncs[("i0", "back_up")] == 1


# ------------------------------------------------------------------------------------ speculative entries


async def test_speculative_entries_stick_a_burst_then_expire_unless_confirmed() -> None:
    """Requests sharing a new prefix, each sent before any KV event of the earlier ones reached the router
    (the agents' streams are held back), all go to one instance: the speculative entries of the first make
    the prefix visible at once. The engine's events confirm them; the entries of a request the engine
    refused are never confirmed and expire after the TTL, while confirmed ones stay."""
    async with rig(2, relays=True, context_length=1024) as r:
        ttl = 1.0
        router = await r.start_router(speculative_ttl=ttl)
        await wait_until(lambda: r.core.routable_count() == 2, "both routable")
        idx = r.core.index
        assert idx is not None
        prefix = Traffic(seed=51).fresh(pages=6)[: 6 * PAGE]
        suffixes = Traffic(seed=52)
        hashes = block_hashes(prefix, PAGE)

        # Events are slower than requests: the agents' streams are held while the burst is routed.
        for node in r.nodes:
            assert node.relay is not None
            node.relay.hold()
        log = RouteLog(r.core)
        for _ in range(6):
            status, _ = await generate(r.http, router.url, prefix + suffixes.fresh(1))
            assert status == 200
        chosen = {e[0] for e in log.entries}
        assert len(chosen) == 1, log.entries  # the whole burst on one instance
        (inst,) = chosen
        assert not any(idx.has_block(n.name, h) for n in r.nodes for h in hashes)  # no event seen yet
        assert all(idx.has_speculative(inst, h) for h in hashes)

        # A request the engine refuses (longer than its context): its blocks are never confirmed.
        refused = Traffic(seed=53).fresh(pages=66)
        status, _ = await generate(r.http, router.url, refused)
        assert status == 400
        refused_hashes = block_hashes(refused, PAGE)
        target = log.entries[-1][0]
        assert all(idx.has_speculative(target, h) for h in refused_hashes)

        confirmed_before = idx.stats.speculative_confirmed
        for node in r.nodes:
            assert node.relay is not None
            await node.relay.release()
        await wait_until(lambda: all(idx.has_block(inst, h) for h in hashes), "burst confirmed by events")
        assert idx.stats.speculative_confirmed >= confirmed_before + len(hashes)
        assert not any(idx.has_speculative(inst, h) for h in hashes)

        await wait_until(
            lambda: idx.speculative_blocks() == 0, "unconfirmed entries expired", timeout=5 * ttl
        )
        assert idx.stats.speculative_expired >= len(refused_hashes)
        assert not any(idx.has_speculative(target, h) or idx.has_block(target, h) for h in refused_hashes)
        assert all(idx.has_block(inst, h) for h in hashes)  # confirmed entries outlive the TTL
        async with r.http.get(router.url + "/metrics") as resp:
            text = await resp.text()
        assert "router_speculative_blocks 0.0" in text
        for node in r.nodes:
            await settle(node)
        for node in r.nodes:
            await settle_router(r.core, node)
            assert exact(r.core, node)
