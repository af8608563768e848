"""A router without agents (``--worker-urls``): the routed LRU (pure), sglang-router's flags, and two
emulated engines behind a router over real sockets."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvindex.protocol.sglang import BlockRemoved, BlockStored
from router.cli import parse_args
from router.model.routed import RoutedBlocks
from router.server import RouterServer
from router.static_workers import MIN_BLOCK_SIZE
from tests.live_rig import (
    PAGE,
    close_all,
    engine_config,
    generate,
    http_session,
    index_blocks,
    router_config,
    start_engine,
    wait_until,
)

# ------------------------------------------------------------------------------------------- pure


def test_record_emits_runs_of_new_blocks_with_their_parents() -> None:
    r = RoutedBlocks(100, PAGE)
    assert r.record([1, 2, 3]) == [BlockStored((1, 2, 3), None, (), PAGE)]
    assert r.record([1, 2, 4, 5], held_prefix=2) == [BlockStored((4, 5), 2, (), PAGE)]
    assert r.record([1, 9, 4]) == [BlockStored((9,), 1, (), PAGE)]
    assert r.record([1, 2, 3]) == []
    assert len(r) == 6


def test_eviction_takes_suffixes_before_the_prefix_they_hang_from() -> None:
    r = RoutedBlocks(4, PAGE)
    r.record([1, 2, 3])
    events = r.record([1, 2, 7])
    assert events == [BlockStored((7,), 2, (), PAGE)]
    events = r.record([1, 8])
    assert events == [BlockStored((8,), 1, (), PAGE), BlockRemoved((3,))]  # the oldest leaf goes first
    assert {1, 2, 7, 8} == {h for h in (1, 2, 3, 7, 8) if h in r}
    assert r.evicted == 1


def test_a_request_longer_than_the_capacity_is_cut() -> None:
    r = RoutedBlocks(3, PAGE)
    assert r.record([1, 2, 3, 4, 5]) == [BlockStored((1, 2, 3), None, (), PAGE)]


def test_lru_stays_within_capacity_on_random_traffic() -> None:
    rng = random.Random(7)
    r = RoutedBlocks(50, PAGE)
    held: set[int] = set()
    prefixes = [[rng.getrandbits(40) for _ in range(rng.randint(1, 8))] for _ in range(5)]
    for _ in range(300):
        hs = rng.choice(prefixes) + [rng.getrandbits(40) for _ in range(rng.randint(0, 6))]
        for ev in r.record(hs):
            if isinstance(ev, BlockStored):
                held.update(ev.block_hashes)
            else:
                held.difference_update(ev.block_hashes)
        assert len(held) == len(r) <= 50
        assert all(h in r for h in held)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        RoutedBlocks(0, PAGE)
    with pytest.raises(ValueError):
        RoutedBlocks(10, 0)


# ------------------------------------------------------------------------------------------- flags


def test_sglang_router_flags_are_accepted() -> None:
    cfg = parse_args(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--worker-urls",
            "http://a:1",
            "http://b:2/",
            "--policy",
            "cache_aware",
            "--max-payload-size",
            "1000",
            "--prometheus-host",
            "0.0.0.0",
            "--prometheus-port",
            "29000",
        ]
    )
    assert cfg.worker_urls == ("http://a:1", "http://b:2/")
    assert cfg.policy == "lmetric"
    assert cfg.max_body_size == 1000
    assert cfg.admin_port == 29000
    assert cfg.agents == ()
    for name in ("round_robin", "random", "power_of_two"):
        assert parse_args(["--worker-urls", "http://a:1", "--policy", name]).policy == name


def test_agents_and_worker_urls_do_not_mix() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--agent", "tcp://127.0.0.1:1", "--worker-urls", "http://a:1"])


# -------------------------------------------------------------------------------------------- live


async def test_router_without_agents_indexes_what_it_routed() -> None:
    e1, _ = await start_engine(engine_config(time_scale=0.0, max_total_tokens=100_000))
    e2, _ = await start_engine(engine_config(time_scale=0.0, max_total_tokens=100_000))
    urls = (e1.endpoints["http"], e2.endpoints["http"])
    cap = 12 * MIN_BLOCK_SIZE  # 12 blocks per worker: evictions happen
    router = RouterServer(
        router_config((), worker_urls=urls, routed_cache_tokens=cap, worker_startup_timeout=5)
    )
    try:
        await router.start()
        core = router.core
        assert core.routable_count() == 2
        assert core.block_size == max(PAGE, MIN_BLOCK_SIZE)
        assert set(core.models()) == {e1.cfg.model_name}
        rng = random.Random(3)
        prefix = [rng.randrange(1, 60_000) for _ in range(4 * PAGE)]
        async with http_session() as http:
            status, body = await generate(http, router.url, prefix + [5] * PAGE)
            assert status == 200, body
            (first,) = [n for n in urls if core.table.get(n) and index_blocks(core, n)]
            held = index_blocks(core, first)
            assert len(held) == 5  # the request's 5 full pages, held (not speculative)
            assert core.index is not None and core.index.speculative_blocks() == 0
            # Requests sharing the prefix go where it is cached.
            for k in range(3):
                status, _ = await generate(http, router.url, prefix + [k + 9] * (2 * PAGE))
                assert status == 200
                assert held <= index_blocks(core, first)
            assert sum(n for (_p, i), n in core.stats.decisions.items() if i == first) == 4
            # Many distinct prompts: each worker's index stays within its LRU's capacity.
            for _ in range(20):
                ids = [rng.randrange(1, 60_000) for _ in range(3 * PAGE)]
                assert (await generate(http, router.url, ids))[0] == 200
            for n in urls:
                lru = core.routed_blocks(n)
                assert lru is not None
                assert index_blocks(core, n) == {h for h in index_blocks(core, n) if h in lru}
                assert len(index_blocks(core, n)) == len(lru) <= 12
            assert sum(lru.evicted for n in urls if (lru := core.routed_blocks(n))) > 0
    finally:
        await close_all(router.stop, e1.stop, e2.stop)


async def test_a_dead_worker_is_routed_around_and_comes_back() -> None:
    e1, _ = await start_engine(engine_config(time_scale=0.0))
    e2, _ = await start_engine(engine_config(time_scale=0.0))
    urls = (e1.endpoints["http"], e2.endpoints["http"])
    router = RouterServer(
        router_config(
            (), worker_urls=urls, worker_startup_timeout=5, suspect_cooldown=0.1, policy="round_robin"
        )
    )
    try:
        await router.start()
        await e2.stop()
        async with http_session() as http:
            for k in range(4):  # a refused connection is retried on the other worker
                assert (await generate(http, router.url, [k + 1] * 40))[0] == 200
            assert router.core.routable_count() == 1
            e2b, _ = await start_engine(engine_config(time_scale=0.0, port=int(urls[1].rsplit(":", 1)[1])))
            try:
                await wait_until(lambda: router.core.routable_count() == 2, "worker back", timeout=10)
            finally:
                await e2b.stop()
    finally:
        await close_all(router.stop, e1.stop, e2.stop)
        await asyncio.sleep(0)
