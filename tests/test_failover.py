"""Hot standby: the decision mirror on bare cores, then a real cluster whose primary router is SIGKILLed.

The first tests feed two :class:`RoutingModel` objects (primary and standby) the same agent frames without
sockets, route on the primary and pass its decision stream through a real
:class:`DecisionSubscriber` (``handle_frames``) into the standby's :class:`DecisionMirror`: the standby's
index, speculative entries and per-instance dispatch accounting must equal the primary's.

The last test runs ``python -m launch cluster`` (two emulated engines, primary + standby + metrics daemon,
router port found free at test time, the rest OS-assigned), keeps requests flowing, kills the primary
with SIGKILL and checks that the standby takes over, that no request sent after the takeover fails, that
a new standby appears in the cluster file and follows the new primary, and that the metrics daemon counts
the new primary's decisions. Every wait is a bounded poll; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from kvindex.hashing import block_hashes
from kvindex.protocol import (
    TOPIC_DECISIONS,
    TOPIC_HEARTBEAT,
    TOPIC_LOAD,
    TOPIC_ROUTER_HEARTBEAT,
    BlockStored,
    Heartbeat,
    LoadReport,
    Snapshot,
    encode_message,
    make_frame,
)
from router.config import RouterConfig
from router.decisions import (
    DecisionSubscriber,
    finished_message,
    heartbeat_of,
    routed_message,
)
from router.ha import HANode
from router.model.mirror import DecisionMirror
from router.model.model import Routed, RoutingModel, SnapshotJob
from router.server import RouterServer
from router.subscriber import Subscriber
from tests.ports import free_port
from tests.test_router import Clock

ROOT = Path(__file__).resolve().parents[1]
BS = 4


# ------------------------------------------------------------------------------- mirror on bare cores


def stored(tokens: list[int]) -> BlockStored:
    hs = block_hashes(tokens, BS)
    return BlockStored(tuple(hs), None, tuple(tokens[: len(hs) * BS]), BS)


@dataclass
class Pair:
    """A primary and a standby core fed the same agent frames; the standby mirrors the primary."""

    clock: Clock = field(default_factory=Clock)
    epoch: int = 77

    def __post_init__(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        self.jobs: list[list[SnapshotJob]] = [[], []]
        self.cores = [
            RoutingModel(
                RouterConfig(block_size=BS).model,
                self.jobs[i].append,
                mono=self.clock.mono,
                wall=self.clock.wall,
            )
            for i in range(2)
        ]
        self.subs = [Subscriber([], c.on_message, ctx=ctx) for c in self.cores]
        self.mirror = DecisionMirror(self.standby, mono=self.clock.mono)
        self.follower = DecisionSubscriber([], self.mirror.on_message, ctx=ctx)
        self.seq: dict[str, int] = {}
        self.dseq = 0

    @property
    def primary(self) -> RoutingModel:
        return self.cores[0]

    @property
    def standby(self) -> RoutingModel:
        return self.cores[1]

    def agent(self, topic: bytes, msg: Any) -> None:
        name = msg.instance
        seq = self.seq.get(name, 0)
        self.seq[name] = seq + 1
        for core, sub in zip(self.cores, self.subs, strict=True):
            rec = sub.handle_frames(f"tcp://{name}", make_frame(topic, seq, encode_message(msg)))
            assert rec is not None
            core.on_message(rec)

    def bring_up(self, name: str, *evs: BlockStored) -> None:
        hb = Heartbeat(name, 1, self.clock.wall(), f"http://{name}", True, BS, 0, "m", f"tcp://snap-{name}")
        self.agent(TOPIC_HEARTBEAT, hb)
        for core, jobs in zip(self.cores, self.jobs, strict=True):
            job = [j for j in jobs if j.instance == name][-1]
            assert core.on_snapshot(job, Snapshot(name, 1, self.seq[name] - 1, BS, evs))

    def load(self, name: str, running: int, queued: int, ts: float) -> None:
        self.agent(TOPIC_LOAD, LoadReport(name, 1, ts, running, 0, queued, 0, 10_000, 0))

    def decision(self, msg: Any, topic: bytes = TOPIC_DECISIONS, deliver: bool = True) -> None:
        frame = make_frame(topic, self.dseq, encode_message(msg))
        self.dseq += 1
        if deliver:
            rec = self.follower.handle_frames("tcp://primary", frame)
            assert rec is not None
            self.mirror.on_message(rec)

    def route(self, tokens: list[int]) -> Routed:
        r = self.primary.route(tokens)
        self.decision(routed_message(self.epoch, r, len(tokens), None, ts=self.clock.wall()))
        return r

    def finish(self, r: Routed, deliver: bool = True) -> None:
        self.primary.finish(r.instance, r.ticket)
        self.decision(finished_message(self.epoch, r, "200"), deliver=deliver)

    def heartbeat(self) -> None:
        self.decision(
            heartbeat_of(self.primary, self.epoch, "primary", "http://x", 1), TOPIC_ROUTER_HEARTBEAT
        )

    def views(self, core: RoutingModel) -> list[tuple[Any, ...]]:
        idx = core.index
        assert idx is not None
        return [
            (
                st.name,
                st.view(),
                len(st.pending),
                st.inflight,
                idx.blocks_of(st.name),
                idx.speculative_blocks(st.name),
            )
            for st in sorted(core.table, key=lambda s: s.name)
        ]

    def assert_same(self) -> None:
        assert self.views(self.primary) == self.views(self.standby)
        p, s = self.primary.index, self.standby.index
        assert p is not None and s is not None
        assert p.total_blocks() == s.total_blocks()


def test_standby_mirror_matches_primary_index_speculation_and_accounting() -> None:
    pair = Pair()
    shared = list(range(1, 41))
    pair.bring_up("a", stored(shared))
    pair.bring_up("b")
    pair.assert_same()
    r1 = pair.route([*shared, 99, 98, 97, 96])  # prefix on a
    r2 = pair.route(list(range(200, 240)))  # new prompt: speculative entries on whichever is chosen
    r3 = pair.route(list(range(300, 340)))
    assert r1.instance == "a"
    pair.assert_same()
    assert pair.standby.index is not None and pair.standby.index.speculative_blocks() > 0
    # the standby would now decide what the primary decides
    probe = list(range(200, 240))
    assert pair.standby.route(probe).instance == pair.primary.route(probe).instance == r2.instance
    assert r3.instance != r2.instance


def test_standby_mirror_follows_finishes_load_reports_and_reconciles_lost_frames() -> None:
    pair = Pair()
    pair.bring_up("a")
    pair.bring_up("b")
    rs = [pair.route(list(range(100 * i, 100 * i + 40))) for i in range(6)]
    pair.assert_same()
    pair.finish(rs[0])
    pair.finish(rs[1])
    pair.assert_same()
    # a load report stamped after the dispatches covers their pending entries on both
    pair.clock.t += 1.0
    pair.load("a", running=2, queued=10, ts=pair.clock.wall())
    pair.load("b", running=2, queued=10, ts=pair.clock.wall())
    pair.assert_same()
    # a RequestFinished lost on the way: the next heartbeat's open tickets reconcile it
    pair.finish(rs[2], deliver=False)
    assert pair.views(pair.primary) != pair.views(pair.standby)
    pair.heartbeat()
    pair.assert_same()
    assert pair.mirror.stats.reconciled == 1
    # a load report that overtook its decision: the standby must not count the dispatch as pending
    r = pair.primary.route(list(range(900, 940)))
    pair.clock.t += 0.5
    pair.load(r.instance, running=3, queued=0, ts=pair.clock.wall())
    pair.decision(routed_message(pair.epoch, r, 40, None, ts=pair.clock.wall() - 0.5))
    pair.assert_same()
    # at a takeover every mirrored dispatch is released (those requests died with the primary)
    assert pair.mirror.release() == pair.mirror.stats.released > 0
    assert all(st.inflight == 0 for st in pair.standby.table)


# ------------------------------------------------------------------------ takeover, in process (no agents)


async def start_pair(takeover: str) -> tuple[HANode, HANode, int]:
    port = free_port()
    primary = HANode(RouterServer(RouterConfig(port=port, warmup_timeout=0, admin_port=0)))
    await primary.start()
    assert primary.publisher is not None
    cfg = RouterConfig(
        port=port,
        warmup_timeout=0,
        role="standby",
        primary_decisions=primary.publisher.endpoint,
        admin_port=0,
        primary_timeout=0.3,
        takeover=takeover,
    )
    standby = HANode(RouterServer(cfg))
    await standby.start()
    assert await standby.wait_for_primary(10)
    return primary, standby, port


async def router_state(port: int) -> Any:
    async with aiohttp.ClientSession() as s:
        return await get_json(s, f"http://127.0.0.1:{port}/router/state")


async def test_standby_binds_the_port_only_once_the_primary_is_gone() -> None:
    primary, standby, port = await start_pair("auto")
    try:
        hb = standby.mirror.heartbeat_at
        await poll(lambda: standby.mirror.heartbeat_at != hb, "another primary heartbeat")
        assert standby.role == "standby" and (await router_state(port))["ha"]["role"] == "primary"
        await primary.stop()
        await asyncio.wait_for(standby.wait_promoted(), 10)
        state = await router_state(port)
        assert state["ha"]["role"] == "primary" and state["ha"]["router_epoch"] == f"{standby.epoch:x}"
        assert state["ha"]["takeovers"] == 1
    finally:
        await standby.stop()
        await primary.stop()


async def test_external_takeover_waits_for_promote() -> None:
    primary, standby, port = await start_pair("external")
    try:
        assert standby.admin_url is not None
        async with aiohttp.ClientSession() as s:
            async with s.post(standby.admin_url + "/router/promote") as r:
                assert r.status == 409  # the primary still listens there
            await primary.stop()
            await asyncio.sleep(0.5)  # heartbeats stopped: still no takeover without being told
            assert standby.role == "standby"
            async with s.post(standby.admin_url + "/router/promote") as r:
                assert r.status == 200 and (await r.json())["role"] == "primary"
        assert (await router_state(port))["ha"]["router_epoch"] == f"{standby.epoch:x}"
    finally:
        await standby.stop()
        await primary.stop()


# ------------------------------------------------------------------------------ a real cluster, killed


def _logs(log_dir: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-2500:]}" for f in sorted(log_dir.glob("*.log")))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path, str]]:
    port = free_port()
    cfile, logs = tmp_path / "cluster.json", tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "launch", "cluster", "--instances", "2", "--port", str(port),
        "--cluster-file", str(cfile), "--log-dir", str(logs),
        "--time-scale", "0.05", "--max-total-tokens", "20000",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while True:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("launch cluster did not become ready\n" + _logs(logs))
        if line.startswith("router: "):
            break
    yield proc, cfile, logs, f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def routers(cfile: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in json.loads(cfile.read_text())["processes"]:
        if str(p["role"]).startswith("router"):
            out.setdefault(p["role"], []).append(p)
    return out


async def get_json(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return await r.json()


async def poll(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await pred() if asyncio.iscoroutinefunction(pred) else pred()
        except (aiohttp.ClientError, OSError, KeyError, ValueError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Sent:
    start: float
    ok: bool
    detail: str = ""


async def one_request(s: aiohttp.ClientSession, url: str, i: int, max_new: int = 8) -> Sent:
    start = time.time()
    body = {
        "input_ids": list(range(1, 300)) + [1000 + i] * 40,  # a shared prefix, then a private tail
        "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True},
        "stream": True,
    }
    try:
        async with s.post(url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
            text = await r.text()
            ok = r.status == 200 and "[DONE]" in text and '"error"' not in text
            return Sent(start, ok, "" if ok else f"{r.status} {text[:200]}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Sent(start, False, f"{type(exc).__name__}: {exc}")


async def test_sigkill_of_the_primary_under_load(
    cluster: tuple[subprocess.Popen[str], Path, Path, str],
) -> None:
    proc, cfile, logs, url = cluster
    before = routers(cfile)
    primary, standby = before["router-primary"][0], before["router-standby"][0]
    info = json.loads(cfile.read_text())
    conn = aiohttp.TCPConnector(force_close=True, limit=0)  # one connection per request, like new clients
    async with aiohttp.ClientSession(connector=conn) as s:
        # In-flight accounting matches while a long request runs on the primary.
        long = asyncio.create_task(one_request(s, url, -1, max_new=8000))

        async def inflight_equal() -> bool:
            p = await get_json(s, primary["endpoints"]["admin"] + "/router/state")
            q = await get_json(s, standby["endpoints"]["admin"] + "/router/state")
            pi = {i["name"]: i["inflight"] for i in p["instances"]}
            qi = {i["name"]: i["inflight"] for i in q["instances"]}
            return sum(pi.values()) == 1 and pi == qi

        await poll(inflight_equal, "the standby to mirror the primary's request in flight")

        # Steady load, then SIGKILL the primary in the middle of it.
        sent: list[asyncio.Task[Sent]] = []
        kill_at = 0.0
        for i in range(120):
            sent.append(asyncio.create_task(one_request(s, url, i)))
            if i == 40:
                kill_at = time.time()
                os.kill(int(primary["pid"]), signal.SIGKILL)
            await asyncio.sleep(0.05)
        results = [await t for t in sent]
        await long

        ok_after = sorted(r.start for r in results if r.ok and r.start >= kill_at)
        assert ok_after, "no request succeeded after the kill:\n" + _logs(logs)
        takeover = ok_after[0]
        failed_after = [r for r in results if r.start >= takeover and not r.ok]
        assert not failed_after, f"requests sent after takeover failed: {failed_after[:3]}"

        # The launcher relabels the routers and starts a new standby that follows the new primary.
        def relabelled() -> dict[str, list[dict[str, Any]]] | None:
            now = routers(cfile)
            sb = [p for p in now.get("router-standby", []) if p["status"] == "running"]
            return now if sb and now.get("router-primary", [{}])[0].get("pid") == standby["pid"] else None

        now = await poll(relabelled, "a new standby in the cluster file")
        assert now["router-failed"][0]["pid"] == primary["pid"]
        new_standby = next(p for p in now["router-standby"] if p["status"] == "running")
        assert new_standby["pid"] not in (primary["pid"], standby["pid"])

        async def follows() -> bool:
            st = await get_json(s, new_standby["endpoints"]["admin"] + "/router/state")
            ha = st["ha"]
            return bool(ha["role"] == "standby" and ha["primary_connected"] and ha["primary_http"] == url)

        await poll(follows, "the new standby to follow the new primary")
        state = await get_json(s, url + "/router/state")
        assert state["ha"]["role"] == "primary" and state["ha"]["takeovers"] == 1
        assert state["ha"]["pid"] == standby["pid"]

        # The metrics daemon counts the new primary's decisions.
        new_epoch = state["ha"]["router_epoch"]
        await one_request(s, url, 999)

        async def daemon_sees_new_primary() -> bool:
            async with s.get(info["metrics"] + "/metrics") as r:
                text = await r.text()
            for fam in text_string_to_metric_families(text):
                if fam.name == "lmetric_router_decisions":
                    n = sum(
                        x.value
                        for x in fam.samples
                        if x.labels.get("router") == new_epoch and x.name.endswith("_total")
                    )
                    if n > 0:
                        return True
            return False

        await poll(daemon_sees_new_primary, "the metrics daemon to count the new primary's decisions")
    assert proc.poll() is None
