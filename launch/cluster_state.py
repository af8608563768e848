"""A launched cluster's children and what is reported of them (:class:`ClusterState`, the base of
:class:`launch.cluster.Cluster`): its fields, how a child is made (log file, CURVE keys) and a stage of
children started until READY, and the reports: the serving routers' URLs, the cluster file
(:mod:`kvindex.protocol.cluster_file`, rewritten atomically) and the table printed once it is ready."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from kvindex.curve import ClusterKeys, generate_cluster_keys
from kvindex.protocol.cluster_file import ClusterFile, ProcessEntry
from launch.cluster_config import ClusterConfig
from launch.procs import Child


class ClusterState:
    """The running cluster's children, the routers' roles and the cluster file."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.children: list[Child] = []
        self.router_url: str | None = None
        self.metrics_url: str | None = None
        self.primary: Child | None = None
        self.standby: Child | None = None
        self.actives: list[Child] = []
        """With ``--routers K`` > 1: the K active routers, in port order (a restarted one replaces its
        predecessor here)."""
        self._active_ports: list[tuple[int, int]] = []  # (HTTP port, decisions port) per active router
        self._agents: list[str] = []
        self._router_port = cfg.port
        self._routers_started = 0
        self._failover: asyncio.Task[None] | None = None
        self._restarts: list[int] = []  # active routers that exited, to restart
        self.keys: ClusterKeys | None = None
        self.keys_by_value = False
        """Whether children get every key by value in their environment (they do not share this machine's
        files and variables: ``--ray``)."""
        if cfg.curve:
            names = [f"agent-{i}" for i in range(cfg.instances)] + [f"router-{i}" for i in range(64)]
            self.keys = generate_cluster_keys(cfg.log_dir / "curve", [*names, "metrics", "tail"])

    def _child(self, role: str, instance: str | None, module: str, args: Sequence[str]) -> Child:
        stem = role if instance is None else f"{role}-{instance}"
        c = Child(role, instance, ["-m", module, *args], self.cfg.log_dir / f"{stem}.log")
        self._arm(c, stem, server=role == "agent")
        self.children.append(c)
        return c

    def _arm(self, c: Child, name: str, *, server: bool) -> None:
        """With ``--curve``: the child's own key and the cluster's, by environment (engines speak
        SGLang's protocol, which has no CURVE)."""
        if self.keys is not None and c.role != "engine":
            c.env.update(self.keys.env(name, server=server))

    async def _start_stage(self, stage: Sequence[Child]) -> None:
        for c in stage:
            await c.start()
        await asyncio.gather(*(c.wait_ready(self.cfg.ready_timeout) for c in stage))
        self.write_cluster_file()

    def router_urls(self) -> list[str]:
        """Every serving router's HTTP URL: the K active routers, or the primary."""
        rs = self.actives or ([self.primary] if self.primary is not None else [])
        return [r.ready.endpoints["http"] for r in rs if r.ready is not None and r.alive]

    def describe(self) -> dict[str, Any]:
        """The cluster file's content (:mod:`kvindex.protocol.cluster_file`)."""
        procs = tuple(
            ProcessEntry(
                role=c.role,
                instance=c.instance,
                pid=c.pid,
                endpoints=dict(c.ready.endpoints) if c.ready else {},
                log=str(c.log_path),
                status="running" if c.alive and c.ready else ("starting" if c.alive else "exited"),
            )
            for c in self.children
        )
        routers = tuple(self.router_urls()) if self.router_url else ()
        return ClusterFile(self.router_url, self.metrics_url, procs, time.time(), routers).to_json()

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
        lines += [f"cluster file: {self.cfg.cluster_file}", f"logs: {self.cfg.log_dir}/"]
        if self.keys is not None:
            tail_env = " ".join(f"{k}={v}" for k, v in self.keys.env("tail", server=False).items())
            lines.append(f"CURVE keys: {self.keys.root}/ (launch tail needs: {tail_env})")
        if self.cfg.auth.enabled:
            rings = [n for n in ("api", "admin", "metrics") if getattr(self.cfg.auth, n)]
            lines.append(
                f"keys: {', '.join(rings)} set; clients send 'Authorization: Bearer KEY' "
                "(launch replay: --api-key or LMETRIC_API_KEY)"
            )
        if self.metrics_url:
            lines.append(f"metrics: {self.metrics_url}/metrics")
        if len(self.actives) > 1:
            lines.append(f"routers: {' '.join(self.router_urls())}")
        lines.append(f"router: {self.router_url}")
        return "\n".join(lines)
