"""An HA router's own HTTP ports (:class:`HAAdmin`, between :class:`~router.ha_state.HAState` and
:class:`router.ha.HANode`): the admin port (``/health``, ``/metrics``, ``/router/state``,
``POST /router/promote``, ``POST /router/peers``), the separate ``--metrics-port``, and a standby's
registration with its primary as a peer (that primary's ``/router/peers``); and the gate on the HTTP port,
which holds requests while a primary's fence is suspect and answers 503 once it was fenced or lost its
lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import zmq
from aiohttp import web

from kvindex.protocol import RouterHeartbeat
from router import auth
from router.ha_state import SERVING_ROLES, HAState

log = logging.getLogger("router.ha")


class HAAdmin(HAState):
    """The admin and metrics sites, peer registration and the HTTP port's gate; :meth:`promote_now` is :class:`router.ha.HANode`'s."""

    async def promote_now(self) -> bool:
        """Take the port over now if it can be bound (see :meth:`router.ha.HANode.promote_now`)."""
        raise NotImplementedError

    async def _start_admin(self, port: int) -> None:
        app = web.Application(middlewares=[self.server.access.middleware])
        app.router.add_get("/health", self._handle_admin_health)
        if self.cfg.metrics_port is None:
            app.router.add_get("/metrics", self._handle_admin_metrics)
        app.router.add_get("/router/state", self._handle_admin_state)
        app.router.add_post("/router/promote", self._handle_promote)
        app.router.add_post("/router/peers", self._handle_peers)
        self._admin, self.admin_url = await self._site(app, self.cfg.admin_host or self.cfg.host, port)

    async def _start_metrics(self, port: int) -> None:
        app = web.Application(middlewares=[self.server.access.middleware])
        app.router.add_get("/metrics", self._handle_admin_metrics)
        app.router.add_get("/health", self._handle_admin_health)
        host = self.cfg.metrics_host or self.cfg.host
        self._metrics_site, self.metrics_url = await self._site(app, host, port)

    async def _site(self, app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=self.server.ssl).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner, f"{auth.scheme(self.cfg)}://{host}:{int(runner.addresses[0][1])}"

    def _register_with(self, hb: RouterHeartbeat) -> None:
        """Once per primary: ask it to watch this standby's stream (so it sees a takeover)."""
        if not hb.admin or self.publisher is None or self._registered_with == hb.admin:
            return
        self._registered_with = hb.admin
        self._tasks.append(asyncio.get_running_loop().create_task(self._register(hb.admin), name="register"))

    async def _register(self, admin: str) -> None:
        key = self.server.access.client_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        ssl_ctx = auth.client_ssl(self.cfg)
        body = {"decisions": self.publisher.endpoint if self.publisher else ""}
        for attempt in range(20):
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s,
                    s.post(f"{admin}/router/peers", json=body, headers=headers, ssl=ssl_ctx) as r,
                ):
                    if r.status == 200:
                        log.info("registered with the primary at %s as its peer", admin)
                        return
                    log.warning("primary at %s refused the peer registration: %d", admin, r.status)
                    if r.status in (401, 403, 404):
                        return
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    async def _handle_peers(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            ep = body["decisions"]
            if not isinstance(ep, str) or not ep.startswith("tcp://") or len(ep) > 200:
                raise ValueError("decisions must be a tcp:// endpoint")
            assert self.peers is not None
            self.peers.add_endpoint(ep)
        except (ValueError, KeyError, TypeError, zmq.ZMQError) as exc:
            return web.json_response({"error": f"bad peer registration: {exc}"}, status=400)
        log.info("watching peer decision stream %s", ep)
        return web.json_response({"peers": list(self.peers.endpoints)})

    async def _handle_admin_health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "role": self.role, "instances_routable": self.server.core.routable_count()}
        )

    async def _handle_admin_metrics(self, request: web.Request) -> web.Response:
        m = self.server.metrics
        return web.Response(body=m.render(), headers={"Content-Type": m.content_type})

    async def _handle_admin_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.server.state_json())

    async def _handle_promote(self, request: web.Request) -> web.Response:
        if self.lease is not None:
            msg = "--takeover etcd: the holder of the etcd leader key serves; promotion is not by request"
            return web.json_response({"role": self.role, "error": msg}, status=409)
        try:
            ok = await self.promote_now()
        except OSError as exc:
            return web.json_response({"role": self.role, "error": str(exc)}, status=500)
        if not ok:
            msg = f"{self.cfg.host}:{self.cfg.port} is still in use or not on this machine"
            return web.json_response({"role": self.role, "error": msg}, status=409)
        return web.json_response({"role": self.role, "url": self.server.url})

    @web.middleware
    async def _gate(
        self, request: web.Request, handler: Any
    ) -> web.StreamResponse:  # an aiohttp middleware on the HTTP port
        # Only a router with a peer can have been deposed while it did not run: a lone router (no standby
        # registered or configured) never holds (a busy host's late beat would stall its requests ~1 s).
        while (
            self.role == "primary"
            and self.peers is not None
            and self.peers.endpoints
            and self.fence.suspect()
        ):
            await asyncio.sleep(0.01)
        if self.role not in SERVING_ROLES or (self.lease is not None and not self.lease.held()):
            body = {
                "error": {
                    "message": "this router was fenced by a primary with a higher epoch or lost its lease",
                    "type": "service_unavailable",
                    "param": None,
                    "code": 503,
                }
            }
            return web.json_response(body, status=503, headers={"Connection": "close"})
        resp: web.StreamResponse = await handler(request)
        if not resp.prepared:  # which router answered, and under which epoch
            resp.headers["X-Router-Epoch"] = f"{self.fence.term}:{self.epoch:x}"
        return resp
