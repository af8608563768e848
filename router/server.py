"""The router's HTTP shell (aiohttp on uvloop) around :class:`router.model.model.RoutingModel`.

``RouterServer`` holds the runtime state and has ``start()`` / ``stop()``; :func:`router.main.serve`
runs one inside its HA node until SIGINT/SIGTERM and is embeddable; :func:`router.main.main` is
``python -m router``.

Tasks inside one event loop: one reader per agent SUB socket (frames go straight into the core), a ticker
(heartbeat timeouts, snapshot retries, speculative expiry), a short-lived task per snapshot fetch, and
aiohttp's request handlers. All of them call the core synchronously, so the core has a single owner: the
loop.

Endpoints: ``POST /generate``, ``/v1/completions``, ``/v1/chat/completions``; ``GET /v1/models``,
``/health``, ``/metrics``, ``/router/state`` (its ``process`` part: this process's pid and, in a worker
of ``--workers N``, its number). Every error body is :func:`kvindex.protocol.http.error_body`,
aiohttp's own 404 and 405 included (:func:`json_http_errors`).

A generation request goes through :class:`router.generation.Generation`: size check, admission, body,
decoding, tokenizing, then :class:`router.dispatch.Dispatcher`. docs/robustness.md has the defaults and why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from kvindex.protocol import LoadReport
from kvindex.protocol.http import PATHS
from kvindex.protocol.tokenizer import Tokenizer, load_tokenizer
from router import auth
from router.admission import Admission
from router.config import RouterConfig
from router.decisions import DecisionPublisher
from router.dispatch import Dispatcher
from router.generation import Generation, error_response, unavailable
from router.metrics import RouterMetrics
from router.model.concurrency import ConcurrencyLimits
from router.model.model import RoutingModel, SnapshotJob
from router.static_workers import WorkerProber, declare_workers
from router.subscriber import Received, SnapshotError, Subscriber, fetch_snapshot

log = logging.getLogger(__name__)

UPSTREAM_KEEPALIVE = 4.0
"""Seconds an idle pooled connection to an engine is kept: below SGLang's 5 s (uvicorn
``timeout_keep_alive``, docs/sglang-contract.md row 8), so the router never sends on a connection the
engine is closing."""


def tick_period(cfg: RouterConfig) -> float:
    """Seconds between the router's ticks (heartbeat checks, failing attempts on dead instances, stall
    ejection, the loop-lag clock): 0.1, or a quarter of the heartbeat timeout if that is shorter."""
    return min(0.1, cfg.heartbeat_timeout / 4)


@web.middleware
async def json_http_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer aiohttp's own HTTP errors (404 unknown path, 405 wrong method, ...) with the OpenAI-style
    JSON body every other router error has, keeping their headers (``Allow`` on a 405)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        where = f"{request.method} {request.path}"
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"method {request.method} not allowed on {request.path} (allowed: {allowed})"
        elif exc.status == 404:
            message = f"no such endpoint: {where}"
        else:
            message = f"{exc.reason}: {where}"
        resp = error_response(exc.status, message)
        for name, value in exc.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                resp.headers[name] = value
        return resp


class RouterServer:
    """One router: subscriber + core + HTTP server + shared client session.

    Raises ``TokenizerError`` from the constructor if ``cfg.tokenizer`` cannot be loaded.
    """

    def __init__(self, cfg: RouterConfig, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.core = RoutingModel(cfg.model, self._request_snapshot)
        self.subscriber = Subscriber(cfg.agents, self._on_agent_message)
        self.metrics = RouterMetrics(self.core, self.subscriber)
        self.access = auth.Access(cfg, self.metrics.registry)
        self.ssl = auth.server_ssl(cfg)
        self.middlewares: list[Any] = []
        """Extra aiohttp middlewares, inside the key check (the HA node's fence gate)."""
        self.dispatcher = Dispatcher(cfg, self.core, self.metrics, tick_period(cfg))
        self.limits: ConcurrencyLimits | None = (
            None
            if cfg.engine_queue_allowance < 0
            else ConcurrencyLimits(
                cfg.max_inflight_per_instance,
                queue_allowance=cfg.engine_queue_allowance,
                queue_seconds=cfg.engine_queue_seconds,
            )
        )
        """Adaptive per-instance in-flight limits (``--engine-queue-allowance``), or ``None``: fixed."""
        self.admission = Admission(self._inflight_limit, cfg.max_queue, cfg.queue_timeout, cfg.max_queue_wait)
        self.metrics.watch(self.admission, self.dispatcher.breakers, self.core)
        self.generation = Generation(
            cfg, self.core, self.tokenizer, self.metrics, self.admission, self.dispatcher
        )
        """The generation endpoints' handler (:mod:`router.generation`)."""
        self.port = 0
        self._started_at = int(time.time())
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._fetches: set[asyncio.Task[None]] = set()
        self._prober: WorkerProber | None = None
        self.extra_state: Callable[[], dict[str, Any]] | None = None
        """Adds the ``ha`` section to ``GET /router/state``."""

    @property
    def decisions(self) -> DecisionPublisher | None:
        """Where decisions and request ends are published (set by :class:`router.ha.HANode`)."""
        return self.dispatcher.decisions

    @decisions.setter
    def decisions(self, publisher: DecisionPublisher | None) -> None:
        self.dispatcher.decisions = publisher

    def _inflight_limit(self) -> int:
        if self.limits is None:
            return self.cfg.max_inflight_per_instance * max(1, self.core.routable_count())
        routable = [st.name for st in self.core.table.routable()]
        return self.limits.total(routable) if routable else self.cfg.max_inflight_per_instance

    def _on_agent_message(self, rec: Received) -> None:
        """Record how stale the stream is, then hand the frame to the core."""
        self.metrics.observe_stream_age(rec.msg, time.time())
        self.core.on_message(rec)
        msg = rec.msg
        if isinstance(msg, LoadReport):
            self.dispatcher.on_load(msg.instance, time.monotonic())
            if self.limits is not None:
                st = self.core.table.get(msg.instance)
                inflight, queued_s = 0, None
                if st is not None:
                    inflight = st.inflight
                    per_token = msg.prefill_seconds_per_token
                    if per_token is not None:  # the report's queue plus the router's unreported dispatches
                        queued_s = st.queued_prefill_tokens * per_token
                self.limits.on_report(msg.instance, msg.running, msg.waiting, inflight, queued_s)
                self.admission.wake()  # the limit may have grown

    @property
    def url(self) -> str:
        """``http://host:port`` actually bound (valid after :meth:`start`)."""
        return f"{auth.scheme(self.cfg)}://{self.cfg.host}:{self.port}"

    # ------------------------------------------------------------------------------------- lifecycle

    def make_app(self) -> web.Application:
        """The aiohttp application (routes only; no sockets)."""
        middlewares = [json_http_errors, self.access.middleware, *self.middlewares]
        app = web.Application(client_max_size=self.cfg.max_body_size, middlewares=middlewares)
        for path in PATHS:
            app.router.add_post(path, self.generation.handle)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/health", self._handle_health)
        if self.cfg.metrics_port is None:  # else on its own port (router.ha)
            app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/router/state", self._handle_state)
        return app

    async def start(self, *, bind: bool = True) -> None:
        """Subscribe to the agents, bind the HTTP port (unless not ``bind``: a standby binds later with
        :meth:`bind`), start the ticker. Raises ``OSError`` if the port cannot be bound and
        ``zmq.ZMQError`` for a malformed agent endpoint."""
        self.subscriber.start()
        self.dispatcher.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=8192,
                limit_per_host=4096,
                keepalive_timeout=UPSTREAM_KEEPALIVE,
                ssl=auth.client_ssl(self.cfg),
            ),
            timeout=aiohttp.ClientTimeout(total=None),  # each attempt sets its own (router.forward.Timeouts)
        )
        self._runner = web.AppRunner(
            self.make_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=3.0,
            # aiohttp arms this at accept and after each answer: it also closes a connection that never
            # finishes its request head (aiohttp has no separate header timeout)
            keepalive_timeout=self.cfg.client_idle_timeout,
            # after an answer sent before the body was read (408, 413) the rest of the body is read and
            # dropped for at most this long, then the connection closes
            lingering_time=min(10.0, self.cfg.client_body_timeout),
        )
        await self._runner.setup()
        if self.cfg.worker_urls:  # no agents: the workers are static instances (router/static_workers.py)
            await self._start_workers()
        if bind:
            await self.bind()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="router-tick")
        log.info(
            "router %s, policy %s, %d agent(s), tokenizer %s",
            f"listening on {self.url}" if bind else "started without its HTTP port",
            self.core.policy.name,
            len(self.cfg.agents),
            self.tokenizer.name,
        )

    async def _start_workers(self) -> None:
        session = self.dispatcher.session
        assert session is not None
        cfg = self.cfg
        await declare_workers(
            self.core,
            session,
            cfg.worker_urls,
            block_size=cfg.block_size,
            capacity_tokens=cfg.routed_cache_tokens,
            startup_timeout=cfg.worker_startup_timeout,
        )
        self._prober = WorkerProber(self.core, session, cfg.suspect_cooldown)
        self._prober.start()

    async def bind(self, sock: socket.socket | None = None) -> None:
        """Serve HTTP on ``cfg.host:cfg.port`` (``SO_REUSEADDR``; ``SO_REUSEPORT`` only in a worker of
        ``--workers N``, whose siblings listen there too: otherwise the bind fails while another router
        listens there), or on ``sock``, already bound and listening. Raises ``OSError``."""
        assert self._runner is not None, "server not started"
        if sock is None:
            site: web.BaseSite = web.TCPSite(
                self._runner,
                self.cfg.host,
                self.cfg.port,
                reuse_address=True,
                reuse_port=self.cfg.worker_index is not None,
                ssl_context=self.ssl,
            )
        else:
            site = web.SockSite(self._runner, sock, ssl_context=self.ssl)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def unbind(self) -> None:
        """Stop listening on the HTTP port (requests already accepted finish). Idempotent."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()

    async def warm_up(self, timeout: float) -> bool:
        """Wait until every configured agent has a routable instance, at most ``timeout`` seconds.

        Returns whether they all have (the router serves either way; this only delays readiness so that
        a launcher's first request does not meet an empty index).
        """
        want = len(set(self.cfg.agents))
        deadline = time.monotonic() + timeout
        while self.core.routable_count() < want:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        """Stop serving and close every socket. Safe to call twice or after a failed start."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._prober is not None:
            await self._prober.stop()
            self._prober = None
        tasks = [t for t in (self._ticker, *self._fetches) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ticker = None
        self._fetches.clear()
        session = self.dispatcher.session
        if session is not None:
            await self.dispatcher.close()
            await session.close()
            self.dispatcher.session = None
        await self.subscriber.close()

    async def _tick_loop(self) -> None:
        period = tick_period(self.cfg)
        while True:
            try:
                self.core.tick()
                self.dispatcher.tick(time.monotonic())
                self.admission.wake()  # the limit follows the routable instances
            except Exception:  # a bug here must not stop heartbeat checks forever
                log.exception("router tick failed")
            await asyncio.sleep(period)

    def _request_snapshot(self, job: SnapshotJob) -> None:
        task = asyncio.get_running_loop().create_task(self._fetch(job), name=f"snapshot:{job.instance}")
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch(self, job: SnapshotJob) -> None:
        try:
            snap = await fetch_snapshot(self.subscriber.ctx, job.endpoint, self.cfg.snapshot_timeout)
        except SnapshotError as exc:
            self.core.on_snapshot_failed(job, exc.reason)
            return
        except Exception:  # the core must always hear back, or the instance would never resync
            log.exception("snapshot fetch from %s failed", job.endpoint)
            self.core.on_snapshot_failed(job, "internal")
            return
        self.core.on_snapshot(job, snap)

    # -------------------------------------------------------------------------------------- handlers

    async def _handle_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": self._started_at, "owned_by": "sglang", "root": m}
            for m in self.core.models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _handle_health(self, request: web.Request) -> web.Response:
        up = self.core.instances_up()
        if up == 0:
            return unavailable("no live engine instance")
        return web.json_response(
            {"status": "ok", "instances_up": up, "instances_routable": self.core.routable_count()}
        )

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def _handle_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state_json())

    def state_json(self) -> dict[str, Any]:
        """``GET /router/state``: the core's dump, the subscriber's counters, and the HA section."""
        state = self.core.state_json()
        state["process"] = {"pid": os.getpid(), "worker": self.cfg.worker_index}
        ss = self.subscriber.stats
        state["subscriber"] = {
            "endpoints": list(self.subscriber.endpoints),
            "frames": dict(ss.frames),
            "malformed": dict(ss.malformed),
            "discontinuities": dict(ss.discontinuities),
            "lost_frames": ss.lost_frames,
        }
        state["forwarding"] = self.dispatcher.state_json()
        adm = self.admission
        state["admission"] = {
            "inflight": adm.inflight,
            "queued": adm.queued,
            "limit": adm.limit(),
            "rejected": dict(adm.rejected),
            "instance_limits": None if self.limits is None else self.limits.snapshot(),
        }
        if self.extra_state is not None:
            state["ha"] = self.extra_state()
        return state
