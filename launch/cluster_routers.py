"""A launched cluster's routers (:class:`ClusterRouters`, between :class:`~launch.cluster_state.ClusterState`
and :class:`launch.cluster.Cluster`): their command lines and keys, the primary/standby pair or the K
active routers (``--routers K``), and the supervision that keeps them running: a standby that took over
becomes the primary and a new standby is started; an active router that exited is restarted on its ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from launch.cluster_state import ClusterState
from launch.procs import Child, ChildFailed
from launch.sglang_engines import free_ports
from router.model.policies import param_args

log = logging.getLogger("launch.cluster")


class ClusterRouters(ClusterState):
    """Starting, watching and replacing the cluster's routers."""

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
        if role == "primary" and cfg.workers > 1:  # the standby stays one process (router/workers.py)
            args += ["--workers", str(cfg.workers)]
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
