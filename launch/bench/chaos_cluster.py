"""The live cluster of ``python -m launch chaos-bench`` (and ``overload-bench``): start and stop ``launch
cluster`` in a child process, start a killed engine or agent again on its old ports, and the probes that
read the cluster's state (the primary router's ``/router/state``, an agent's mirror, a process's RSS)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from kvindex.protocol import BlockStored, Snapshot, SnapshotRequest, decode_message, encode_message
from kvindex.protocol.cluster_file import ProcessEntry, read_cluster_file
from launch.cluster_config import ClusterConfig

# ------------------------------------------------------------------------------------------ cluster


async def stop_cluster(proc: asyncio.subprocess.Process, extra: list[asyncio.subprocess.Process]) -> None:
    for p in [*extra, proc]:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGINT)
    for p in [*extra, proc]:
        try:
            await asyncio.wait_for(p.wait(), 60)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()


def cluster_procs(cfile: Path) -> list[ProcessEntry]:
    """The processes the cluster file lists, as it says now."""
    return list(read_cluster_file(cfile).processes)


def _primary_admin(cfile: Path, role: str = "router-primary") -> str | None:
    for p in cluster_procs(cfile):
        if p.role == role and p.status == "running" and "admin" in p.endpoints:
            return p.endpoints["admin"]
    return None


async def restart(entry: ProcessEntry, args: argparse.Namespace, workdir: Path) -> asyncio.subprocess.Process:
    """Start a killed engine or agent again on its old ports."""
    eps = entry.endpoints
    d = ClusterConfig()  # what ``launch cluster`` started it with
    if entry.role == "engine":

        def port(k: str) -> str:
            return eps[k].rsplit(":", 1)[1]

        cmd = [
            "-m", "agents.engine.server", "--host", "127.0.0.1", "--port", port("http"),
            "--kv-events-port", port("kv"), "--kv-replay-port", port("replay"), "--load-port", port("load"),
            "--time-scale", str(args.time_scale), "--profile", d.profile, "--model-name", d.model_name,
            "--page-size", str(d.page_size), "--max-running-requests", str(d.max_running_requests),
        ]  # fmt: skip
    else:
        cmd = [
            "-m", "agents.agent", "--engine-url", eps["engine"], "--instance-id", str(entry.instance),
            "--host", "127.0.0.1", "--pub-port", eps["pub"].rsplit(":", 1)[1],
            "--snapshot-port", eps["snapshot"].rsplit(":", 1)[1],
        ]  # fmt: skip
    log = (workdir / f"restarted-{entry.role}-{entry.instance}-{int(time.time())}.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *cmd, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
    )
    log.close()
    return proc


# ------------------------------------------------------------------------------------------ probes


async def router_state(
    session: aiohttp.ClientSession, cfile: Path, role: str = "router-primary"
) -> dict[str, Any] | None:
    """``GET /router/state`` of the running router of ``role`` (the primary by default), None if none
    answers within 1 s."""
    admin = _primary_admin(cfile, role)
    if admin is None:
        return None
    try:
        async with session.get(admin + "/router/state", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
            return dict(await r.json())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


def routable(state: dict[str, Any], instance: str) -> bool:
    inst = next((i for i in state.get("instances", ()) if i["name"] == instance), None)
    fwd = state.get("forwarding", {}).get(instance, {})
    return (
        bool(inst and inst["routable"])
        and fwd.get("breaker", "closed") == "closed"
        and not fwd.get("stalled")
    )


async def mirror_blocks(ctx: zmq.asyncio.Context, endpoint: str) -> int | None:
    """The agent's mirror size in blocks (a snapshot over its ROUTER socket), None if no answer in 2 s."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([b"", encode_message(SnapshotRequest())])
        if not await sock.poll(2000):
            return None
        frames = await sock.recv_multipart()
        snap = decode_message(frames[-1])
        if not isinstance(snap, Snapshot):
            return None
        return sum(len(ev.block_hashes) for ev in snap.events if isinstance(ev, BlockStored))
    finally:
        sock.close(0)


def router_blocks(state: dict[str, Any], instance: str) -> int | None:
    inst = next((i for i in state.get("instances", ()) if i["name"] == instance), None)
    return None if inst is None else int(inst["blocks"])


def rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None
