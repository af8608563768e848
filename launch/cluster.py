"""``python -m launch cluster``: the whole cluster on one machine.

Starts N emulated SGLang engines, one agent per engine, the primary router, a hot-standby router and the
metrics daemon; waits until each process prints its READY line (engines first, then agents, then the
routers, then the daemon, since each needs the previous ones' endpoints); writes the cluster file; prints
every endpoint; and on SIGINT or SIGTERM stops everything in reverse order, leaving no process behind.
Internal ports are OS-assigned; only the router's port is fixed (``--port``, default 30000; with 0 the
primary's OS-assigned port is given to every later router).

Failover: when the primary router exits, the standby takes its port over (see ``router/ha.py``); the
launcher notices, relabels the processes in the cluster file (the old primary ``router-failed``, the
standby ``router-primary``) and starts a new standby following the new primary. A standby that exits is
replaced too. ``--no-standby`` runs the primary alone, ``--no-metrics`` skips the daemon.

Active-active (``--routers K``, K > 1): K routers with ``--role active`` (:mod:`router.active`) instead of
the primary/standby pair, on ports ``--port``, ``--port + 1``, ... (all OS-assigned with ``--port 0``),
each following the other K - 1 routers' decision streams (on ports picked free before they start, so
that every router can be told every other's) and every agent. Put them behind one Service or load
balancer, or spread requests over them (``launch replay --url A,B,...``). A router that exits is
restarted on the same ports; the others reconnect to it.

The cluster file (``--cluster-file``, default ``cluster.json``; its format and reader are
:mod:`kvindex.protocol.cluster_file`) is rewritten whenever a process changes state and removed on a clean
shutdown; ``router`` is set once the whole cluster is ready (with ``--routers K``, the first router's URL;
``routers`` lists all K). ``launch tail`` and the metrics daemon read it.

Keys (``--api-key``, ``--admin-key``, ``--metrics-key``; docs/security.md): handed to both routers and the
metrics daemon as :mod:`launch.keys` says (files by path, keys by environment, never on a command line);
the launcher's own calls to a router's admin port send the admin key. No key: everything open, as before.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvindex.curve import ClusterKeys, generate_cluster_keys
from kvindex.protocol.cluster_file import ClusterFile, ProcessEntry
from launch.keys import AuthConfigError, ClusterAuth
from launch.placement import RayOptions, add_ray_arguments, ray_options_from_args
from launch.procs import Child, ChildFailed, stop_all
from launch.sglang_engines import (
    LOAD_MODES,
    SGLANG_MODULE,
    allocate_ports,
    free_ports,
    parse_gpus,
    server_args,
)
from router.model.policies import POLICIES, add_param_arguments, param_args, params_from_namespace

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
    standby: bool = True
    routers: int = 1
    decision_slot: float = 0.0
    primary_timeout: float = 0.4
    metrics: bool = True
    metrics_port: int = 0
    engine: str = "sim"
    model_path: str | None = None
    gpus: tuple[str, ...] = ()
    attach: tuple[str, ...] = ()
    sglang_args: tuple[str, ...] = ()
    engine_ready_timeout: float = 1200.0
    sglang_module: str = SGLANG_MODULE
    policy_params: tuple[tuple[str, str, float], ...] = ()
    curve: bool = False
    sglang_load_stream: str = "wildcard"
    ray: RayOptions | None = None  # --ray: every process on a Ray cluster (launch/ray_cluster.py)
    auth: ClusterAuth = field(default_factory=ClusterAuth)  # --api-key/--admin-key/--metrics-key specs
    engine_ca_file: str | None = None  # CA of HTTPS engines (--attach https://...), for agents and routers


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
        "--policy",
        default=d.policy,
        help="routing policy, one of router.model.policies.POLICIES (default %(default)s)",
    )
    add_param_arguments(p)  # --POLICY-PARAM: passed on to the routers when not the default
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
    p.add_argument(
        "--no-standby",
        dest="standby",
        action="store_false",
        help="run the primary router alone, without a hot standby",
    )
    p.add_argument(
        "--routers",
        type=int,
        default=d.routers,
        metavar="K",
        help="K > 1: run K active routers (on --port, --port + 1, ...; no standby), each following every "
        "agent and the other routers' decision streams, so each counts the others' dispatches as pending "
        "(docs/scale.md; default %(default)s: a primary and its standby)",
    )
    p.add_argument(
        "--decision-slot",
        type=float,
        default=d.decision_slot,
        metavar="S",
        help="with --routers K > 1: the routers take turns to decide, each in the first half of its own "
        "S-second slot (python -m router --decision-slot; 0 = off, default %(default)s)",
    )
    p.add_argument(
        "--primary-timeout",
        type=float,
        default=d.primary_timeout,
        help="the standby takes over after this many seconds without the primary's heartbeat, or at "
        "once when the primary's decision stream disconnects (default %(default)s)",
    )
    p.add_argument(
        "--no-metrics", dest="metrics", action="store_false", help="do not start the metrics daemon"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="the metrics daemon's HTTP port; 0 = OS-assigned (default %(default)s)",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="encrypt and authenticate every cluster ZeroMQ stream with CURVE: keys are made under "
        "LOG_DIR/curve (secrets 0600), each process gets its own by environment (docs/security.md)",
    )
    _add_key_arguments(p)
    _add_engine_arguments(p)
    add_ray_arguments(p)


def _add_key_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "keys (docs/security.md)",
        "KEY is file:PATH (one key a line), env:NAME (comma-separated keys) or the key itself (visible in ps: "
        "prefer a file). Repeat a flag to accept several keys. Both routers and the metrics daemon get them "
        "by file or environment, never on their command line. Default: no key, every endpoint open.",
    )
    key = {"action": "append", "default": [], "metavar": "KEY"}
    g.add_argument("--api-key", dest="api_keys", **key, help="generation endpoints and /v1/models")  # type: ignore[arg-type]
    g.add_argument(
        "--admin-key", dest="admin_keys", **key,  # type: ignore[arg-type]
        help="/router/* on the routers (default: the API keys); the launcher sends it to check a takeover",
    )  # fmt: skip
    g.add_argument(
        "--metrics-key", dest="metrics_keys", **key,  # type: ignore[arg-type]
        help="/metrics on the routers and the metrics daemon (default: the admin keys, else the API keys)",
    )  # fmt: skip


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "real SGLang engines",
        "--engine sglang starts one `python -m sglang.launch_server` per GPU (install the `sglang` extra on the GPU "
        "machine); --attach uses servers that already run. Arguments after `--` go to every SGLang server.",
    )
    g.add_argument(
        "--engine",
        choices=("sim", "sglang"),
        default="sim",
        help="emulated engines (sim, default) or real SGLang servers",
    )
    g.add_argument(
        "--model-path",
        default=None,
        help="model directory for --engine sglang; its tokenizer.json and chat template also serve the router",
    )
    g.add_argument(
        "--gpus",
        default=None,
        help="comma-separated GPU indices, one server each (default: 0..N-1 for --instances N)",
    )
    g.add_argument(
        "--attach",
        nargs="+",
        default=[],
        metavar="URL",
        help="attach agents to these running SGLang servers instead of starting engines",
    )
    g.add_argument(
        "--engine-ca-file",
        default=None,
        metavar="PEM",
        help="CA bundle that signed HTTPS engines' certificates (--attach https://...; SGLang --ssl-certfile), "
        "given to every agent and router (default: the system CAs)",
    )
    g.add_argument(
        "--engine-ready-timeout",
        type=float,
        default=1200.0,
        help="seconds a real server has to load its model and answer /health (default %(default)s)",
    )
    g.add_argument(
        "--sglang-load-stream",
        choices=LOAD_MODES,
        default="wildcard",
        help="SGLang 0.5.23 binds its LoadStat stream (counts, no prompts) only on every interface: "
        "'wildcard' does so, 'off' runs without it (no LoadReports; default %(default)s)",
    )
    g.add_argument(
        "--sglang-module", default=SGLANG_MODULE, help=argparse.SUPPRESS
    )  # tests point this at the emulated engine
    g.add_argument("sglang_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def config_from_args(a: argparse.Namespace) -> ClusterConfig:
    """Validate the parsed flags into a :class:`ClusterConfig`; exits with a usage error if invalid."""
    if a.instances < 1:
        sys.exit("launch cluster: error: --instances must be at least 1")
    if not a.primary_timeout > 0:
        sys.exit("launch cluster: error: --primary-timeout must be positive")
    if a.routers < 1:
        sys.exit("launch cluster: error: --routers must be at least 1")
    if a.decision_slot < 0 or (a.decision_slot > 0 and a.routers == 1):
        sys.exit("launch cluster: error: --decision-slot must be >= 0, and needs --routers > 1")
    if a.policy not in POLICIES:
        sys.exit(f"launch cluster: error: unknown --policy {a.policy!r} ({', '.join(sorted(POLICIES))})")
    try:
        policy_params = params_from_namespace(a)
    except ValueError as exc:
        sys.exit(f"launch cluster: error: {exc}")
    extra = tuple(a.sglang_args[1:] if a.sglang_args[:1] == ["--"] else a.sglang_args)
    if extra and a.engine != "sglang":
        sys.exit(
            f"launch cluster: error: unexpected arguments {' '.join(extra)!r} (extra SGLang arguments need --engine sglang)"
        )
    if a.engine == "sglang" and not a.attach and not a.model_path:
        sys.exit("launch cluster: error: --engine sglang needs --model-path (or --attach URL ...)")
    try:
        gpus = tuple(parse_gpus(a.gpus, a.instances)) if a.engine == "sglang" and not a.attach else ()
    except ValueError as exc:
        sys.exit(f"launch cluster: error: {exc}")
    ray = ray_options_from_args(a)
    auth = ClusterAuth(tuple(a.api_keys), tuple(a.admin_keys), tuple(a.metrics_keys))
    try:
        auth.check()
    except AuthConfigError as exc:
        sys.exit(f"launch cluster: error: {exc}")
    if ray is not None and a.routers > 1:
        sys.exit("launch cluster: error: --ray runs a primary/standby pair; --routers > 1 is one machine's")
    if ray is not None and a.attach:
        sys.exit("launch cluster: error: --ray starts its engines; it does not take --attach")
    tokenizer = a.tokenizer
    if (
        tokenizer is None
        and a.engine == "sglang"
        and a.model_path
        and (Path(a.model_path) / "tokenizer.json").is_file()
    ):
        tokenizer = a.model_path  # the model's own tokenizer and chat template
    return ClusterConfig(
        engine=a.engine,
        model_path=a.model_path,
        gpus=gpus,
        attach=tuple(u.rstrip("/") for u in a.attach),
        sglang_args=extra,
        engine_ready_timeout=a.engine_ready_timeout,
        sglang_module=a.sglang_module,
        instances=len(a.attach) or (len(gpus) if gpus else a.instances),
        host=a.host,
        port=a.port,
        policy=a.policy,
        policy_params=policy_params,
        cluster_file=a.cluster_file,
        log_dir=a.log_dir,
        profile=a.profile,
        model_name=a.model_name,
        page_size=a.page_size,
        max_total_tokens=a.max_total_tokens,
        max_running_requests=a.max_running_requests,
        time_scale=a.time_scale,
        tokenizer=tokenizer,
        ready_timeout=a.ready_timeout,
        standby=a.standby,
        routers=a.routers,
        decision_slot=a.decision_slot,
        primary_timeout=a.primary_timeout,
        metrics=a.metrics,
        metrics_port=a.metrics_port,
        curve=a.curve,
        sglang_load_stream=a.sglang_load_stream,
        ray=ray,
        auth=auth,
        engine_ca_file=str(Path(a.engine_ca_file).absolute()) if a.engine_ca_file else None,
    )


class Cluster:
    """The running cluster: its children, the routers' roles and the cluster file."""

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

    async def start(self) -> None:
        """Start engines, agents, the routers and the metrics daemon, each stage waiting for READY.

        Raises:
            ChildFailed: a process exited or timed out before it was ready (the caller stops the rest).
        """
        cfg = self.cfg
        engine_urls = await self._start_engines()
        agents = []
        ca = ["--engine-ca-file", cfg.engine_ca_file] if cfg.engine_ca_file else []
        for inst, url in engine_urls:
            agents.append(
                self._child(
                    "agent",
                    inst,
                    "agents.agent",
                    ["--engine-url", url, "--instance-id", inst, "--host", cfg.host, *ca],
                )
            )
        await self._start_stage(agents)
        await self._start_rest(agents)

    async def _start_engines(self) -> list[tuple[str, str]]:
        """Start (or, with ``--attach``, just name) the engines; ``(instance, HTTP URL)`` each.

        Raises:
            ChildFailed: an engine exited or timed out before it was ready.
        """
        cfg = self.cfg
        if cfg.attach:
            return [(str(i), url) for i, url in enumerate(cfg.attach)]
        if cfg.engine == "sglang":
            return await self._start_sglang()
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
        return [(str(e.instance), e.ready.endpoints["http"]) for e in engines if e.ready is not None]

    async def _start_sglang(self) -> list[tuple[str, str]]:
        """One SGLang server per GPU (``CUDA_VISIBLE_DEVICES`` pinned), ready once ``/health`` answers 200."""
        cfg = self.cfg
        assert cfg.model_path is not None
        engines: list[tuple[Child, dict[str, str]]] = []
        for i, gpu in enumerate(cfg.gpus):
            ports = allocate_ports(cfg.host)
            args = server_args(
                cfg.model_path, cfg.host, ports, cfg.page_size, cfg.sglang_args, cfg.sglang_load_stream
            )
            c = self._child("engine", str(i), cfg.sglang_module, args)
            c.env["CUDA_VISIBLE_DEVICES"] = gpu
            eps = {
                "http": f"http://{cfg.host}:{ports.http}",
                "kv": f"tcp://{cfg.host}:{ports.kv}",
                "replay": f"tcp://{cfg.host}:{ports.replay}",
                "load": f"tcp://{cfg.host}:{ports.load}",
                "gpu": gpu,
            }
            engines.append((c, eps))
        for c, _ in engines:
            await c.start()
        await asyncio.gather(
            *(c.wait_http_ready(eps["http"] + "/health", eps, cfg.engine_ready_timeout) for c, eps in engines)
        )
        self.write_cluster_file()
        return [(str(c.instance), eps["http"]) for c, eps in engines]

    async def _start_rest(self, agents: list[Child]) -> None:
        """Routers and the metrics daemon, once the agents are ready."""
        cfg = self.cfg
        for a in agents:
            assert a.ready is not None
            self._agents.append(a.ready.endpoints["pub"])

        if cfg.routers > 1:
            await self._start_actives()
        else:
            self.primary = await self._start_router("primary")
            assert self.primary.ready is not None
            self._router_port = int(self.primary.ready.endpoints["http"].rsplit(":", 1)[1])
            if cfg.standby:
                self.standby = await self._start_router("standby")
        if cfg.metrics:
            margs = [
                "--host",
                cfg.host,
                "--port",
                str(cfg.metrics_port),
                "--cluster-file",
                str(cfg.cluster_file),
            ]
            margs += [x for ep in self._agents for x in ("--agent", ep)]
            margs += [
                x
                for r in (self.primary, self.standby, *self.actives)
                if r and r.ready
                for x in ("--decisions", r.ready.endpoints["decisions"])
            ]
            mkeys = cfg.auth.for_metrics(by_value=self.keys_by_value)
            daemon = self._child("metrics", None, "router.metricsd", [*margs, *mkeys.args])
            daemon.env.update(mkeys.env)
            await self._start_stage([daemon])
            assert daemon.ready is not None
            self.metrics_url = daemon.ready.endpoints["http"]
        first = self.actives[0] if self.actives else self.primary
        assert first is not None and first.ready is not None
        self.router_url = first.ready.endpoints["http"]
        self.write_cluster_file()

    async def _start_actives(self) -> None:
        """K active routers, each told the other K - 1 decision streams (ports picked free first)."""
        cfg = self.cfg
        decisions = free_ports(cfg.routers, cfg.host)
        http = [cfg.port + i if cfg.port else 0 for i in range(cfg.routers)]
        self._active_ports = list(zip(http, decisions, strict=True))
        self.actives = [self._active_child(i) for i in range(cfg.routers)]
        await self._start_stage(self.actives)
        for i, c in enumerate(self.actives):  # keep an OS-assigned HTTP port across a restart
            assert c.ready is not None
            self._active_ports[i] = (int(c.ready.endpoints["http"].rsplit(":", 1)[1]), decisions[i])

    def _active_child(self, i: int) -> Child:
        n = self._routers_started
        self._routers_started += 1
        c = Child(
            "router-active",
            str(i),
            ["-m", "router", *self._router_args("active", i)],
            self.cfg.log_dir / f"router-{n}.log",
        )
        self._arm(c, f"router-{n % 64}", server=True)
        c.env.update(self.router_env())  # the keys, as for a primary (launch.keys)
        self.children.append(c)
        return c

    def router_urls(self) -> list[str]:
        """Every serving router's HTTP URL: the K active routers, or the primary."""
        rs = self.actives or ([self.primary] if self.primary is not None else [])
        return [r.ready.endpoints["http"] for r in rs if r.ready is not None and r.alive]

    def _router_args(self, role: str, active: int = 0) -> list[str]:
        cfg = self.cfg
        port = self._router_port
        decisions = "0"
        if role == "active":
            port, dport = self._active_ports[active]
            decisions = str(dport)
            peers = [f"tcp://{cfg.host}:{d}" for j, (_, d) in enumerate(self._active_ports) if j != active]
        args = ["--role", role, "--host", cfg.host, "--port", str(port), "--policy", cfg.policy]
        args += param_args(cfg.policy_params)
        args += [
            "--decisions-port",
            decisions,
            "--admin-port",
            "0",
            "--primary-timeout",
            str(cfg.primary_timeout),
        ]
        if role == "active":
            args += [x for ep in peers for x in ("--peer-routers", ep)]
            if cfg.decision_slot > 0:
                args += ["--decision-slot", str(cfg.decision_slot), "--slot-index", str(active)]
        args += ["--exit-when-fenced"]
        args += [x for ep in self._agents for x in ("--agent", ep)]
        if role == "standby":
            assert self.primary is not None and self.primary.ready is not None
            args += ["--primary-decisions", self.primary.ready.endpoints["decisions"]]
        if cfg.tokenizer:
            args += ["--tokenizer", cfg.tokenizer]
        if cfg.engine_ca_file:
            args += ["--engine-ca-file", cfg.engine_ca_file]
        return args + list(cfg.auth.for_router(by_value=self.keys_by_value).args)

    def router_env(self) -> dict[str, str]:
        """The variables that carry a router's keys (:mod:`launch.keys`); empty without keys."""
        return self.cfg.auth.for_router(by_value=self.keys_by_value).env

    async def _start_router(self, role: str) -> Child:
        """Start one router (``primary`` or ``standby`` of the current primary) and wait for READY."""
        n = self._routers_started
        self._routers_started += 1
        c = Child(
            f"router-{role}",
            None,
            ["-m", "router", *self._router_args(role)],
            self.cfg.log_dir / f"router-{n}.log",
        )
        self._arm(c, f"router-{n % 64}", server=True)
        c.env.update(self.router_env())
        self.children.append(c)
        await self._start_stage([c])
        return c

    async def _start_stage(self, stage: Sequence[Child]) -> None:
        for c in stage:
            await c.start()
        await asyncio.gather(*(c.wait_ready(self.cfg.ready_timeout) for c in stage))
        self.write_cluster_file()

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

    async def watch(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: notice children that exit, report them, keep the cluster file current,
        and keep a primary and a standby router running (:meth:`_replace_routers`)."""
        reported: set[int] = set()
        while not stop.is_set():
            for c in self.children:
                if not c.alive and id(c) not in reported:
                    reported.add(id(c))
                    code = c.proc.returncode if c.proc else None
                    log.error("%s exited unexpectedly with code %s (log: %s)", c.name, code, c.log_path)
                    if c is self.primary:
                        c.role = "router-failed"
                        self.primary = None
                    elif c is self.standby:
                        c.role = "router-failed"
                        self.standby = None
                    elif any(c is a for a in self.actives):
                        c.role = "router-failed"
                        self._restarts.append(next(i for i, a in enumerate(self.actives) if a is c))
                    self.write_cluster_file()
            if self._restarts and self._failover is None:
                self._failover = asyncio.create_task(
                    self._restart_active(self._restarts.pop(0)), name="restart"
                )
            lacking = self.primary is None or self.standby is None
            if (
                self.router_url
                and self.cfg.standby
                and not self.actives
                and self._failover is None
                and lacking
            ):
                self._failover = asyncio.create_task(self._replace_routers(), name="failover")
            if self._failover is not None and self._failover.done():
                with contextlib.suppress(Exception):
                    self._failover.result()
                self._failover = None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    async def _restart_active(self, i: int) -> None:
        """Start active router ``i`` again on its ports (its peers reconnect to its decision stream)."""
        try:
            c = self.actives[i] = self._active_child(i)
            await self._start_stage([c])
            log.warning("active router %d restarted (pid %s)", i, c.pid)
        except ChildFailed as exc:
            log.error("could not restart active router %d: %s", i, exc)
            self._restarts.append(i)
            await asyncio.sleep(1.0)
        self.write_cluster_file()

    async def _replace_routers(self) -> None:
        """After a router exited: wait for the standby to take over (or start a new primary if there is
        none), then start a new standby following the primary."""
        try:
            if self.primary is None:
                st = self.standby
                if st is not None and await self._wait_promoted(st):
                    st.role = "router-primary"
                    self.primary, self.standby = st, None
                    log.warning("standby %s (pid %s) took over as the primary", st.log_path.name, st.pid)
                else:
                    if st is not None:  # alive but not taking over: it cannot be trusted to follow
                        log.error("standby did not take over; starting a new primary")
                        await st.stop()
                        st.role = "router-failed"
                        self.standby = None
                    self.primary = await self._start_router("primary")
                self.write_cluster_file()
            if self.standby is None:
                self.standby = await self._start_router("standby")
                log.warning(
                    "new standby %s (pid %s) follows the primary",
                    self.standby.log_path.name,
                    self.standby.pid,
                )
                self.write_cluster_file()
        except ChildFailed as exc:
            log.error("could not restore the router pair: %s", exc)
            await asyncio.sleep(1.0)  # then the watch loop tries again

    async def _wait_promoted(self, standby: Child, timeout: float = 10.0) -> bool:
        """Whether ``standby`` reports role ``primary`` on its admin port within ``timeout`` seconds."""
        if standby.ready is None or "admin" not in standby.ready.endpoints:
            return False
        url = standby.ready.endpoints["admin"] + "/router/state"
        deadline = time.monotonic() + timeout
        key = self.cfg.auth.client_key("admin")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0), headers=headers) as s:
            while time.monotonic() < deadline and standby.alive:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                    async with s.get(url) as r:
                        if (await r.json())["ha"]["role"] == "primary":
                            return True
                await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        """Stop every child (reverse order: standbys before their primary) and remove the cluster file."""
        if self._failover is not None:
            self._failover.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._failover
        await stop_all(self.children)
        with contextlib.suppress(FileNotFoundError):
            self.cfg.cluster_file.unlink()


async def run_cluster(cfg: ClusterConfig, cluster: Cluster | None = None) -> int:
    """Run ``cluster`` (default: this machine's :class:`Cluster` of ``cfg``; ``launch.ray_cluster`` passes
    its own) until SIGINT/SIGTERM. Returns the process exit code (0 on a clean stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = cluster if cluster is not None else Cluster(cfg)
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
