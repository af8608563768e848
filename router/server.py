"""The router's HTTP shell (aiohttp on uvloop) around :class:`router.model.model.RoutingModel`.

``RouterServer`` holds the runtime state and has ``start()`` / ``stop()``; :func:`router.main.serve`
runs one inside its HA node until SIGINT/SIGTERM and is embeddable; :func:`router.main.main` is
``python -m router``.

Tasks inside one event loop: one reader per agent SUB socket (frames go straight into the core), a ticker
(heartbeat timeouts, snapshot retries, speculative expiry), a short-lived task per snapshot fetch, and
aiohttp's request handlers. All of them call the core synchronously, so the core has a single owner: the
loop.

Endpoints: ``POST /generate``, ``/v1/completions``, ``/v1/chat/completions`` (parsed with
:mod:`kvindex.protocol.http`, tokenized, routed, forwarded by :mod:`router.forward`); ``GET /v1/models``,
``/health``, ``/metrics``, ``/router/state``. Every error body is :func:`kvindex.protocol.http.error_body`,
aiohttp's own 404 and 405 included (:func:`json_http_errors`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from kvindex.hashing import BlockHash, PrefixHashCache
from kvindex.protocol.http import PARSERS, PATHS, GenerationRequest, RequestError, error_body
from kvindex.protocol.tokenizer import Tokenizer, load_tokenizer
from router.config import RouterConfig
from router.decisions import DecisionPublisher
from router.forward import ConnectFailed, Outcome, forward
from router.metrics import RouterMetrics
from router.model.model import NoLiveInstance, RoutingModel, SnapshotJob
from router.static_workers import WorkerProber, declare_workers
from router.subscriber import Received, SnapshotError, Subscriber, fetch_snapshot

log = logging.getLogger(__name__)

THREAD_WORK_SIZE = 65536
"""Prompts longer than this (characters or token ids) are tokenized and block-hashed in a worker thread,
and bodies longer than 16x this (bytes) JSON-decoded there, so the event loop keeps serving."""


def _error(status: int, message: str, param: str | None = None, type_: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, type_), status=status)


def _unavailable(message: str) -> web.Response:
    return _error(503, message, type_="service_unavailable")


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
        resp = _error(exc.status, message)
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
        self.prefix_hashes = PrefixHashCache()
        """Block hashing for every request: digests of a prefix an earlier request shared are reused."""
        self.port = 0
        self._started_at = int(time.time())
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._fetches: set[asyncio.Task[None]] = set()
        self._prober: WorkerProber | None = None
        self.decisions: DecisionPublisher | None = None
        """Where decisions and request ends are published (set by :class:`router.ha.HANode`)."""
        self.extra_state: Callable[[], dict[str, Any]] | None = None
        """Adds the ``ha`` section to ``GET /router/state``."""

    def _on_agent_message(self, rec: Received) -> None:
        """Record how stale the stream is, then hand the frame to the core."""
        self.metrics.observe_stream_age(rec.msg, time.time())
        self.core.on_message(rec)

    @property
    def url(self) -> str:
        """``http://host:port`` actually bound (valid after :meth:`start`)."""
        return f"http://{self.cfg.host}:{self.port}"

    # ------------------------------------------------------------------------------------- lifecycle

    def make_app(self) -> web.Application:
        """The aiohttp application (routes only; no sockets)."""
        app = web.Application(client_max_size=self.cfg.max_payload_size, middlewares=[json_http_errors])
        for path in PATHS:
            app.router.add_post(path, self._handle_generation)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/router/state", self._handle_state)
        return app

    async def start(self, *, bind: bool = True) -> None:
        """Subscribe to the agents, bind the HTTP port (unless not ``bind``: a standby binds later with
        :meth:`bind`), start the ticker. Raises ``OSError`` if the port cannot be bound and
        ``zmq.ZMQError`` for a malformed agent endpoint."""
        self.subscriber.start()
        connect = min(10.0, self.cfg.request_timeout)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=8192, limit_per_host=4096, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout, sock_connect=connect),
        )
        self._runner = web.AppRunner(
            self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=3.0
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
        assert self._session is not None
        cfg = self.cfg
        await declare_workers(
            self.core,
            self._session,
            cfg.worker_urls,
            block_size=cfg.block_size,
            capacity_tokens=cfg.routed_cache_tokens,
            startup_timeout=cfg.worker_startup_timeout,
        )
        self._prober = WorkerProber(self.core, self._session, cfg.suspect_cooldown)
        self._prober.start()

    async def bind(self, sock: socket.socket | None = None) -> None:
        """Serve HTTP on ``cfg.host:cfg.port`` (``SO_REUSEADDR``, never ``SO_REUSEPORT``, so it fails
        while another router listens there), or on ``sock``, already bound and listening. Raises
        ``OSError``."""
        assert self._runner is not None, "server not started"
        if sock is None:
            site: web.BaseSite = web.TCPSite(
                self._runner, self.cfg.host, self.cfg.port, reuse_address=True, reuse_port=False
            )
        else:
            site = web.SockSite(self._runner, sock)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

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
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.subscriber.close()

    async def _tick_loop(self) -> None:
        period = min(0.1, self.cfg.heartbeat_timeout / 4)
        while True:
            try:
                self.core.tick()
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

    async def _handle_generation(self, request: web.Request) -> web.StreamResponse:
        endpoint = PATHS[request.path]
        arrived = time.monotonic()
        label = "client_closed"
        try:
            try:
                out = await self._generation(request, endpoint, arrived)
            except Exception:  # a router bug: answer with a JSON error, not aiohttp's HTML 500
                log.exception("internal error on %s", request.path)
                out = Outcome(_error(500, "internal router error"), "500")
            label = out.label
            if out.ttft is not None:
                self.metrics.ttft.observe(out.ttft)
            if out.tpot is not None:
                self.metrics.tpot.observe(out.tpot)
            if out.e2e is not None:
                self.metrics.e2e.observe(out.e2e)
            return out.response
        finally:
            self.metrics.requests.labels(endpoint, label).inc()

    async def _generation(self, request: web.Request, endpoint: str, arrived: float) -> Outcome:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return Outcome(_error(413, f"request body larger than {self.cfg.max_payload_size} bytes"), "413")
        try:
            body = (
                await asyncio.to_thread(json.loads, raw)
                if len(raw) > 16 * THREAD_WORK_SIZE
                else json.loads(raw)
            )
        except ValueError as exc:
            return Outcome(_error(400, f"request body is not valid JSON: {exc}"), "400")
        try:
            req = PARSERS[endpoint](body)
        except RequestError as exc:
            return Outcome(_error(exc.status, exc.message, exc.param, exc.type), str(exc.status))
        if self.core.routable_count() == 0:
            return Outcome(_unavailable("no live engine instance to serve the request"), "503")
        model = req.model if endpoint != "generate" else None
        if model is not None and not self.core.serves_model(model):
            served = ", ".join(self.core.models()) or "none"
            msg = f"model {model!r} is not served by any live instance (served: {served})"
            return Outcome(_error(400, msg, param="model"), "400")
        try:
            ids, hashes = await self._tokenize(req)
        except RequestError as exc:
            return Outcome(_error(exc.status, exc.message, exc.param, exc.type), str(exc.status))
        return await self._route_and_forward(request, req, raw, ids, hashes, model, arrived)

    async def _tokenize(self, req: GenerationRequest) -> tuple[Sequence[int], list[BlockHash] | None]:
        """The prompt's token ids and, once the block size is known, its block hashes (reusing the
        digests of a prefix an earlier request shared, :class:`PrefixHashCache`); off the loop for a
        long prompt."""
        size = len(req.text or req.input_ids or ()) + sum(
            len(str(m.get("content"))) for m in req.messages or ()
        )
        block_size = self.core.block_size  # fixed once learned, so hashes stay valid for the index

        def work() -> tuple[Sequence[int], list[BlockHash] | None]:
            ids = (
                self.tokenizer.encode_ids(req.text)
                if req.text is not None
                else req.prompt_ids(self.tokenizer)
            )
            return ids, self.prefix_hashes.block_hashes(ids, block_size) if block_size else None

        if size <= THREAD_WORK_SIZE:
            return work()
        return await asyncio.to_thread(work)

    async def _route_and_forward(
        self,
        request: web.Request,
        req: GenerationRequest,
        raw: bytes,
        ids: Sequence[int],
        hashes: Sequence[int] | None,
        model: str | None,
        arrived: float,
    ) -> Outcome:
        assert self._session is not None, "server not started"
        tried: list[str] = []
        while True:
            try:
                routed = self.core.route(ids, hashes=hashes, model=model, exclude=tried)
            except NoLiveInstance as exc:
                if tried:
                    msg = f"engine(s) {', '.join(tried)} unreachable and no other live engine instance"
                    return Outcome(_error(502, msg, type_="server_error"), "502")
                return Outcome(_unavailable(f"{exc} to serve the request"), "503")
            self.metrics.observe_decision(routed.decision, len(ids))
            if self.decisions is not None:
                self.decisions.routed(routed, len(ids), request.headers.get("X-Request-Id"))
            status = "client_closed"  # unless forward returns or raises something else
            try:
                out = await forward(
                    self._session, request, routed.engine_url + request.path_qs, raw, req.stream, arrived
                )
                status = out.label
                return out
            except ConnectFailed as exc:
                status = "connect_failed"
                log.warning("engine of %s unreachable (%s)", routed.instance, exc)
                self.core.mark_suspect(routed.instance)
                tried.append(routed.instance)
                if len(tried) > self.cfg.max_retries:
                    msg = f"engine of instance {routed.instance} unreachable: {exc}"
                    return Outcome(_error(502, msg, type_="server_error"), "502")
                self.metrics.retries.inc()
            finally:
                self.core.finish(routed.instance, routed.ticket)
                if self.decisions is not None:
                    self.decisions.finished(routed, status)

    async def _handle_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": self._started_at, "owned_by": "sglang", "root": m}
            for m in self.core.models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _handle_health(self, request: web.Request) -> web.Response:
        up = self.core.instances_up()
        if up == 0:
            return _unavailable("no live engine instance")
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
        ss = self.subscriber.stats
        state["subscriber"] = {
            "endpoints": list(self.subscriber.endpoints),
            "frames": dict(ss.frames),
            "malformed": dict(ss.malformed),
            "discontinuities": dict(ss.discontinuities),
            "lost_frames": ss.lost_frames,
        }
        if self.extra_state is not None:
            state["ha"] = self.extra_state()
        return state
