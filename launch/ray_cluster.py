"""``python -m launch cluster --ray ADDRESS``: the same cluster, its processes placed on a Ray cluster.

Theory of operation. Nothing about the processes changes: each is still ``python -m MODULE ARGS``
printing one READY line, started by a :class:`~launch.procs.Child`. What changes is *where*: every child
is started by a :class:`NodeHost`, a small async Ray actor that runs on the node Ray placed it on, spawns
its children there (binding that node's address, which is therefore what every endpoint advertises),
and answers ``poll`` / ``stop``. The launcher (the Ray driver) keeps the rest of
:class:`~launch.cluster.Cluster` as it is -- stage order, the router pair, the cluster file, the metrics
daemon, the takeover bookkeeping -- through :class:`RemoteChild`, a ``Child`` whose process lives in a
host actor.

Placement (the plan is pure, :mod:`launch.placement`): one placement group with a bundle per engine +
agent pair (a GPU each with SGLang; one node each with the emulated engine), one host actor per bundle;
each router in its own host actor pinned to a chosen node, the standby never on the primary's node; the
metrics daemon on the launcher's own node (it reads the cluster file the launcher writes).

Failure. A supervisor polls every host twice a second. A pair whose engine or agent exited, or whose
host actor died with its node, is restarted -- in the same actor, or in a new one in the same bundle
once Ray has placed the bundle again -- with the agent on its old ports, so the routers' subscriptions
(``--agent tcp://node:port``) reconnect by themselves: the agent comes back with a new epoch, the routers
resync the instance from its snapshot, exactly as for a restarted agent on one machine. Routers are
handled by the base class (the standby takes over; a new standby is started), except that the router URL
moves to the new primary's node. A pair whose bundle Ray places on a *different* node keeps trying; the
routers only know the old address (documented in docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from launch.cluster import Cluster
from launch.cluster_config import ClusterConfig
from launch.placement import (
    RayNode,
    RayOptions,
    check_instances,
    instance_plan,
    pick_router_node,
    router_candidates,
    router_pair,
)
from launch.procs import Child, ChildFailed
from launch.ray_host import NodeHost, RemoteChild, as_future, first_line, list_nodes, ray_module
from launch.sglang_engines import server_args

log = logging.getLogger("launch.ray")

POLL_INTERVAL = 0.5  # seconds between the supervisor's polls of every host
HOST_CALL_TIMEOUT = 10.0  # a host that does not answer a poll within this is taken for dead


def _with_host(args: list[str], ip: str) -> list[str]:
    """``args`` with the value after ``--host`` replaced by ``ip`` (bind the node's own address)."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a == "--host":
            out[i + 1] = ip
    return out


class RayCluster(Cluster):
    """:class:`Cluster` with every child started by a NodeHost actor on the node the plan chose."""

    def __init__(self, cfg: ClusterConfig) -> None:
        opts = cfg.ray
        assert opts is not None
        # Ray workers run elsewhere (another cwd, another machine): paths the children get are absolute.
        cfg = replace(cfg, cluster_file=cfg.cluster_file.absolute(), log_dir=cfg.log_dir.absolute())
        super().__init__(cfg)
        self.opts: RayOptions = opts
        self.nodes: list[RayNode] = []
        self._pg: Any = None
        self._hosts: dict[str, Any] = {}  # host name -> actor handle
        self._pairs: list[tuple[int, RemoteChild, RemoteChild]] = []  # (bundle, engine, agent)
        self._restarting: dict[str, asyncio.Task[None]] = {}
        self._driver_node: RayNode | None = None
        self._router_hosts = 0
        self.keys_by_value = True  # no shared files or environment on other nodes: keys travel by value

    # ------------------------------------------------------------------ hosts

    def _new_host(self, name: str, strategy: Any, **resources: Any) -> Any:
        cls = ray_module().remote(NodeHost)
        h = cls.options(scheduling_strategy=strategy, max_concurrency=64, **resources).remote()
        self._hosts[name] = h
        return h

    async def _host_node(self, host: Any, timeout: float) -> RayNode:
        try:
            w = await asyncio.wait_for(as_future(host.where.remote()), timeout)
        except Exception as exc:
            raise ChildFailed(
                f"a Ray host actor did not start within {timeout:.0f} s: {first_line(exc)}"
            ) from None
        known = {n.node_id: n for n in self.nodes}
        return known.get(w["node_id"], RayNode(w["node_id"], w["ip"]))

    def _pinned_host(self, name: str, node: RayNode, cpus: float) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return self._new_host(name, NodeAffinitySchedulingStrategy(node.node_id, soft=False), num_cpus=cpus)

    def _bundle_host(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        b = dict(self._plan_bundles[bundle])
        res = {k: v for k, v in b.items() if k not in ("CPU", "GPU")}
        strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle)
        kw: dict[str, Any] = {"num_cpus": b.get("CPU", 0.0), "resources": res}
        if cfg.engine == "sglang":
            kw["num_gpus"] = b.get("GPU", 1.0)  # Ray sets CUDA_VISIBLE_DEVICES; children inherit it
        return self._new_host(f"instance-{bundle}", strategy, **kw)

    def _remote(
        self, role: str, instance: str | None, args: list[str], host: Any, node: RayNode
    ) -> RemoteChild:
        stem = role if instance is None else f"{role}-{instance}"
        key = f"{stem}-{len(self.children)}"
        return RemoteChild(
            role, instance, args, self.cfg.log_dir / f"{stem}.log", host=host, key=key, node=node,
            timeout=self.cfg.ready_timeout,
        )  # fmt: skip

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Connect to Ray, place the instances' group, start the pairs, then routers and the daemon.

        Raises:
            ChildFailed: a process exited or timed out, or Ray could not place something in time.
        """
        from ray.util.placement_group import placement_group

        ray = ray_module()

        cfg = self.cfg
        if not ray.is_initialized():
            ray.init(address=self.opts.address, log_to_driver=False, logging_level=logging.WARNING)
        self.nodes = list_nodes()
        me = ray.get_runtime_context().get_node_id()
        self._driver_node = next((n for n in self.nodes if n.node_id == me), None)
        plan = instance_plan(cfg.engine, cfg.instances, self.opts)
        check_instances(self.nodes, plan)
        router_pair(self.nodes, self.opts.router_nodes, cfg.standby)  # fail early, before any process
        self._plan_bundles = plan.bundles
        self._pg = placement_group(
            [dict(b) for b in plan.bundles], strategy=plan.strategy, name="lmetric-instances"
        )
        try:
            await asyncio.wait_for(as_future(self._pg.ready()), self.opts.placement_timeout)
        except asyncio.TimeoutError:
            raise ChildFailed(
                f"Ray did not place {len(plan.bundles)} instance bundles ({plan.strategy}) within "
                f"{self.opts.placement_timeout:.0f} s; see `ray status`"
            ) from None
        hosts = [self._bundle_host(i) for i in range(cfg.instances)]
        nodes = await asyncio.gather(*(self._host_node(h, self.opts.placement_timeout) for h in hosts))
        engines = [await self._engine(i, h, n) for i, (h, n) in enumerate(zip(hosts, nodes, strict=True))]
        await self._start_stage(engines)
        agents = [self._agent(e) for e in engines]
        await self._start_stage(list(agents))
        self._pairs = [(i, e, a) for i, (e, a) in enumerate(zip(engines, agents, strict=True))]
        log.info("instances on %s", ", ".join(f"{e.instance}@{e.node.ip}" for e in engines if e.node))
        await self._start_rest(list(agents))

    async def _engine(self, i: int, host: Any, node: RayNode) -> RemoteChild:
        cfg = self.cfg
        if cfg.engine == "sglang":
            assert cfg.model_path is not None
            from launch.sglang_engines import EnginePorts

            ports = EnginePorts(*await as_future(host.free_ports.remote(4, node.ip)))
            args = [
                cfg.sglang_module,
                *server_args(cfg.model_path, node.ip, ports, cfg.page_size, cfg.sglang_args),
            ]
            c = self._remote("engine", str(i), ["-m", *args], host, node)
            c.health, c.timeout = f"http://{node.ip}:{ports.http}/health", cfg.engine_ready_timeout
            c.endpoints_hint = {"http": f"http://{node.ip}:{ports.http}", "kv": f"tcp://{node.ip}:{ports.kv}"}
        else:
            args = [
                "--host", node.ip, "--port", "0", "--profile", cfg.profile, "--model-name", cfg.model_name,
                "--page-size", str(cfg.page_size), "--max-running-requests", str(cfg.max_running_requests),
                "--time-scale", str(cfg.time_scale),
            ]  # fmt: skip
            if cfg.max_total_tokens:
                args += ["--max-total-tokens", str(cfg.max_total_tokens)]
            c = self._remote("engine", str(i), ["-m", "agents.engine.server", *args], host, node)
        self.children.append(c)
        return c

    def _agent(self, engine: RemoteChild, ports: tuple[str, str] = ("0", "0")) -> RemoteChild:
        assert engine.ready is not None and engine.node is not None
        ip = engine.node.ip
        args = ["-m", "agents.agent", "--engine-url", engine.ready.endpoints["http"], "--instance-id"]
        args += [str(engine.instance), "--host", ip, "--pub-port", ports[0], "--snapshot-port", ports[1]]
        c = self._remote("agent", engine.instance, args, engine.host, engine.node)
        self.children.append(c)
        return c

    def _child(self, role: str, instance: str | None, module: str, args: Sequence[str]) -> Child:
        """The metrics daemon (the base class's only other child): on the launcher's node."""
        node = self._driver_node or self.nodes[0]
        host = self._pinned_host(role, node, 0.0)
        c = self._remote(role, instance, ["-m", module, *_with_host(list(args), node.ip)], host, node)
        self.children.append(c)
        return c

    async def _start_router(self, role: str) -> Child:
        """One router on a chosen node, never the other router's node (:mod:`launch.placement`)."""
        other = self.standby if role == "primary" else self.primary
        avoid = (
            {other.node.node_id} if isinstance(other, RemoteChild) and other.alive and other.node else set()
        )
        self.nodes = list_nodes()
        if role == "primary" and not avoid:
            node, _ = router_pair(self.nodes, self.opts.router_nodes, standby=False)
        else:
            picked = pick_router_node(router_candidates(self.nodes, self.opts.router_nodes), avoid)
            if picked is None:
                raise ChildFailed(f"no chosen router node other than the primary's is alive for the {role}")
            node = picked
        n = self._routers_started
        self._routers_started += 1
        host = self._pinned_host(f"router-{n}", node, self.opts.router_cpus)
        c = self._remote(
            f"router-{role}",
            None,
            ["-m", "router", *_with_host(self._router_args(role), node.ip)],
            host,
            node,
        )
        c.log_path = self.cfg.log_dir / f"router-{n}.log"
        c.env.update(self.router_env())
        self.children.append(c)
        await self._start_stage([c])
        return c

    async def _replace_routers(self) -> None:
        """The base class's takeover handling; then the router URL is the new primary's, on its node."""
        await super()._replace_routers()
        if self.primary is not None and self.primary.ready is not None:
            url = self.primary.ready.endpoints["http"]
            if url != self.router_url:
                log.warning("the router moved to %s", url)
                self.router_url = url
                self.write_cluster_file()

    # ------------------------------------------------------------------ supervise

    async def watch(self, stop: asyncio.Event) -> None:
        """The base class's watch (routers) beside the supervisor (polls, restarts pairs)."""
        sup = asyncio.create_task(self._supervise(stop), name="ray-supervisor")
        try:
            await super().watch(stop)
        finally:
            sup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sup
            for t in self._restarting.values():
                t.cancel()

    async def _supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._poll_hosts()
            for bundle, e, a in self._pairs:
                name = str(e.instance)
                busy = name in self._restarting and not self._restarting[name].done()
                if not busy and not (e.alive and a.alive):
                    self._restarting[name] = asyncio.create_task(self._restart_pair(bundle, e, a))
            await asyncio.sleep(POLL_INTERVAL)

    async def _poll_hosts(self) -> None:
        by_host: dict[int, list[RemoteChild]] = {}
        for c in self.children:
            if isinstance(c, RemoteChild) and c.alive:
                by_host.setdefault(id(c.host), []).append(c)
        for kids in by_host.values():
            try:
                codes = await asyncio.wait_for(as_future(kids[0].host.poll.remote()), HOST_CALL_TIMEOUT)
            except Exception as exc:  # the actor (or its node) is gone: so are its children
                log.error("host of %s is gone: %s", ", ".join(k.name for k in kids), first_line(exc))
                codes = {}
            for k in kids:
                if k.ready is not None and codes.get(k.key, -9) is not None:
                    k.exit_code = codes.get(k.key, -9)

    async def _restart_pair(self, bundle: int, engine: RemoteChild, agent: RemoteChild) -> None:
        """Restart one engine + agent pair on its bundle, the agent on its old ports; retry until done."""
        assert agent.ready is not None
        pub, snap = (agent.ready.endpoints[k].rsplit(":", 1)[1] for k in ("pub", "snapshot"))
        old_ip = engine.node.ip if engine.node else ""
        log.error("instance %s on %s is down; restarting it", engine.instance, old_ip)
        while True:
            for c in (agent, engine):
                await c.stop()
            self.write_cluster_file()
            host = engine.host
            try:
                await asyncio.wait_for(as_future(host.poll.remote()), HOST_CALL_TIMEOUT)
            except Exception:
                with contextlib.suppress(Exception):
                    ray_module().kill(host)
                host = self._bundle_host(bundle)  # placed once Ray has the bundle again
            try:
                node = await self._host_node(host, self.opts.placement_timeout)
                if node.ip != old_ip:
                    log.error("instance %s moved from %s to %s: the routers know only the old address",
                              engine.instance, old_ip, node.ip)  # fmt: skip
                e2 = await self._engine(int(str(engine.instance)), host, node)
                await self._start_stage([e2])
                a2 = self._agent(e2, (pub, snap))
                await self._start_stage([a2])
            except ChildFailed as exc:
                log.error("restart of instance %s failed: %s; retrying", engine.instance, exc)
                await asyncio.sleep(2.0)
                continue
            self.children = [c for c in self.children if c is not engine and c is not agent]
            self._pairs = [(b, e2, a2) if b == bundle else (b, e, a) for b, e, a in self._pairs]
            self.write_cluster_file()
            log.warning("instance %s is back on %s", engine.instance, node.ip)
            return

    async def stop(self) -> None:
        """Stop every child (base class), then the host actors and the placement group; leave Ray."""
        for t in self._restarting.values():
            t.cancel()
        await super().stop()
        with contextlib.suppress(Exception):
            from ray.util.placement_group import remove_placement_group

            ray = ray_module()

            for h in self._hosts.values():
                ray.kill(h)
            if self._pg is not None:
                remove_placement_group(self._pg)
            ray.shutdown()
