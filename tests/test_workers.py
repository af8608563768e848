"""``python -m router --workers N`` (router/workers.py): a supervisor and N worker routers on one port.

Pure: the flags, what a worker is told, the metric relabelling. Real processes: two emulated engines and
their agents in-process, ``python -m router --workers 2`` as a subprocess: requests through the one port
are answered by both workers, each worker sees the other's dispatches, one ``/metrics`` counts every
request, a killed worker is restarted, SIGHUP stops nothing, SIGTERM leaves no process, and the workers die with
a supervisor killed with SIGKILL; and ``launch cluster --workers 2``'s standby stays a standby while one
worker restarts and takes over once the whole group is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvindex.protocol.ready import Ready, parse_ready
from router.cli import parse_args
from router.config import RouterConfig
from router.ha import try_bind
from router.workers import Supervisor, Worker, reserve_port
from router.workers_admin import label_families
from tests.launched import launched_cluster
from tests.live_rig import AgentRunner, agent_config, close_all, engine_config, start_engine

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
KEY = "workers-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ---------------------------------------------------------------------------------------------- pure


def test_workers_flag_and_its_limits() -> None:
    assert parse_args([]).workers == 1
    cfg = parse_args(["--workers", "3", "--decision-slot", "0.01"])
    assert cfg.workers == 3 and cfg.role == "primary" and cfg.worker_index is None
    with pytest.raises(ValueError, match="standby"):
        RouterConfig(workers=2, role="standby", primary_decisions="tcp://127.0.0.1:1", port=1)
    with pytest.raises(ValueError, match="takeover"):
        RouterConfig(workers=2, takeover="external")
    with pytest.raises(ValueError, match="workers"):
        RouterConfig(workers=0)


def test_a_worker_is_an_active_router_following_its_siblings() -> None:
    argv = ["--port", "0", "--agent", "tcp://127.0.0.1:9", "--workers", "3", "--admin-port", "7777"]
    sup = Supervisor(parse_args(argv), argv)
    sup.port = 4321
    sup.workers = [Worker(i, 5000 + i) for i in range(3)]
    w = parse_args(sup.worker_args(1))
    assert (w.workers, w.role, w.port, w.worker_index, w.worker_of) == (3, "active", 4321, 1, os.getpid())
    assert w.peer_routers == ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5002")
    assert (w.decisions_port, w.admin_port, w.admin_host, w.metrics_port) == (5001, 0, "127.0.0.1", 0)
    assert w.agents == ("tcp://127.0.0.1:9",)
    ext = [*argv, "--role", "active", "--peer-routers", "tcp://10.0.0.9:7000"]  # one more router elsewhere
    sup = Supervisor(parse_args(ext), ext)
    sup.workers = [Worker(i, 5000 + i) for i in range(3)]
    w = parse_args(sup.worker_args(0))
    assert w.peer_routers == ("tcp://10.0.0.9:7000", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002")
    argv += ["--decision-slot", "0.01"]  # the workers take turns, one slot each
    sup = Supervisor(parse_args(argv), argv)
    sup.workers = [Worker(i, 5000 + i) for i in range(3)]
    w = parse_args(sup.worker_args(2))
    assert (w.decision_slot, w.slot_index, len(w.peer_routers)) == (0.01, 2, 2)


def test_metrics_get_a_worker_label() -> None:
    a = '# HELP x_total X\n# TYPE x_total counter\nx_total{k="a"} 2.0\n# TYPE g gauge\ng 1.0\n'
    b = '# HELP x_total X\n# TYPE x_total counter\nx_total{k="a"} 3.0\n'
    fams = {f.name: f for f in label_families([("0", a), ("1", b)])}
    assert [(s.labels, s.value) for s in fams["x"].samples] == [
        ({"k": "a", "worker": "0"}, 2.0),
        ({"k": "a", "worker": "1"}, 3.0),
    ]
    assert [s.labels for s in fams["g"].samples] == [{"worker": "0"}]


def test_the_reserved_port_keeps_a_standby_out_until_the_supervisor_is_gone() -> None:
    held = reserve_port("127.0.0.1", 0)
    port = int(held.getsockname()[1])
    assert try_bind("127.0.0.1", port) is None  # no worker listens, yet a standby cannot bind
    held.close()
    sock = try_bind("127.0.0.1", port)
    assert sock is not None
    sock.close()


# ----------------------------------------------------------------------------------- real processes


@dataclass
class Group:
    proc: asyncio.subprocess.Process
    ready: Ready

    @property
    def http(self) -> str:
        return self.ready.endpoints["http"]

    @property
    def admin(self) -> str:
        return self.ready.endpoints["admin"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(ChildProcessError):  # our own child, a zombie until reaped
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    try:  # not our child: a zombie of the supervisor's counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[list[str]]:
    """Two emulated engines (time scale 1: a long generation runs for seconds) and their agents."""
    engines, agents = [], []
    try:
        for i in range(2):
            srv, _ = await start_engine(engine_config(time_scale=1.0, max_total_tokens=8192))
            engines.append(srv)
            agents.append(await AgentRunner(agent_config(srv.endpoints["http"], f"e{i}")).start())
        yield [a.agent.pub_endpoint for a in agents]
    finally:
        await close_all(*(a.stop for a in agents), *(e.stop for e in engines))


@contextlib.asynccontextmanager
async def group(pubs: list[str], *extra: str) -> AsyncIterator[Group]:
    cmd = ["-m", "router", "--workers", "2", "--port", "0", "--log-level", "WARNING"]
    cmd += ["--admin-key", KEY, "--warmup-timeout", "10", *extra]
    cmd += [x for p in pubs for x in ("--agent", p)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        ready = None
        while ready is None:
            line = await asyncio.wait_for(proc.stdout.readline(), 40)
            assert line, "the supervisor exited before READY"
            ready = parse_ready(line.decode())
        yield Group(proc, ready)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _json(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _requests_by_worker(s: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with s.get(admin + "/metrics", headers=AUTH) as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "router_requests":
            for x in fam.samples:
                if x.name == "router_requests_total":
                    out[x.labels["worker"]] = out.get(x.labels["worker"], 0.0) + x.value
    return out


async def _generate(url: str, ids: list[int], max_new: int = 2) -> None:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}
    async with aiohttp.ClientSession() as s, s.post(url + "/generate", json=body) as r:  # a new connection
        assert r.status == 200, await r.text()
        await r.read()


async def test_two_workers_share_the_port_and_each_others_decisions() -> None:
    async with cluster() as pubs, group(pubs) as g, aiohttp.ClientSession() as s:
        workers = (await _json(s, g.admin + "/router/state"))["workers"]
        assert [w["index"] for w in workers] == [0, 1] and all(w["ready"] for w in workers)
        wadmin = [w["endpoints"]["admin"] for w in workers]
        for url in wadmin:  # each worker follows the other's stream and both agents
            st = await _json(s, url + "/router/state")
            assert st["ha"]["role"] == "active" and len(st["instances"]) == 2
            assert st["process"]["pid"] in {w["pid"] for w in workers}
        n = 24
        for i in range(n):  # a new connection each: the kernel spreads them over the two workers
            await _generate(g.http, [100 + i] * 40)
        async with s.get(g.http + "/metrics", headers=AUTH) as r:  # not on the shared port: one worker's
            assert r.status == 404
        async with s.get(g.admin + "/health") as r:
            assert r.status == 200 and (await r.json())["ready"] == 2
        async with s.get(g.admin + "/metrics", headers=AUTH) as r:
            types = [ln.split()[2] for ln in (await r.text()).splitlines() if ln.startswith("# TYPE")]
        assert len(types) == len(set(types))  # every family once (Prometheus refuses a repeated one)
        by_worker = await _requests_by_worker(s, g.admin)
        assert sum(by_worker.values()) == n and set(by_worker) == {"0", "1"}, by_worker
        assert all(v > 0 for v in by_worker.values()), by_worker
        # Each worker's decisions reached the other (peer mirror counts match what each published).
        states = [await _json(s, url + "/router/state") for url in wadmin]
        published = [st["ha"]["published"].get("RequestRouted", 0) for st in states]
        mirrored = [st["ha"]["active"]["peers"][0]["mirror"]["routed"] for st in states]
        assert sum(published) == n and mirrored == published[::-1], (published, mirrored)
        # A long request in flight on one worker is pending on the other.
        body = {
            "input_ids": list(range(1, 1000)),
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
            "stream": True,
        }
        async with aiohttp.ClientSession() as s2, s2.post(g.http + "/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()
            states = [await _json(s, url + "/router/state") for url in wadmin]
            owner = next(i for i, st in enumerate(states) if st["admission"]["inflight"] == 1)
            chosen = next(x["name"] for x in states[owner]["instances"] if x["inflight"] == 1)
            other = wadmin[1 - owner]
            deadline = time.monotonic() + 5
            while True:
                inst = {x["name"]: x for x in (await _json(s, other + "/router/state"))["instances"]}
                if inst[chosen]["inflight"] == 1:
                    break
                assert time.monotonic() < deadline, inst
                await asyncio.sleep(0.05)
        # SIGTERM: the supervisor stops both workers and exits 0.
        pids = [w["pid"] for w in workers]
        g.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(g.proc.wait(), 20) == 0
        assert all(_gone(p) for p in pids)


async def test_a_killed_worker_is_restarted_and_workers_die_with_the_supervisor() -> None:
    async with cluster() as pubs, group(pubs, "--decision-slot", "0.004") as g, aiohttp.ClientSession() as s:
        old = (await _json(s, g.admin + "/router/state"))["workers"]
        for i, w in enumerate(old):  # the workers take turns to decide
            st = await _json(s, w["endpoints"]["admin"] + "/router/state")
            assert st["ha"]["active"]["decision_slots"] == {"index": i, "count": 2, "slot": 0.004}
        g.proc.send_signal(signal.SIGHUP)  # keys reloaded everywhere; nothing stops
        await asyncio.sleep(0.5)
        assert g.proc.returncode is None
        assert [w["pid"] for w in (await _json(s, g.admin + "/router/state"))["workers"]] == [
            w["pid"] for w in old
        ]
        os.kill(old[0]["pid"], signal.SIGKILL)

        async def restarted() -> dict[str, Any]:
            deadline = time.monotonic() + 30
            while True:
                w = (await _json(s, g.admin + "/router/state"))["workers"][0]
                if w["pid"] != old[0]["pid"] and w["ready"] and w["restarts"] == 1:
                    return dict(w)
                assert time.monotonic() < deadline, w
                await asyncio.sleep(0.1)

        new = await restarted()
        async with s.get(g.admin + "/metrics", headers=AUTH) as r:
            text = await r.text()
        assert 'router_worker_restarts_total{worker="0"} 1.0' in text
        for i in range(6):
            await _generate(g.http, [7 + i] * 40)
        # SIGKILL to the supervisor: its workers notice and stop.
        g.proc.kill()
        await g.proc.wait()
        pids = [new["pid"], old[1]["pid"]]
        deadline = time.monotonic() + 15
        while not all(_gone(p) for p in pids):
            assert time.monotonic() < deadline, pids
            await asyncio.sleep(0.1)


@pytest.mark.timeout(150)
async def test_launch_cluster_workers_primary_and_its_standby(tmp_path: Path) -> None:
    cfile, logs = tmp_path / "cluster.json", tmp_path / "logs"
    args = ["--instances", "1", "--port", "0", "--workers", "2", "--cluster-file", str(cfile)]
    args += ["--log-dir", str(logs), "--time-scale", "0.01"]
    with launched_cluster(args, logs, timeout=120):
        info = json.loads(cfile.read_text())
        primary = next(p for p in info["processes"] if p["role"] == "router-primary")
        assert len(primary["endpoints"]["decisions_all"].split(",")) == 2
        async with aiohttp.ClientSession() as s:
            workers = (await _json(s, primary["endpoints"]["admin"] + "/router/state"))["workers"]
            assert len(workers) == 2 and all(w["ready"] for w in workers)
            await _generate(info["router"], [5] * 40)
            # One worker killed: its supervisor restarts it; the standby (which follows worker 0) must not
            # take over, since the supervisor's reserved socket keeps the port.
            standby = next(p for p in info["processes"] if p["role"] == "router-standby")
            os.kill(workers[0]["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                now_workers = (await _json(s, primary["endpoints"]["admin"] + "/router/state"))["workers"]
                if now_workers[0]["pid"] != workers[0]["pid"] and now_workers[0]["ready"]:
                    break
                assert time.monotonic() < deadline, now_workers
                await asyncio.sleep(0.1)
            workers = now_workers
            st = await _json(s, standby["endpoints"]["admin"] + "/router/state")
            assert st["ha"]["role"] == "standby", st["ha"]
            await _generate(info["router"], [9] * 40)
            # The whole group gone (SIGKILL to the supervisor, its workers follow): the standby takes over.
            os.kill(primary["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while True:
                procs = json.loads(cfile.read_text())["processes"]
                now = [p for p in procs if p["role"] == "router-primary" and p["status"] == "running"]
                if now and now[0]["pid"] != primary["pid"]:
                    break
                assert time.monotonic() < deadline, procs
                await asyncio.sleep(0.2)
            await _generate(info["router"], [6] * 40)
            while not all(_gone(w["pid"]) for w in workers):  # its workers stopped (they may still drain)
                assert time.monotonic() < deadline, workers
                await asyncio.sleep(0.1)


async def test_a_worker_that_cannot_start_fails_the_group() -> None:
    cmd = ["-m", "router", "--workers", "2", "--port", "0", "--tokenizer", "/nonexistent/tokenizer.json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 1 and b"READY" not in out
    assert b"cannot start the router workers: worker" in err, err.decode()[-2000:]
