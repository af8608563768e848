"""``python -m launch cluster``: the whole cluster on one machine.

Starts N emulated SGLang engines, one agent per engine, and the router; waits until each process prints
its READY line (engines first, then agents, then the router, since each needs the previous one's
endpoints); writes the cluster file; prints every endpoint; and on SIGINT or SIGTERM stops everything in
reverse order, leaving no process behind. Internal ports are OS-assigned; only the router's port is
fixed (``--port``, default 30000).

The cluster file (``--cluster-file``, default ``cluster.json``) is JSON
``{"router": url, "processes": [{"role", "instance", "pid", "endpoints": {...}, "log", "status"}]}``,
rewritten whenever a process changes state and removed on a clean shutdown. ``launch tail`` reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.procs import Child, ChildFailed, stop_all

log = logging.getLogger("launch.cluster")


@dataclass(frozen=True)
class ClusterConfig:
    """What ``launch cluster`` starts. Token counts in tokens, times in seconds."""

    instances: int = 4
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "lmetric"
    cluster_file: Path = Path("cluster.json")
    log_dir: Path = Path("cluster-logs")
    profile: str = "h100-llama3.1-8b"
    model_name: str = "emulated-llama-3.1-8b"
    page_size: int = 16
    max_total_tokens: int | None = None
    max_running_requests: int = 128
    time_scale: float = 1.0
    tokenizer: str | None = None
    ready_timeout: float = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cluster`` subcommand's flags."""
    d = ClusterConfig()
    p.add_argument(
        "--instances", type=int, default=d.instances, help="number of engine instances (default %(default)s)"
    )
    p.add_argument("--host", default=d.host, help="address every process binds (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=d.port, help="router HTTP port; 0 = OS-assigned (default %(default)s)"
    )
    p.add_argument(
        "--policy", default=d.policy, help="routing policy: lmetric or round_robin (default %(default)s)"
    )
    p.add_argument(
        "--cluster-file",
        type=Path,
        default=d.cluster_file,
        help="where to write the endpoints as JSON (default %(default)s)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=d.log_dir,
        help="one log file per process goes here (default %(default)s)",
    )
    p.add_argument(
        "--profile",
        default=d.profile,
        help="emulated engine's GPU+model step-time profile (default %(default)s)",
    )
    p.add_argument(
        "--model-name", default=d.model_name, help="model name the engines serve (default %(default)s)"
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=d.page_size,
        help="KV cache page size in tokens (default %(default)s)",
    )
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="KV cache capacity per engine in tokens (default: from the profile)",
    )
    p.add_argument(
        "--max-running-requests",
        type=int,
        default=d.max_running_requests,
        help="per-engine cap (default %(default)s)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help="multiply modelled step times (<1 runs faster than the GPU would; default %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json (or its directory) for the router; default: built-in byte tokenizer",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=d.ready_timeout,
        help="seconds each process has to become ready (default %(default)s)",
    )


def config_from_args(a: argparse.Namespace) -> ClusterConfig:
    """Validate the parsed flags into a :class:`ClusterConfig`; exits with a usage error if invalid."""
    if a.instances < 1:
        sys.exit("launch cluster: error: --instances must be at least 1")
    if a.policy not in ("lmetric", "round_robin"):
        sys.exit(f"launch cluster: error: unknown --policy {a.policy!r} (lmetric, round_robin)")
    return ClusterConfig(
        instances=a.instances,
        host=a.host,
        port=a.port,
        policy=a.policy,
        cluster_file=a.cluster_file,
        log_dir=a.log_dir,
        profile=a.profile,
        model_name=a.model_name,
        page_size=a.page_size,
        max_total_tokens=a.max_total_tokens,
        max_running_requests=a.max_running_requests,
        time_scale=a.time_scale,
        tokenizer=a.tokenizer,
        ready_timeout=a.ready_timeout,
    )


class Cluster:
    """The running cluster: its children and the cluster file."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.children: list[Child] = []
        self.router_url: str | None = None

    def _child(self, role: str, instance: str | None, module: str, args: Sequence[str]) -> Child:
        stem = role if instance is None else f"{role}-{instance}"
        c = Child(role, instance, ["-m", module, *args], self.cfg.log_dir / f"{stem}.log")
        self.children.append(c)
        return c

    async def start(self) -> None:
        """Start engines, agents and the router, each stage waiting for READY.

        Raises:
            ChildFailed: a process exited or timed out before it was ready (the caller stops the rest).
        """
        cfg = self.cfg
        engines = []
        for i in range(cfg.instances):
            args = [
                "--host", cfg.host, "--port", "0",
                "--profile", cfg.profile, "--model-name", cfg.model_name,
                "--page-size", str(cfg.page_size),
                "--max-running-requests", str(cfg.max_running_requests),
                "--time-scale", str(cfg.time_scale),
            ]  # fmt: skip
            if cfg.max_total_tokens:
                args += ["--max-total-tokens", str(cfg.max_total_tokens)]
            engines.append(self._child("engine", str(i), "agents.engine.server", args))
        await self._start_stage(engines)

        agents = []
        for e in engines:
            assert e.ready is not None
            url = e.ready.endpoints["http"]
            agents.append(
                self._child(
                    "agent",
                    e.instance,
                    "agents.agent",
                    ["--engine-url", url, "--instance-id", str(e.instance), "--host", cfg.host],
                )
            )
        await self._start_stage(agents)

        rargs = ["--host", cfg.host, "--port", str(cfg.port), "--policy", cfg.policy]
        for a in agents:
            assert a.ready is not None
            rargs += ["--agent", a.ready.endpoints["pub"]]
        if cfg.tokenizer:
            rargs += ["--tokenizer", cfg.tokenizer]
        router = self._child("router-primary", None, "router", rargs)
        await self._start_stage([router])
        assert router.ready is not None
        self.router_url = router.ready.endpoints["http"]
        self.write_cluster_file()

    async def _start_stage(self, stage: list[Child]) -> None:
        for c in stage:
            await c.start()
        await asyncio.gather(*(c.wait_ready(self.cfg.ready_timeout) for c in stage))
        self.write_cluster_file()

    def describe(self) -> dict[str, Any]:
        """The cluster file's content."""
        procs = []
        for c in self.children:
            status = "running" if c.alive and c.ready else ("starting" if c.alive else "exited")
            procs.append(
                {
                    "role": c.role,
                    "instance": c.instance,
                    "pid": c.pid,
                    "endpoints": dict(c.ready.endpoints) if c.ready else {},
                    "log": str(c.log_path),
                    "status": status,
                }
            )
        return {"router": self.router_url, "updated_at": time.time(), "processes": procs}

    def write_cluster_file(self) -> None:
        """Atomically (write + rename) rewrite the cluster file."""
        path = self.cfg.cluster_file
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2) + "\n")
        os.replace(tmp, path)

    def table(self) -> str:
        """A human-readable table of every process and endpoint, ending with ``router: URL``."""
        rows = [("role", "instance", "pid", "endpoints")]
        for c in self.children:
            eps = " ".join(f"{k}={v}" for k, v in (c.ready.endpoints.items() if c.ready else []))
            rows.append((c.role, c.instance or "-", str(c.pid), eps))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows]
        lines += [
            f"cluster file: {self.cfg.cluster_file}",
            f"logs: {self.cfg.log_dir}/",
            f"router: {self.router_url}",
        ]
        return "\n".join(lines)

    async def watch(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: notice children that exit, report them and keep the cluster file current."""
        reported: set[str] = set()
        while not stop.is_set():
            for c in self.children:
                if not c.alive and c.name not in reported:
                    reported.add(c.name)
                    code = c.proc.returncode if c.proc else None
                    log.error("%s exited unexpectedly with code %s (log: %s)", c.name, code, c.log_path)
                    self.write_cluster_file()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def stop(self) -> None:
        """Stop every child (reverse order) and remove the cluster file."""
        await stop_all(self.children)
        with contextlib.suppress(FileNotFoundError):
            self.cfg.cluster_file.unlink()


async def run_cluster(cfg: ClusterConfig) -> int:
    """Run the cluster until SIGINT/SIGTERM. Returns the process exit code (0 on a clean stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster(cfg)
    code = 0
    try:
        starting = asyncio.create_task(cluster.start())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()  # raises ChildFailed
            stopper.cancel()
            print(cluster.table(), flush=True)
            print("cluster ready; Ctrl-C stops it", flush=True)
            await cluster.watch(stop)
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChildFailed):
                await starting
    except ChildFailed as exc:
        print(f"launch cluster: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping cluster ...", file=sys.stderr, flush=True)
        await cluster.stop()
        print("cluster stopped", file=sys.stderr, flush=True)
    return code
