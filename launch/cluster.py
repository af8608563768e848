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

Several processes (``--workers N``, N > 1): the primary runs as ``python -m router --workers N``, N
processes on its one port (:mod:`router.workers`); the standby stays one process, follows the first
worker's decision stream and takes over once every worker is gone. The metrics daemon follows every
worker's stream.

The cluster file (``--cluster-file``, default ``cluster.json``; its format and reader are
:mod:`kvindex.protocol.cluster_file`) is rewritten whenever a process changes state and removed on a clean
shutdown; ``router`` is set once the whole cluster is ready (with ``--routers K``, the first router's URL;
``routers`` lists all K). ``launch tail`` and the metrics daemon read it.

Keys (``--api-key``, ``--admin-key``, ``--metrics-key``; docs/security.md): handed to both routers and the
metrics daemon as :mod:`launch.keys` says (files by path, keys by environment, never on a command line);
the launcher's own calls to a router's admin port send the admin key. No key: everything open, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from launch.cluster_config import ClusterConfig
from launch.cluster_routers import ClusterRouters
from launch.procs import Child, ChildFailed, stop_all
from launch.sglang_engines import allocate_ports, server_args


class Cluster(ClusterRouters):
    """The running cluster: its children, the routers' roles and the cluster file. Its fields and reports
    are :class:`~launch.cluster_state.ClusterState`'s, its routers
    :class:`~launch.cluster_routers.ClusterRouters`'s; here: starting the engines, agents, routers and the
    metrics daemon in stages, and stopping them."""

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
                for ep in r.ready.endpoints.get("decisions_all", r.ready.endpoints["decisions"]).split(",")
                for x in ("--decisions", ep)
            ]  # a primary with --workers N: every worker's stream
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
