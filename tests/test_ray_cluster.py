"""End to end on a real multi-node Ray cluster on this machine: ``launch cluster --ray ADDRESS``.

A head and two worker nodes (``ray.cluster_utils.Cluster``), each on its own loopback address and with
its own custom resource, so where Ray put each process is visible in the cluster file: instances on the
two nodes that offer ``lmr-engine`` (one each), the primary router on the first ``lmr-router`` node and
the standby on the other. A trace replay goes through the router; ``launch tail`` reads the cluster file;
the router's index agrees exactly with every agent's snapshot. Then one node's processes are SIGKILLed:
its instance goes down, comes back on the same node and ports, and the index is exact again. SIGINT stops
everything.

Skipped where ``ray`` is not importable (``pip install -e ".[ray]"``). The addresses are loopback ones
(127.0.0.1-3): ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from swapping the head's 127.0.0.1 for
the machine's external address.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

import aiohttp  # noqa: E402
import zmq.asyncio  # noqa: E402

from router.subscriber import fetch_snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE = 80 * 1024 * 1024  # Ray's minimum is 75 MiB
HEAD, W0, W1 = "127.0.0.1", "127.0.0.2", "127.0.0.3"

pytestmark = pytest.mark.timeout(600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


class RayRig:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="lmr-ray-"))
        self.nodes: dict[str, Any] = {}
        self.proc: subprocess.Popen[str] | None = None
        self.cfile = self.tmp / "cluster.json"
        self.logs = self.tmp / "logs"
        self.times: dict[str, float] = {}

    def start_ray(self) -> None:
        t = time.monotonic()
        common = {"object_store_memory": OBJECT_STORE, "num_cpus": 2}
        # Ray (2.60) writes the head's address to <system temp>/ray/ray_current_cluster even when the head
        # has its own temp_dir, and does not create that folder: on a fresh machine the start fails.
        (Path(tempfile.gettempdir()) / "ray").mkdir(exist_ok=True)
        self.ray = cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={
                **common,
                "node_ip_address": HEAD,
                "include_dashboard": False,
                "temp_dir": str(self.tmp / "r"),
                "resources": {"lmr-head": 1, "lmr-router": 1},
            },
        )
        self.nodes[HEAD] = self.ray.head_node
        for ip, res in (
            (W0, {"lmr-w0": 1, "lmr-engine": 1, "lmr-router": 1}),
            (W1, {"lmr-w1": 1, "lmr-engine": 1}),
        ):
            self.nodes[ip] = self.ray.add_node(**common, node_ip_address=ip, resources=res)
        self.times["ray_cluster_start"] = time.monotonic() - t

    def start_launcher(self) -> None:
        t = time.monotonic()
        cmd = [
            sys.executable, "-m", "launch", "cluster", "--ray", self.ray.address,
            "--instances", "2", "--port", "0", "--ray-router-nodes", "lmr-router",
            "--ray-instance-resource", "lmr-engine", "--ray-placement-timeout", "120",
            "--cluster-file", str(self.cfile), "--log-dir", str(self.logs),
            "--time-scale", "0.05", "--max-total-tokens", "20000", "--ready-timeout", "120",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines: list[str] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(
                    "launch cluster --ray exited before it was ready:\n" + "".join(lines) + self.log_tail()
                )
            lines.append(line)
            if "cluster ready" in line:
                break
        else:
            pytest.fail("launch cluster --ray not ready in 300 s:\n" + "".join(lines) + self.log_tail())
        self.times["launcher_ready"] = time.monotonic() - t

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.cfile.read_text()))

    def procs(self, role: str) -> list[dict[str, Any]]:
        return [p for p in self.info()["processes"] if p["role"] == role and p["status"] == "running"]

    def log_tail(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.logs.glob("*.log")))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if hasattr(self, "ray"):
            self.ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def rig() -> Iterator[RayRig]:
    r = RayRig()
    try:
        r.start_ray()
        r.start_launcher()
        yield r
    finally:
        r.close()
        print("timings:", json.dumps({k: round(v, 1) for k, v in r.times.items()}))


def _replay(rig: RayRig, url: str, seed: int) -> dict[str, Any]:
    trace = rig.tmp / f"trace-{seed}.jsonl"
    rows = [
        {
            "timestamp": 100 * i,
            "input_length": 1200,
            "output_length": 4,
            "hash_ids": [seed, seed + 1, 1000 + 10 * seed + i],
        }
        for i in range(8)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = rig.tmp / f"summary-{seed}.json"
    cmd = [sys.executable, "-m", "launch", "replay", "--trace", str(trace), "--url", url]
    cmd += ["--summary-json", str(summary), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(json.loads(summary.read_text()))


async def _state(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(url + "/router/state") as r,
    ):
        return dict(await r.json())


async def _snapshot_blocks(endpoint: str) -> int:
    ctx = zmq.asyncio.Context()
    try:
        snap = await fetch_snapshot(ctx, endpoint, 5.0)
    finally:
        ctx.destroy(linger=0)
    return len({h for ev in snap.events for h in getattr(ev, "block_hashes", ())})


async def _wait_exact(rig: RayRig, timeout: float = 60.0) -> dict[str, int]:
    """Until the router's per-instance block counts equal the agents' snapshots (and nothing is
    speculative); returns the counts."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        agents = {p["instance"]: p["endpoints"]["snapshot"] for p in rig.procs("agent")}
        try:
            st = await _state(rig.info()["router"])
            snaps = {i: await _snapshot_blocks(ep) for i, ep in agents.items()}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, Exception) as exc:  # retried
            last = repr(exc)
            await asyncio.sleep(0.5)
            continue
        insts = {x["name"]: x for x in st["instances"]}
        got = {i: insts[i]["blocks"] for i in agents if i in insts}
        last = (got, snaps, {i: (x["synced"], x["speculative_blocks"]) for i, x in insts.items()})
        if got == snaps and all(x["synced"] and x["speculative_blocks"] == 0 for x in insts.values()):
            return snaps
        await asyncio.sleep(0.5)
    raise AssertionError(f"router index and agent snapshots disagree: {last}")


def test_placement_follows_the_nodes_resources(rig: RayRig) -> None:
    engines, agents = rig.procs("engine"), rig.procs("agent")
    assert len(engines) == 2 and len(agents) == 2
    by_inst = {e["instance"]: e["endpoints"]["node"] for e in engines}
    assert sorted(by_inst.values()) == [W0, W1], "one instance per lmr-engine node"
    for p in engines + agents:
        node = p["endpoints"]["node"]
        assert p["endpoints"]["ray_node_id"] == rig.nodes[node].node_id
        # every endpoint is advertised with its node's address
        assert all(
            f"//{node}:" in v for k, v in p["endpoints"].items() if k not in ("node", "ray_node_id", "engine")
        )
        if p["role"] == "agent":
            assert by_inst[p["instance"]] == node, "the agent runs beside its engine"
    (primary,), (standby,) = rig.procs("router-primary"), rig.procs("router-standby")
    assert primary["endpoints"]["node"] == HEAD and standby["endpoints"]["node"] == W0
    assert rig.info()["router"].startswith(f"http://{HEAD}:")
    (metrics,) = rig.procs("metrics")
    assert metrics["endpoints"]["node"] == HEAD  # the launcher's node


def test_replay_and_tail_through_the_router(rig: RayRig) -> None:
    tail = subprocess.Popen(
        [sys.executable, "-m", "launch", "tail", "--cluster", str(rig.cfile), "--json", "--timeout", "90"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(1.0)
    t = time.monotonic()
    s = _replay(rig, rig.info()["router"], seed=1)
    rig.times["replay_8_requests"] = time.monotonic() - t
    assert s["requests"] == 8 and s["failed"] == 0
    assert s["hit_ratio"] > 0.3
    time.sleep(0.5)
    tail.send_signal(signal.SIGINT)
    lines = tail.communicate(timeout=30)[0].splitlines()
    types = {json.loads(x)["type"] for x in lines if x.startswith("{")}
    assert {"BlockStored", "load"} <= types, types
    counts = asyncio.run(_wait_exact(rig))
    assert sum(counts.values()) > 0


def test_a_killed_node_rejoins_with_an_exact_index(rig: RayRig) -> None:
    victim = next(e for e in rig.procs("engine") if e["endpoints"]["node"] == W1)
    inst = victim["instance"]
    agent = next(a for a in rig.procs("agent") if a["instance"] == inst)
    old_epoch = next(x for x in asyncio.run(_state(rig.info()["router"]))["instances"] if x["name"] == inst)[
        "agent_epoch"
    ]
    t = time.monotonic()
    for pid in (victim["pid"], agent["pid"]):
        os.kill(pid, signal.SIGKILL)

    async def back() -> dict[str, Any]:
        deadline = time.monotonic() + 120
        saw_down = False
        while time.monotonic() < deadline:
            with_state = await _state(rig.info()["router"])
            x = next(x for x in with_state["instances"] if x["name"] == inst)
            saw_down = saw_down or not x["up"]
            if x["agent_epoch"] != old_epoch and x["up"] and x["synced"]:
                return {"saw_down": saw_down, **x}
            await asyncio.sleep(0.1)
        raise AssertionError("instance did not come back:\n" + rig.log_tail())

    x = asyncio.run(back())
    rig.times["kill_to_rejoined"] = time.monotonic() - t
    new_engine = next(e for e in rig.procs("engine") if e["instance"] == inst)
    new_agent = next(a for a in rig.procs("agent") if a["instance"] == inst)
    assert new_engine["pid"] != victim["pid"] and new_engine["endpoints"]["node"] == W1
    assert new_agent["endpoints"]["pub"] == agent["endpoints"]["pub"], "the agent is back on its old ports"
    assert x["saw_down"] or x["agent_epoch"] != old_epoch
    asyncio.run(_wait_exact(rig))
    s = _replay(rig, rig.info()["router"], seed=3)
    assert s["requests"] == 8 and s["failed"] == 0
    counts = asyncio.run(_wait_exact(rig))
    assert counts[inst] >= 0 and sum(counts.values()) > 0


def test_a_lost_node_comes_back_through_its_bundle(rig: RayRig) -> None:
    """The whole node goes (raylet, host actor and all): its bundle is placed again when a node with the
    same resources joins, a new host actor starts the pair there, and the index is exact again."""
    inst = next(e for e in rig.procs("engine") if e["endpoints"]["node"] == W1)["instance"]
    agent = next(a for a in rig.procs("agent") if a["instance"] == inst)
    t = time.monotonic()
    rig.ray.remove_node(rig.nodes[W1], allow_graceful=False)
    time.sleep(2.0)
    rig.nodes[W1] = rig.ray.add_node(
        object_store_memory=OBJECT_STORE,
        num_cpus=2,
        node_ip_address=W1,
        resources={"lmr-w1": 1, "lmr-engine": 1},
    )

    def back() -> bool:  # engine and agent running on the node that joined
        here = [p for r in ("engine", "agent") for p in rig.procs(r) if p["instance"] == inst]
        return len(here) == 2 and all(p["endpoints"]["ray_node_id"] == rig.nodes[W1].node_id for p in here)

    deadline = time.monotonic() + 180
    while not back() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert back(), "the pair did not come back on the new node:\n" + rig.log_tail()
    rig.times["node_removed_to_pair_back"] = time.monotonic() - t
    new_agent = next(a for a in rig.procs("agent") if a["instance"] == inst)
    assert new_agent["endpoints"]["pub"] == agent["endpoints"]["pub"]
    asyncio.run(_wait_exact(rig, timeout=90))
    rig.times["node_removed_to_exact"] = time.monotonic() - t
    s = _replay(rig, rig.info()["router"], seed=5)
    assert s["requests"] == 8 and s["failed"] == 0
    asyncio.run(_wait_exact(rig))


def test_primary_router_killed_standby_takes_over_on_its_node(rig: RayRig) -> None:
    """The standby (on W0) takes over; the cluster file's router URL moves to its node; the new standby
    goes on the other router node (the head), never beside the new primary; requests still flow."""
    (primary,), (standby,) = rig.procs("router-primary"), rig.procs("router-standby")
    t = time.monotonic()
    os.kill(primary["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        info = rig.info()
        prim = [p for p in info["processes"] if p["role"] == "router-primary" and p["status"] == "running"]
        stby = [p for p in info["processes"] if p["role"] == "router-standby" and p["status"] == "running"]
        if prim and prim[0]["pid"] == standby["pid"] and stby and info["router"].startswith(f"http://{W0}:"):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no takeover:\n" + json.dumps(rig.info(), indent=1) + rig.log_tail())
    rig.times["primary_killed_to_new_pair"] = time.monotonic() - t
    assert stby[0]["endpoints"]["node"] == HEAD != prim[0]["endpoints"]["node"]
    s = _replay(rig, rig.info()["router"], seed=7)
    assert s["requests"] == 8 and s["failed"] == 0
    asyncio.run(_wait_exact(rig))


def test_sigint_stops_everything(rig: RayRig) -> None:
    pids = [p["pid"] for p in rig.info()["processes"] if p["pid"] and p["status"] == "running"]
    assert rig.proc is not None
    rig.proc.send_signal(signal.SIGINT)
    assert rig.proc.wait(90) == 0
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "processes left behind"
    assert not rig.cfile.exists()
