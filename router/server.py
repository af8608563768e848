"""The router's HTTP shell (aiohttp on uvloop) around :class:`router.model.model.RoutingModel`.

``RouterServer`` holds the runtime state and has ``start()`` / ``stop()``; :func:`router.main.serve`
runs one inside its HA node until SIGINT/SIGTERM and is embeddable; :func:`router.main.main` is
``python -m router``.

Tasks inside one event loop: one reader per agent SUB socket (frames go straight into the core), a ticker
(heartbeat timeouts, snapshot retries, speculative expiry), a short-lived task per snapshot fetch, and
aiohttp's request handlers. All of them call the core synchronously, so the core has a single owner: the
loop.

Endpoints: ``POST /generate``, ``/v1/completions``, ``/v1/chat/completions``; ``GET /v1/models``,
``/health``, ``/metrics``, ``/router/state``. Every error body is :func:`kvindex.protocol.http.error_body`,
aiohttp's own 404 and 405 included (:func:`json_http_errors`).

A generation request, in order: a ``Content-Length`` over the body limit is refused (413) before
anything else; admission (:mod:`router.admission`: a slot, or a place in the bounded queue, or 429 with
``Retry-After``) before the body is read, so a waiting request holds no body; the body is read (413
past the limit) and decoded and validated in one pass (:func:`kvindex.protocol.http.decode_request`,
400 naming the field); tokenized; then routed, forwarded and retried by :class:`router.dispatch.Dispatcher`.
docs/robustness.md has the defaults and why.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from kvindex.hashing import BlockHash, PrefixHashCache
from kvindex.protocol import LoadReport
from kvindex.protocol.http import PATHS, GenerationRequest, RequestError, decode_request, error_body
from kvindex.protocol.tokenizer import Tokenizer, load_tokenizer
from router import auth
from router.admission import Admission, Rejected
from router.config import RouterConfig
from router.decisions import DecisionPublisher
from router.dispatch import Dispatcher
from router.forward import Outcome
from router.metrics import RouterMetrics
from router.model.model import RoutingModel, SnapshotJob
from router.static_workers import WorkerProber, declare_workers
from router.subscriber import Received, SnapshotError, Subscriber, fetch_snapshot

log = logging.getLogger(__name__)

UPSTREAM_KEEPALIVE = 4.0
"""Seconds an idle pooled connection to an engine is kept: below SGLang's 5 s (uvicorn
``timeout_keep_alive``, docs/sglang-contract.md row 8), so the router never sends on a connection the
engine is closing."""
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
        self.access = auth.Access(cfg, self.metrics.registry)
        self.ssl = auth.server_ssl(cfg)
        self.middlewares: list[Any] = []
        """Extra aiohttp middlewares, inside the key check (the HA node's fence gate)."""
        self.dispatcher = Dispatcher(cfg, self.core, self.metrics)
        self.admission = Admission(self._inflight_limit, cfg.max_queue, cfg.queue_timeout)
        self.metrics.watch(self.admission, self.dispatcher.breakers, self.core)
        self.prefix_hashes = PrefixHashCache()
        """Block hashing for every request: digests of a prefix an earlier request shared are reused."""
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

    def _overloaded(self) -> bool:
        """Whether every routable instance has ``max_queued_prefill_tokens`` or more queued."""
        bound = self.cfg.max_queued_prefill_tokens
        if bound <= 0:
            return False
        views = self.core.table.views()
        return bool(views) and all(v.queued_prefill_tokens >= bound for v in views)

    def _inflight_limit(self) -> int:
        return self.cfg.max_inflight_per_instance * max(1, self.core.routable_count())

    def _on_agent_message(self, rec: Received) -> None:
        """Record how stale the stream is, then hand the frame to the core."""
        self.metrics.observe_stream_age(rec.msg, time.time())
        self.core.on_message(rec)
        if isinstance(rec.msg, LoadReport):
            self.dispatcher.on_load(rec.msg.instance, time.monotonic())

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
            app.router.add_post(path, self._handle_generation)
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
        """Serve HTTP on ``cfg.host:cfg.port`` (``SO_REUSEADDR``, never ``SO_REUSEPORT``, so it fails
        while another router listens there), or on ``sock``, already bound and listening. Raises
        ``OSError``."""
        assert self._runner is not None, "server not started"
        if sock is None:
            site: web.BaseSite = web.TCPSite(
                self._runner,
                self.cfg.host,
                self.cfg.port,
                reuse_address=True,
                reuse_port=False,
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
        period = min(0.1, self.cfg.heartbeat_timeout / 4)
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

    async def _handle_generation(self, request: web.Request) -> web.StreamResponse:
        endpoint = PATHS[request.path]
        arrived = time.monotonic()
        label = "client_closed"
        try:
            try:
                out = await self._admitted(request, endpoint, arrived)
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

    def _too_large(self) -> Outcome:
        self.metrics.rejected.labels("body_too_large").inc()
        msg = f"request body larger than {self.cfg.max_body_size} bytes (--max-body-size)"
        return Outcome(_error(413, msg, type_="request_too_large"), "413")

    def _body_timeout(self) -> Outcome:
        self.metrics.rejected.labels("body_timeout").inc()
        msg = f"request body not received: nothing arrived for {self.cfg.client_body_timeout:g} s (--client-body-timeout)"
        resp = _error(408, msg, type_="request_timeout")
        resp.force_close()  # the rest of the body may still come: never read it as the next request
        return Outcome(resp, "408")

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, at most ``client_body_timeout`` s between two chunks (a slow sender cannot hold
        an admission slot for long). Raises ``asyncio.TimeoutError`` after such a gap,
        ``web.HTTPRequestEntityTooLarge`` above ``max_body_size``, ``aiohttp.ClientPayloadError`` or
        ``ConnectionResetError`` if the client went away mid-body."""
        limit, gap = self.cfg.max_body_size, self.cfg.client_body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await asyncio.wait_for(request.content.readany(), gap)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            chunks.append(chunk)

    async def _admitted(self, request: web.Request, endpoint: str, arrived: float) -> Outcome:
        """Body-size check, then admission (a slot held until the answer is complete), then the rest."""
        if request.content_length is not None and request.content_length > self.cfg.max_body_size:
            return self._too_large()
        try:
            if self._overloaded():
                self.admission.rejected["overloaded"] += 1
                raise Rejected("overloaded")
            waited = await self.admission.acquire()
        except Rejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            retry_after = max(1, math.ceil(self.cfg.queue_timeout))
            why = {
                "queue_full": "its queue is full",
                "queue_timeout": "no slot freed in time",
                "overloaded": "every engine's prefill queue is full",
            }
            msg = f"the router is at capacity: {why[exc.reason]}; retry after {retry_after} s"
            resp = _error(429, msg, type_="rate_limit_exceeded")
            resp.headers["Retry-After"] = str(retry_after)
            return Outcome(resp, "429")
        self.metrics.queue_wait.observe(waited)
        try:
            return await self._generation(request, endpoint, arrived)
        finally:
            self.admission.release()

    async def _generation(self, request: web.Request, endpoint: str, arrived: float) -> Outcome:
        try:
            raw = await self._read_body(request)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except asyncio.TimeoutError:
            return self._body_timeout()
        try:
            if len(raw) > 16 * THREAD_WORK_SIZE:
                req = await asyncio.to_thread(decode_request, PATHS[request.path], raw)
            else:
                req = decode_request(PATHS[request.path], raw)
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
            n_tokens, hashes = await self._tokenize(req)
        except RequestError as exc:
            return Outcome(_error(exc.status, exc.message, exc.param, exc.type), str(exc.status))
        rid, stream = req.rid, req.stream
        del req  # the token ids are no longer needed: only the hashes are kept while the request runs
        return await self.dispatcher.dispatch(request, raw, rid, stream, n_tokens, hashes, model, arrived)

    async def _tokenize(self, req: GenerationRequest) -> tuple[int, list[BlockHash]]:
        """The prompt's length in tokens and its full blocks' hashes, reusing the digests of a prefix an
        earlier request shared (:class:`PrefixHashCache`); off the loop for a long prompt."""
        block_size = self.core.block_size  # fixed once learned (known: an instance is routable)
        assert block_size is not None

        def work() -> tuple[int, list[BlockHash]]:
            ids = (
                self.tokenizer.encode_ids(req.text)
                if req.text is not None
                else req.prompt_ids(self.tokenizer)
            )
            return len(ids), self.prefix_hashes.block_hashes(ids, block_size)

        if req.prompt_size <= THREAD_WORK_SIZE:
            return work()
        return await asyncio.to_thread(work)

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
        state["forwarding"] = self.dispatcher.state_json()
        adm = self.admission
        state["admission"] = {
            "inflight": adm.inflight,
            "queued": adm.queued,
            "limit": adm.limit(),
            "rejected": dict(adm.rejected),
        }
        if self.extra_state is not None:
            state["ha"] = self.extra_state()
        return state
