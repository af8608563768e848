"""Hot standby: a router's role, its decision stream, following a primary, and taking its port over.

Theory of operation
-------------------
A **primary** serves the HTTP port and publishes every decision and a heartbeat (every
:data:`~router.decisions.ROUTER_HEARTBEAT_INTERVAL` s) on its decision stream. A **standby** runs the very
same :class:`~router.server.RouterServer` (subscriber, core, ticker) without binding the HTTP port, and
follows the primary's decision stream through a :class:`~router.decisions.DecisionMirror`, so its index,
speculative entries and per-instance dispatch accounting are the primary's. It publishes its own stream
too (heartbeats saying ``standby``), so observers see both routers.

Takeover (on one machine). The standby considers the primary gone when the connection to its decision
stream dropped (the socket monitor reports it within milliseconds of the process dying) or when no
heartbeat came for ``primary_timeout`` seconds. It then tries to bind the HTTP port itself, every few
milliseconds, with ``SO_REUSEADDR`` and without ``SO_REUSEPORT``: on Linux that bind fails for as long as
any socket listens on the port, so it succeeds only once the primary's listener is closed, i.e. the
primary process is dead or has shut down. Two routers can therefore never serve the port at once, and a
primary that was merely slow keeps its port (the standby goes back to waiting when heartbeats resume).
Once bound, the standby closes its decision subscription, releases the dispatches it mirrored (their
requests died with the primary's connections), starts serving from its warm state and heartbeats as
``primary``: a new standby can follow it. Across machines the port check means nothing; a virtual IP
(keepalived), a Kubernetes Lease or an etcd lease (:mod:`router.etcd_lease`, ``--takeover etcd``: the
holder of a leader key serves, with the key's create revision as its epoch) decides instead
(docs/ha.md). Whichever way two routers came to serve at once (a frozen primary resumed, a split
healed), the fencing epoch settles it: :mod:`router.fence`.

Requests that can fail: those the primary had accepted when it died (their connections close with it),
and connections made while no process listens (between the primary's death and the standby's bind the
kernel refuses them). Every request that connects after the bind is served by the new primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import zmq
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvindex.protocol import TOPIC_ROUTER_HEARTBEAT, RouterHeartbeat
from kvindex.protocol.numbered import DecisionReceived
from router import auth
from router.decisions import (
    ROUTER_HEARTBEAT_INTERVAL,
    DecisionPublisher,
    DecisionSubscriber,
    heartbeat_of,
)
from router.etcd_lease import EtcdLease, LeaseHeld, parse_endpoints
from router.fence import Fence
from router.model.mirror import DecisionMirror

if TYPE_CHECKING:
    from router.server import RouterServer

log = logging.getLogger(__name__)

SERVING_ROLES = ("primary", "active")
"""Roles that serve the HTTP port. ``active`` (:mod:`router.active`) serves beside other active routers
and is outside fencing: it heartbeats with term 0 and never steps down (only a ``primary`` does)."""

BIND_RETRY_MIN = 0.005
BIND_RETRY_MAX = 0.05
"""Seconds between two bind attempts while the primary looks gone (growing from min to max)."""


def try_bind(host: str, port: int) -> socket.socket | None:
    """A listening TCP socket on ``host:port`` (``SO_REUSEADDR``, no ``SO_REUSEPORT``), or None while the
    address is in use (another socket listens there) or not on this machine (a virtual IP that keepalived
    has not moved here yet). Raises ``OSError`` for any other failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            return None
        raise
    sock.setblocking(False)
    return sock


class HANode:
    """Role, decision stream, primary following and takeover around one :class:`RouterServer`.

    Lifecycle: :meth:`start`, (:meth:`wait_for_primary`), :meth:`stop`. ``role`` changes from
    ``standby`` to ``primary`` at a takeover, never back.
    """

    def __init__(self, server: RouterServer) -> None:
        self.server = server
        cfg = server.cfg
        self.cfg = cfg
        self.role = cfg.role
        self.epoch = secrets.randbelow(2**62 - 1) + 1
        """This process's incarnation id (random; not comparable between routers)."""
        self.fence = Fence(1 if cfg.role == "primary" else 0, self.epoch, cfg.primary_timeout)
        self.fenced = asyncio.Event()
        """Set once this router stepped down for a primary with a higher epoch."""
        self.peers: DecisionSubscriber | None = None
        self._registered_with: str | None = None
        self.publisher: DecisionPublisher | None = None
        self.follower: DecisionSubscriber | None = None
        self.mirror = DecisionMirror(server.core)
        self.takeovers = 0
        self.promoted_at: float | None = None
        """Wall clock (Unix seconds) of this router's takeover, if it took over."""
        self.primary_lost_at: float | None = None
        """Wall clock when the primary was first seen gone, for the takeover that followed."""
        self.bind_attempts = 0
        self._started = time.monotonic()
        self._admin: web.AppRunner | None = None
        self.admin_url: str | None = None
        self._metrics_site: web.AppRunner | None = None
        self.metrics_url: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._promoted = asyncio.Event()
        self._promoting = False
        self.lease: EtcdLease | None = None
        """``--takeover etcd``: this router's side of the election (serves only while it holds the key)."""

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the server (binding the port only as primary), the decision stream, and for a standby
        the following and the takeover watch. Raises ``OSError`` / ``zmq.ZMQError`` on a bind failure."""
        server, cfg = self.server, self.cfg
        if cfg.decisions_port is not None:
            self.publisher = DecisionPublisher(cfg.decisions_host or cfg.host, cfg.decisions_port, self.epoch)
            self.publisher.term = self.fence.term
            server.decisions = self.publisher
        if cfg.takeover == "etcd":
            await self._start_lease()
        server.extra_state = self.state_json
        server.metrics.registry.register(_HACollector(self))
        server.middlewares.append(self._gate)
        await server.start(bind=self.role in SERVING_ROLES)
        loop = asyncio.get_running_loop()
        self.peers = DecisionSubscriber(cfg.peer_decisions, self._on_peer, ctx=server.subscriber.ctx)
        self.peers.start()
        if self.role == "standby":
            assert cfg.primary_decisions is not None  # RouterConfig checks it
            self.follower = DecisionSubscriber(
                [cfg.primary_decisions], self._on_primary_stream, ctx=server.subscriber.ctx
            )
            self.follower.start()
            self._started = time.monotonic()
            if cfg.takeover == "auto":
                self._tasks.append(loop.create_task(self._watch(), name="ha-watch"))
            elif cfg.takeover == "etcd":
                self._tasks.append(loop.create_task(self._campaign(), name="etcd-campaign"))
        # The beat keeps the fence's clock even without a decision stream: with no beat, the fence would
        # see one endless stall and hold every request at the gate (the launch fuzz slow-sender finding).
        self._tasks.append(loop.create_task(self._beat(), name="ha-heartbeat"))
        if cfg.admin_port is not None:
            await self._start_admin(cfg.admin_port)
        if cfg.metrics_port is not None:
            await self._start_metrics(cfg.metrics_port)
        log.info(
            "router %s (epoch %x): decisions %s, admin %s%s",
            self.role,
            self.epoch,
            self.publisher.endpoint if self.publisher else "off",
            self.admin_url or "off",
            f", following {cfg.primary_decisions}" if self.follower else "",
        )

    def endpoints(self) -> dict[str, str]:
        """The READY line's endpoints: ``http`` (served, or to be served after a takeover), ``decisions``
        and ``admin`` when on."""
        http = (
            self.server.url
            if self.server.port
            else f"{auth.scheme(self.cfg)}://{self.cfg.host}:{self.cfg.port}"
        )
        eps = {"http": http}
        if self.publisher is not None:
            eps["decisions"] = self.publisher.endpoint
        if self.admin_url is not None:
            eps["admin"] = self.admin_url
        if self.metrics_url is not None:
            eps["metrics"] = self.metrics_url
        return eps

    async def wait_for_primary(self, timeout: float) -> bool:
        """A standby: wait until the primary's first heartbeat arrived (at most ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while self.role == "standby" and self.mirror.primary is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        """Stop everything (the server included). Safe after a failed start."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.lease is not None:  # a holder resigns (the key goes): its standby takes over at once
            await self.lease.close(resign=True)
        for sub in (self.follower, self.peers):
            if sub is not None:
                await sub.close()
        for runner in (self._admin, self._metrics_site):
            if runner is not None:
                await runner.cleanup()
        self._admin = self._metrics_site = None
        await self.server.stop()
        if self.publisher is not None:
            self.publisher.close()

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

    # -------------------------------------------------------------------------------------- following

    def primary_alive(self, now: float) -> bool:
        """A standby's view: the decision stream is connected and a heartbeat came recently."""
        f = self.follower
        if f is None or self.cfg.primary_decisions is None:
            return False
        hb_at = self.mirror.heartbeat_at
        if hb_at is None:  # never heard from it: allow one timeout from our start to connect
            return now - self._started <= self.cfg.primary_timeout
        if self.mirror.primary is not None and self.mirror.primary.role == "fenced":
            return False
        return f.connected(self.cfg.primary_decisions) and now - hb_at <= self.cfg.primary_timeout

    async def _watch(self) -> None:
        delay = BIND_RETRY_MIN
        while self.role == "standby":
            now = time.monotonic()
            if self.primary_alive(now):
                delay = BIND_RETRY_MIN
                self.primary_lost_at = None
                await asyncio.sleep(0.01)
                continue
            if self.primary_lost_at is None:
                self.primary_lost_at = time.time()
                log.warning("primary looks gone; trying to take port %d over", self.cfg.port)
            self.bind_attempts += 1
            try:
                sock = try_bind(self.cfg.host, self.cfg.port)
            except OSError as exc:
                log.error("cannot bind %s:%d for a takeover: %s", self.cfg.host, self.cfg.port, exc)
                sock = None
            if sock is not None:
                await self._promote(sock)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, BIND_RETRY_MAX)

    async def promote_now(self) -> bool:
        """Take the port over now if it can be bound (an external elector decided). Returns whether this
        router is the primary afterwards. Raises ``OSError`` for a bind failure other than "in use"."""
        if self.role in SERVING_ROLES:
            return True
        if self._promoting:  # the watch got there first
            await self._promoted.wait()
            return True
        if self.primary_lost_at is None:
            self.primary_lost_at = time.time()
        self.bind_attempts += 1
        sock = try_bind(self.cfg.host, self.cfg.port)
        if sock is None:
            return False
        await self._promote(sock)
        return True

    async def _promote(self, sock: socket.socket, term: int | None = None) -> None:
        if self._promoting:
            sock.close()
            return
        self._promoting = True
        # The old primary's stream stays open: no more mirroring (the role check in
        # _on_primary_stream), but if that router comes back it is seen, and fenced (router/fence.py).
        released = self.mirror.release()
        self.fence.term = self.fence.promotion_term() if term is None else term
        if self.publisher is not None:
            self.publisher.term = self.fence.term
        await self.server.bind(sock)
        self.role = "primary"
        self.takeovers += 1
        self.promoted_at = time.time()
        self._publish_heartbeat()
        self._promoted.set()
        lost = self.primary_lost_at
        log.warning(
            "took over as primary (epoch %d) on %s %.0f ms after the primary was seen gone; %d mirrored "
            "dispatches released; index %d blocks",
            self.fence.term,
            self.server.url,
            1000 * (self.promoted_at - lost) if lost else 0.0,
            released,
            self.server.core.index.total_blocks() if self.server.core.index else 0,
        )

    async def wait_promoted(self) -> None:
        """Return once this router took over (never, for a primary)."""
        await self._promoted.wait()

    # ------------------------------------------------------------------------------------ heartbeats

    def _publish_heartbeat(self) -> None:
        if self.publisher is None:
            return
        hb = heartbeat_of(
            self.server.core,
            self.epoch,
            self.role,
            self.endpoints()["http"],
            os.getpid(),
            term=self.fence.term,
            admin=self.admin_url or "",
            decisions=self.publisher.endpoint,
        )
        self.publisher.publish(TOPIC_ROUTER_HEARTBEAT, hb)

    async def _beat(self) -> None:
        while True:
            self.fence.beat()
            try:
                self._publish_heartbeat()
            except Exception:  # a bug here must not stop the heartbeat for good
                log.exception("router heartbeat failed")
            await asyncio.sleep(ROUTER_HEARTBEAT_INTERVAL)

    # -------------------------------------------------------------------------------------- fencing

    def _on_primary_stream(self, rec: DecisionReceived) -> None:
        """The followed primary's stream: mirrored while standing by, watched for its epoch always."""
        if self.role == "standby":
            self.mirror.on_message(rec)
        if isinstance(rec.msg, RouterHeartbeat):
            self._observe(rec.msg)
            if self.role == "standby" and rec.msg.role == "primary":
                self._register_with(rec.msg)

    def _on_peer(self, rec: DecisionReceived) -> None:
        if isinstance(rec.msg, RouterHeartbeat):
            self._observe(rec.msg)

    def _observe(self, hb: RouterHeartbeat) -> None:
        if self.fence.observe(hb) and self.role == "primary":
            self._tasks.append(asyncio.get_running_loop().create_task(self._step_down(hb), name="fence"))

    async def _step_down(self, hb: RouterHeartbeat) -> None:
        if self.role != "primary":
            return
        self.role = "fenced"
        self.fence.fenced_by = hb
        await self.server.unbind()
        self._publish_heartbeat()
        log.error(
            "FENCED: router %x serves %s as primary with epoch %d > this router's %d; stopped serving and "
            "released %s:%d",
            hb.router_epoch,
            hb.http,
            hb.term,
            self.fence.term,
            self.cfg.host,
            self.server.port,
        )
        self.fenced.set()

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

    # ------------------------------------------------------------------------------------ etcd lease

    async def _start_lease(self) -> None:
        """Make the lease; a primary must win it before it binds the port (its epoch is the key's create
        revision). Raises :class:`~router.etcd_lease.LeaseHeld` if another router holds the key for
        longer than two TTLs, ``EtcdUnavailable`` without the client."""
        cfg = self.cfg
        value = {
            "router_epoch": f"{self.epoch:x}",
            "http": f"{auth.scheme(cfg)}://{cfg.host}:{cfg.port}",
            "decisions": self.publisher.endpoint if self.publisher else "",
            "pid": os.getpid(),
        }
        endpoints = parse_endpoints(",".join(cfg.etcd_endpoints))
        self.lease = EtcdLease(endpoints, cfg.etcd_prefix, cfg.etcd_lease_ttl, value)
        self.server.metrics.registry.register(self.lease.collector())
        if self.role != "primary":
            return
        wait = 2 * cfg.etcd_lease_ttl + 1.0  # a killed holder's key expires within one TTL
        try:
            self.fence.term = await asyncio.wait_for(self.lease.campaign(), wait)
        except asyncio.TimeoutError:
            h = self.lease.holder
            if h is None:
                raise LeaseHeld(
                    f"could not campaign for etcd key {self.lease.key.decode()} within {wait:g} s: is etcd "
                    f"reachable at {','.join(cfg.etcd_endpoints)}?"
                ) from None
            raise LeaseHeld(
                f"etcd key {self.lease.key.decode()} is held by router {h.router_epoch} serving {h.http} "
                f"(epoch {h.epoch}) for more than {wait:g} s: start this router as --role standby "
                f"--primary-decisions {h.decisions}"
            ) from None
        if self.publisher is not None:
            self.publisher.term = self.fence.term
        self._tasks.append(asyncio.get_running_loop().create_task(self._hold(), name="etcd-hold"))

    async def _campaign(self) -> None:
        """A standby: win the key (it waits for the holder's lease to go), bind the port, serve."""
        assert self.lease is not None
        term = await self.lease.campaign()
        self.primary_lost_at = self.lease.vacant_at or time.time()
        delay = BIND_RETRY_MIN
        while (sock := try_bind(self.cfg.host, self.cfg.port)) is None:  # the port is this host's
            self.bind_attempts += 1
            if self.lease.lost.is_set():
                return
            if delay == BIND_RETRY_MIN:
                log.warning("won the etcd key but %s:%d is in use; retrying", self.cfg.host, self.cfg.port)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BIND_RETRY_MAX)
        await self._promote(sock, term)
        await self._hold()

    async def _hold(self) -> None:
        """A holder: stop serving once the lease is lost."""
        assert self.lease is not None
        await self.lease.lost.wait()
        if self.role != "primary":
            return
        self.role = "fenced"
        await self.server.unbind()
        self._publish_heartbeat()
        log.error(
            "FENCED: lost the etcd lease (epoch %d): %s; stopped serving and released %s:%d",
            self.fence.term,
            self.lease.lost_reason,
            self.cfg.host,
            self.cfg.port,
        )
        self.fenced.set()

    # ----------------------------------------------------------------------------------------- state

    def state_json(self) -> dict[str, Any]:
        """The ``ha`` section of ``GET /router/state``."""
        now = time.monotonic()
        hb = self.mirror.primary
        f = self.follower
        return {
            "role": self.role,
            "pid": os.getpid(),
            "router_epoch": f"{self.epoch:x}",
            "term": self.fence.term,
            "highest_term_seen": self.fence.highest.term if self.fence.highest else None,
            "fenced_by": None
            if self.fence.fenced_by is None
            else {"http": self.fence.fenced_by.http, "term": self.fence.fenced_by.term},
            "stalls": self.fence.stalls,
            "peers": list(self.peers.endpoints) if self.peers else [],
            "decisions": self.publisher.endpoint if self.publisher else None,
            "admin": self.admin_url,
            "following": self.cfg.primary_decisions if self.cfg.role == "standby" else None,
            "primary_connected": bool(
                f and self.cfg.primary_decisions and f.connected(self.cfg.primary_decisions)
            ),
            "primary_heartbeat_age": None
            if self.mirror.heartbeat_at is None
            else now - self.mirror.heartbeat_at,
            "primary_http": hb.http if hb else None,
            "mirrored_open": self.mirror.open_tickets,
            "mirror": vars(self.mirror.stats).copy(),
            "takeovers": self.takeovers,
            "promoted_at": self.promoted_at,
            "primary_lost_at": self.primary_lost_at,
            "bind_attempts": self.bind_attempts,
            "lease": None
            if self.lease is None
            else {
                "key": self.lease.key.decode(),
                "held": self.lease.held(),
                "epoch": self.lease.epoch,
                "lost": self.lease.lost_reason or None,
                "holder_seen": vars(self.lease.holder) if self.lease.holder else None,
            },
            "published": dict(self.publisher.published) if self.publisher else {},
        }

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


class _HACollector(Collector):
    """The router's HA metrics, read at scrape time."""

    def __init__(self, node: HANode) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        n = self._node
        role = GaugeMetricFamily("router_role", "1 for this router's current role", labels=["role"])
        for r in ("primary", "standby", "fenced", "active"):
            role.add_metric([r], 1.0 if n.role == r else 0.0)
        yield role
        yield GaugeMetricFamily("router_epoch", "This router's fencing epoch (term)", value=n.fence.term)
        yield CounterMetricFamily(
            "router_fenced",
            "Times this router stopped serving for a primary with a higher epoch",
            value=1 if n.role == "fenced" else 0,
        )
        yield CounterMetricFamily(
            "router_takeovers", "Times this router took the port over", value=n.takeovers
        )
        pub = CounterMetricFamily(
            "router_decision_frames_published", "Decision-stream frames published, by type", labels=["type"]
        )
        if n.publisher is not None:
            for t, c in sorted(n.publisher.published.items()):
                pub.add_metric([t], c)
        yield pub
        ms = n.mirror.stats
        mir = CounterMetricFamily(
            "router_mirrored_decisions",
            "Primary's decisions applied by this standby, by outcome",
            labels=["kind"],
        )
        for kind in ("routed", "finished", "unknown_finished", "reconciled", "released"):
            mir.add_metric([kind], getattr(ms, kind))
        yield mir
        gaps = CounterMetricFamily(
            "router_decision_stream_lost_frames", "Frames of the followed decision stream never received"
        )
        gaps.add_metric([], n.follower.stats.lost_frames if n.follower else 0)
        yield gaps
        age = n.mirror.heartbeat_at
        yield GaugeMetricFamily(
            "router_primary_heartbeat_age_seconds",
            "Seconds since the followed primary's last heartbeat (-1: none yet or not a standby)",
            value=-1.0 if age is None or n.role != "standby" else time.monotonic() - age,
        )
