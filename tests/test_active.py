"""Active-active routers (router/active.py, ``launch cluster --routers K``, ``launch simulate --routers K``).

Three layers: pure (two routing models, one following the other's decisions through
:class:`ActivePeers`; the fence ignoring active heartbeats; the simulator's router tier), the simulator
on a small trace slice with two routers, and real processes (``launch cluster --routers 2``: a request
routed by router A is pending on router B, B routes around it, and neither router ever steps down).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from kvindex.protocol import TOPIC_DECISIONS, TOPIC_ROUTER_HEARTBEAT, RouterHeartbeat
from kvindex.protocol.cluster_file import parse_cluster_file
from kvindex.protocol.numbered import DecisionReceived
from launch.replay import replay_urls
from launch.sim.cluster import SimConfig, simulate
from launch.sim.router_model import SimRouter
from launch.sim.router_tier import SimRouterTier
from launch.summary import summarize
from launch.trace import load_trace, window
from router.active import ActivePeers
from router.cli import parse_args
from router.config import RouterConfig
from router.decisions import finished_message, heartbeat_of, routed_message
from router.fence import Fence
from router.model.model import RoutingModel
from router.model.policies import make_policy
from router.model.slots import DecisionSlots
from tests.launched import launched_cluster
from tests.test_router import Clock

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "active-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}  # /router/* and /metrics
TRACE = ROOT / "launch/traces/mooncake/conversation_trace.jsonl"
BS = 4
EP = "tcp://127.0.0.1:1"


# ---------------------------------------------------------------------------------------------- pure


def _core(clock: Clock) -> RoutingModel:
    def no_snapshot(job: object) -> None:
        raise AssertionError("static instances need no snapshot")

    core = RoutingModel(RouterConfig(block_size=BS).model, no_snapshot, mono=clock.mono, wall=clock.wall)
    for name in ("a", "b"):
        core.add_static(name, BS, f"http://{name}")
    return core


def _rec(msg: Any, seq: int, topic: bytes = TOPIC_DECISIONS) -> DecisionReceived:
    return DecisionReceived(EP, topic, seq, msg)


def test_config_active_role_and_peer_routers() -> None:
    cfg = parse_args(
        ["--role", "active", "--peer-routers", "tcp://h:1,tcp://h:2", "--peer-routers", "tcp://h:3"]
    )
    assert cfg.role == "active" and cfg.peer_routers == ("tcp://h:1", "tcp://h:2", "tcp://h:3")
    with pytest.raises(ValueError, match="--role active"):
        RouterConfig(peer_routers=("tcp://h:1",))
    with pytest.raises(ValueError, match="decisions-port"):
        RouterConfig(role="active", decisions_port=None)


async def test_peer_decision_is_pending_and_speculative_until_it_ends() -> None:
    clock = Clock()
    a, b = _core(clock), _core(clock)
    peers = ActivePeers(b, [], ctx=zmq.asyncio.Context.instance(), own_epoch=2, wall=clock.wall)
    tokens = list(range(64))
    r = a.route(tokens)
    peers.on_message(_rec(routed_message(1, r, len(tokens), "req-1", ts=clock.wall()), 0))
    st = b.table.get(r.instance)
    assert st is not None and st.view().batch_size == 1 and len(st.pending) == 1
    assert st.view().queued_prefill_tokens == r.decision.new_tokens == len(tokens)
    assert b.index is not None and b.index.speculative_blocks(r.instance) == len(tokens) // BS
    # Router B now sees router A's request there: the same request goes where A has not sent one,
    # unless the prefix (speculatively cached there) wins; a request with a fresh prefix avoids it.
    other = b.route([1000 + t for t in tokens])
    assert other.instance != r.instance
    b.finish(other.instance, other.ticket)
    # A's heartbeat lists the ticket as open: it stays; the end closes it.
    hb = heartbeat_of(a, 1, "active", "http://a", 1)
    peers.on_message(_rec(hb, 1, TOPIC_ROUTER_HEARTBEAT))
    assert st.open_tickets and peers.mirrors[EP].open_tickets == 1
    a.finish(r.instance, r.ticket)
    peers.on_message(_rec(finished_message(1, r, "200", "req-1"), 2))
    assert not st.open_tickets and not st.pending and st.view().batch_size == 0
    age = peers.state_json()["decision_age"]
    assert age["count"] == 1 and age["buckets"]["le_0.0005"] == 1 and age["mean_s"] == 0.0
    assert peers.state_json()["peers"] == [
        {
            "decisions": EP,
            "connected": False,
            "role": "active",
            "http": "http://a",
            "mirrored_open": 0,
            "mirror": {"routed": 1, "finished": 1, "unknown_finished": 0, "reconciled": 0, "released": 0},
        }
    ]


async def test_peer_disconnect_releases_its_dispatches_and_own_frames_are_ignored() -> None:
    clock = Clock()
    a, b = _core(clock), _core(clock)
    peers = ActivePeers(b, [], ctx=zmq.asyncio.Context.instance(), own_epoch=2)
    r = a.route(list(range(32)))
    peers.on_message(_rec(routed_message(1, r, 32, None, ts=clock.wall()), 0))
    st = b.table.get(r.instance)
    assert st is not None and len(st.open_tickets) == 1
    peers.on_connection(EP, False)  # the peer's process died, its requests with it
    assert not st.open_tickets and peers.mirrors[EP].stats.released == 1
    # Its own stream listed as a peer by mistake: nothing is counted twice.
    own = b.route(list(range(32)))
    peers.on_message(_rec(routed_message(2, own, 32, None, ts=clock.wall()), 0))
    assert peers.ignored_own == 1 and len(b.table.get(own.instance).open_tickets) == 1  # type: ignore[union-attr]


def test_active_routers_never_fence_each_other() -> None:
    """Fencing ranks primaries only: an active router's heartbeat (term 0, role ``active``), however
    ranked, never makes a router step down, and a router started active has term 0."""
    hb = RouterHeartbeat(
        router_epoch=99, role="active", ts=0.0, http="http://x", pid=1, index_blocks=0,
        speculative_blocks=0, inflight=0, instances_routable=1, interval=0.1, open_tickets=(), term=5,
    )  # fmt: skip
    for term in (0, 1):
        f = Fence(term, 1, 0.4)
        assert f.observe(hb) is False
        assert f.highest is None
    # The contrast: the same heartbeat as a primary's fences a router of a lower term.
    assert Fence(1, 1, 0.4).observe(dataclasses.replace(hb, role="primary")) is True


def test_decision_slots_take_turns() -> None:
    s0, s1 = DecisionSlots(0, 2, 0.004), DecisionSlots(1, 2, 0.004)  # period 8 ms
    assert s0.wait(100.000) == 0.0 and s0.wait(100.0019) == 0.0
    assert s0.next_start(100.0021) == pytest.approx(100.008)  # the second half is the guard
    assert s1.next_start(100.0001) == pytest.approx(100.004)
    assert s1.wait(100.0045) == 0.0 and s1.next_start(100.0061) == pytest.approx(100.012)
    for t in (100.0, 100.001, 100.003, 100.005, 100.0079):  # never both at once
        assert s0.wait(t) > 0 or s1.wait(t) > 0
    with pytest.raises(ValueError):
        DecisionSlots(2, 2, 0.004)
    with pytest.raises(ValueError, match="--role active"):
        RouterConfig(decision_slot=0.004)
    with pytest.raises(ValueError, match="--slot-index"):
        RouterConfig(role="active", peer_routers=("tcp://h:1",), decision_slot=0.004, slot_index=2)


def test_sim_tier_peer_sees_a_decision_only_after_the_delay() -> None:
    routers = [
        SimRouter(["a", "b"], make_policy("lmetric"), block_size=4, event_delay=0.005) for _ in range(2)
    ]
    tier = SimRouterTier(routers, router_delay=0.002)
    hashes = [11, 12, 13, 14]
    i, ticket, _ = tier.route(1.0, hashes, 16, via=0)
    name = routers[0].name_of(i)
    peer = routers[1].model.table.get(name)
    assert peer is not None and not peer.pending
    tier.route(1.001, [21, 22, 23, 24], 16, via=1)  # before the delay: router 1 does not know
    assert routers[1].peer_routed == 0
    assert tier.races == 1  # both idle and tied: router 1 picks the instance router 0 just took
    tier.route(1.0025, [31, 32, 33, 34], 16, via=1)  # after it: applied before routing
    assert routers[1].peer_routed == 1
    # Router 1's own two requests plus router 0's: three pending over the two instances.
    assert sum(len(st.pending) for st in routers[1].model.table) == 3
    assert ticket % 2 == 0  # composite ticket: router 0
    tier.finish(i, ticket, 1.5)
    assert routers[0].model.table.get(name).open_tickets == set()  # type: ignore[union-attr]
    routers[1]._deliver(1.503)
    assert routers[1].peer_finished == 1


def test_simulate_two_routers_accounts_peer_decisions() -> None:
    plan = window(load_trace(TRACE), 1.0, 60.0)
    one = simulate(plan, make_policy("lmetric"), SimConfig(instances=4))
    two = simulate(plan, make_policy("lmetric"), SimConfig(instances=4, routers=2, router_delay=0.002))
    assert len(two.records) == len(one.records) == len(plan)
    assert all(r.status == "ok" for r in two.records)
    assert sum(two.decisions.values()) == len(plan)
    # Each router applied (nearly) every decision of the other: all but those made after its last
    # routing (delivery is lazy, at the next decision).
    assert len(plan) - 5 <= two.peer_decisions <= len(plan)
    assert one.peer_decisions == 0
    # With no delay and no ingest work, both routers know every earlier decision when they route:
    # they decide as one router but for LMetric's tie-break rotation, which each router keeps.
    zero = SimConfig(instances=4, ingest_overhead=0.0, ingest_per_token=0.0)
    base = simulate(plan, make_policy("lmetric"), zero)
    tied = simulate(plan, make_policy("lmetric"), dataclasses.replace(zero, routers=2, router_delay=0.0))
    hit = summarize(base.records)["hit_ratio"]
    assert abs(summarize(tied.records)["hit_ratio"] - hit) < 0.05
    # The trace's bursts make the routers race at 10 ms; in decision slots longer than twice the delay
    # they never do.
    slow = dataclasses.replace(SimConfig(instances=4), routers=2, router_delay=0.01)
    assert simulate(plan, make_policy("lmetric"), slow).peer_races > 0
    slotted = simulate(plan, make_policy("lmetric"), dataclasses.replace(slow, decision_slot=0.02))
    assert slotted.peer_races == 0 and all(r.status == "ok" for r in slotted.records)


def test_simulate_cli_routers_flag(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    cmd = [
        sys.executable, "-m", "launch", "simulate", "--trace", str(TRACE), "--instances", "4",
        "--duration", "30", "--routers", "2", "--router-delay", "0.01", "--summary-json", str(out),
        "--no-progress",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert "2 active routers (10 ms apart)" in res.stdout
    conf = json.loads(out.read_text())["config"]
    assert conf["routers"] == 2 and conf["router_delay"] == 0.01


def test_cluster_file_routers_and_replay_urls() -> None:
    old = parse_cluster_file(json.dumps({"router": "http://r:1", "metrics": None, "processes": []}))
    assert old.routers == ("http://r:1",)
    new = parse_cluster_file(
        json.dumps(
            {
                "router": "http://r:1",
                "metrics": None,
                "routers": ["http://r:1", "http://r:2"],
                "processes": [],
            }
        )
    )
    assert new.routers == ("http://r:1", "http://r:2")
    assert replay_urls("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError):
        replay_urls(" , ")


# ----------------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def active_cluster_file(active_cluster: dict[str, Any]) -> Path:
    return Path(active_cluster["_file"])


@pytest.fixture(scope="module")
def active_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("active")
    cfile, logs = tmp / "cluster.json", tmp / "logs"
    args = [
        "--instances", "2", "--port", "0", "--routers", "2",
        "--cluster-file", str(cfile), "--log-dir", str(logs), "--time-scale", "1", "--no-metrics",
        "--decision-slot", "0.01", "--admin-key", ADMIN_KEY,  # given by value: reaches each router by variable
    ]  # fmt: skip
    with launched_cluster(args, logs, timeout=150):
        info = json.loads(cfile.read_text())
        info["_file"] = str(cfile)
        yield info


async def _state(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/router/state", headers=ADMIN) as r:
        assert r.status == 200
        out: dict[str, Any] = await r.json()
        return out


async def _fenced_total(s: aiohttp.ClientSession, url: str) -> float:
    async with s.get(url + "/metrics", headers=ADMIN) as r:
        text = await r.text()
    for fam in text_string_to_metric_families(text):
        if fam.name == "router_fenced":
            return sum(x.value for x in fam.samples)
    raise AssertionError("no router_fenced metric")


async def _decisions(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with s.get(url + "/metrics", headers=ADMIN) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "router_decisions":
            for x in fam.samples:
                if x.name.endswith("_total") and x.value:
                    out[x.labels["instance"]] = out.get(x.labels["instance"], 0.0) + x.value
    return out


@pytest.mark.timeout(240)
async def test_live_decision_of_router_a_is_pending_on_router_b(active_cluster: dict[str, Any]) -> None:
    info = active_cluster
    actives = [p for p in info["processes"] if p["role"] == "router-active"]
    assert len(actives) == 2 and info["routers"] == [p["endpoints"]["http"] for p in actives]
    a, b = info["routers"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        for url in (a, b):  # both routers see both instances
            deadline = time.monotonic() + 30
            while True:
                st = await _state(s, url)
                if len(st["instances"]) == 2 and all(i["routable"] for i in st["instances"]):
                    break
                assert time.monotonic() < deadline, st["instances"]
                await asyncio.sleep(0.1)
        # A long generation through A (time scale 1: it runs for seconds).
        body = {
            "input_ids": list(range(1, 3000)),
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
            "stream": True,
        }
        async with s.post(a + "/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # the first token: the request runs on its instance
            sa = await _state(s, a)
            chosen = next(i["name"] for i in sa["instances"] if i["inflight"] == 1)
            deadline = time.monotonic() + 10
            while True:
                sb = await _state(s, b)
                inst = {i["name"]: i for i in sb["instances"]}
                if inst[chosen]["inflight"] == 1:
                    break
                assert time.monotonic() < deadline, sb
                await asyncio.sleep(0.05)
            assert sb["ha"]["active"]["decision_slots"] == {"index": 1, "count": 2, "slot": 0.01}
            peer = sb["ha"]["active"]["peers"][0]
            assert peer["connected"] and peer["role"] == "active" and peer["mirrored_open"] == 1
            assert peer["mirror"]["routed"] >= 1
            # B routes a request with a fresh prefix around A's busy instance.
            small = {"input_ids": [7] * 40, "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}
            async with s.post(b + "/generate", json=small) as r2:
                assert r2.status == 200
                await r2.read()
            other = next(n for n in inst if n != chosen)
            assert await _decisions(s, b) == {other: 1}
            assert (await _state(s, b))["ha"]["published"].get("RequestRouted", 0) == 1
            r.close()  # abort A's long request
        # Its end reaches B; and neither router ever stepped down.
        deadline = time.monotonic() + 15
        while (await _state(s, b))["ha"]["active"]["peers"][0]["mirrored_open"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        for url in (a, b):
            st = await _state(s, url)
            assert st["ha"]["role"] == "active" and st["ha"]["term"] == 0 and st["ha"]["fenced_by"] is None
            assert await _fenced_total(s, url) == 0


def test_live_replay_spreads_over_both_routers(active_cluster: dict[str, Any], tmp_path: Path) -> None:
    a, b = active_cluster["routers"]
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 50 * i, "input_length": 600, "output_length": 3, "hash_ids": [0, 1000 + i]}
        for i in range(6)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))

    async def published() -> list[int]:
        async with aiohttp.ClientSession() as s:
            return [(await _state(s, u))["ha"]["published"].get("RequestRouted", 0) for u in (a, b)]

    before = asyncio.run(published())
    cmd = [
        sys.executable, "-m", "launch", "replay", "--trace", str(trace), "--url", f"{a},{b}",
        "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    after = asyncio.run(published())
    assert [x - y for x, y in zip(after, before, strict=True)] == [3, 3]  # round robin


@pytest.mark.timeout(240)
async def test_live_dead_router_is_released_by_its_peer_and_restarted(
    active_cluster: dict[str, Any], active_cluster_file: Path
) -> None:
    a = active_cluster["routers"][0]
    old = next(
        p for p in active_cluster["processes"] if p["role"] == "router-active" and p["instance"] == "1"
    )
    os.kill(old["pid"], signal.SIGKILL)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        deadline = time.monotonic() + 60
        while True:  # the launcher restarts it on the same ports; router A reconnects to its stream
            procs = json.loads(active_cluster_file.read_text())["processes"]
            new = [
                p for p in procs
                if p["role"] == "router-active" and p["instance"] == "1" and p["status"] == "running"
            ]  # fmt: skip
            peer = (await _state(s, a))["ha"]["active"]["peers"][0]
            if (
                new
                and new[0]["pid"] != old["pid"]
                and peer["connected"]
                and peer["http"] == old["endpoints"]["http"]
            ):
                break
            assert time.monotonic() < deadline, (procs, peer)
            await asyncio.sleep(0.2)
        assert new[0]["endpoints"]["decisions"] == old["endpoints"]["decisions"]
        assert any(p["role"] == "router-failed" and p["pid"] == old["pid"] for p in procs)
        st = await _state(s, a)
        assert st["ha"]["role"] == "active" and await _fenced_total(s, a) == 0
