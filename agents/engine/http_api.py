"""The emulated engine's HTTP API (aiohttp), the subset of SGLang 0.5.23's that the cluster uses.

Routes: ``POST /generate``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /health_generate``, ``GET /ready``, ``GET /model_info``, ``GET /server_info``,
``GET /v1/loads``, ``GET|POST /flush_cache``, ``POST /abort_request``, ``GET /metrics``. Bodies:
:mod:`agents.engine.openai_format`. Every behaviour here that a client can see is pinned against
SGLang's source in docs/sglang-contract.md.

Requests are parsed by :mod:`kvindex.protocol.http` (exactly as the router parses them); no client input
yields a 500. Client errors answer 400 with SGLang's bodies, which differ by endpoint
(``srt/entrypoints/http_server.py``):

* a body that is not JSON (FastAPI's ``RequestValidationError``, ``validation_exception_handler``):
  the flat ``ErrorResponse`` ``{"object": "error", "message", "type": "Bad Request", "param": null,
  "code": 400}`` on every endpoint;
* ``/generate`` rejecting a request (``generate_request`` -> ``_create_error_response`` on the
  tokenizer's ``ValueError``, e.g. a prompt reaching the context length): ``{"error": {"message"}}``;
* ``/v1/*`` rejecting a request (``OpenAIServingBase.handle_request`` -> ``create_error_response``):
  the flat ``ErrorResponse`` with ``"type": "BadRequestError"`` and ``param`` where one is known.

A client that disconnects aborts its request in the core, which frees its KV (SGLang aborts it too:
``TokenizerManager.create_abort_task`` and the ``is_disconnected`` checks of ``_wait_one_response``).

``GET /v1/loads`` answers as ``srt/entrypoints/v1_loads.py`` ``get_loads``: ``{"timestamp": ISO 8601,
"version", "accelerator": null, "num_accelerators": 1, "loads": [{"dp_rank": 0, <SGLang's core keys of
``srt/managers/load_snapshot.py``: num_running_reqs, num_waiting_reqs, num_waiting_uncached_tokens,
num_used_tokens, num_total_tokens, num_active_tokens, max_total_num_tokens, max_running_requests,
token_usage, cache_hit_rate, total_prefill_uncached_tokens, total_prefill_busy_us>, plus every LoadStat
field}]}`` (one entry: the engine is one DP rank; no optional sections).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from agents.engine.config import ServerConfig
from agents.engine.core import EngineCore, Request, RequestRejected, TokenOutput
from agents.engine.core_types import Aborted
from agents.engine.metrics import EngineMetrics
from agents.engine.openai_format import Progress, final_body, stream_chunks
from agents.engine.words import words_text
from kvindex.protocol.http import PARSERS, Endpoint, RequestError, error_body
from kvindex.protocol.tokenizer import Tokenizer


class EngineHost(Protocol):
    """What the routes need of the engine process (:class:`agents.engine.server.EngineServer`)."""

    cfg: ServerConfig
    core: EngineCore
    tokenizer: Tokenizer
    metrics: EngineMetrics

    @property
    def accepting_health(self) -> bool: ...
    @property
    def is_ready(self) -> bool: ...
    async def health_probe(self) -> bool: ...
    def submit(self, req: Request) -> asyncio.Queue[TokenOutput | Aborted]: ...
    def cancel(self, rid: str) -> None: ...
    def abort_requests(self, rid: str, abort_all: bool = False) -> int: ...
    def flush_cache(self) -> bool: ...
    def server_info(self) -> dict[str, Any]: ...


log = logging.getLogger("agents.engine.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 131k-token prompt as a JSON id list is ~1 MB; leave room


def error_response(
    status: int, message: str, param: str | None = None, type_: str | None = None
) -> web.Response:
    """JSON error in the OpenAI shape (:func:`kvindex.protocol.http.error_body`), for failures that are not a
    client's request being rejected (the server shutting down, an internal error, an unknown route)."""
    return web.json_response(error_body(status, message, param, type_), status=status)


def sglang_error(message: str, param: str | None = None, type_: str = "BadRequestError") -> web.Response:
    """400 with SGLang's flat ``ErrorResponse`` (``srt/entrypoints/openai/protocol.py``)."""
    body = {"object": "error", "message": message, "type": type_, "param": param, "code": 400}
    return web.json_response(body, status=400)


def rejected(endpoint: Endpoint, message: str, param: str | None = None) -> web.Response:
    """400 for a request the engine refuses, in the body SGLang's endpoint of that kind uses."""
    if endpoint == "generate":
        return web.json_response({"error": {"message": message}}, status=400)
    return sglang_error(message, param)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors as OpenAI JSON bodies; an unexpected exception is logged and answered 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")


class HttpApi:
    """Route handlers over one engine process (:class:`EngineHost`)."""

    def __init__(self, srv: EngineHost) -> None:
        self.srv = srv
        self.created = int(time.time())

    def app(self) -> web.Application:
        """The aiohttp application with every route (request bodies up to ``MAX_BODY_BYTES``)."""
        app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_post("/generate", self._endpoint("generate"))
        r.add_post("/v1/completions", self._endpoint("completions"))
        r.add_post("/v1/chat/completions", self._endpoint("chat"))
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)
        r.add_get("/ready", self.ready)
        r.add_post("/abort_request", self.abort_request)
        r.add_get("/model_info", self.model_info)
        r.add_get("/get_model_info", self.model_info)
        r.add_get("/server_info", self.server_info)
        r.add_get("/get_server_info", self.server_info)
        r.add_get("/v1/loads", self.loads)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_get("/metrics", self.metrics)
        return app

    # --------------------------------------------------------------------------------------- generation

    def _endpoint(self, endpoint: Endpoint) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.generation(request, endpoint)

        return handle

    async def generation(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        srv = self.srv
        arrival = asyncio.get_running_loop().time()
        try:
            try:
                body = json.loads(await request.read())
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
                return sglang_error(f"malformed JSON body: {str(exc)[:200]}", type_="Bad Request")
            greq = PARSERS[endpoint](body)
            if endpoint != "generate" and greq.model is not None and greq.model != srv.cfg.model_name:
                raise RequestError(
                    f"The model '{greq.model}' does not exist; this server serves '{srv.cfg.model_name}'.",
                    param="model",
                )
            prompt = greq.prompt_ids(srv.tokenizer)
            rid = greq.rid or uuid.uuid4().hex
            queue = srv.submit(Request(rid, tuple(prompt), greq.max_new_tokens, greq.ignore_eos, arrival))
        except RequestError as exc:
            if exc.status != 400:
                return error_response(exc.status, exc.message, exc.param, exc.type)
            return rejected(endpoint, exc.message, exc.param)
        except RequestRejected as exc:
            return rejected(endpoint, str(exc))
        p = Progress(
            rid=rid,
            endpoint=endpoint,
            model=srv.cfg.model_name,
            created=int(time.time()),
            include_usage=greq.include_usage,
            eos_token_id=srv.tokenizer.eos_token_id,
            prompt_tokens=len(prompt),
        )
        try:
            if greq.stream:
                return await self._stream(request, p, queue, arrival)
            while p.finish is None:
                self._apply(p, await queue.get(), arrival)
            if p.finish == "abort" and p.abort_status is not None:
                return error_response(p.abort_status, p.abort_message, type_="server_error")
            return web.json_response(final_body(p))
        finally:
            if p.finish is None:  # client went away (handler cancelled or write failed)
                srv.cancel(rid)

    def _apply(self, p: Progress, out: TokenOutput | Aborted, arrival: float) -> None:
        if isinstance(out, Aborted):
            p.finish, p.abort_message, p.abort_status = "abort", out.message, out.status_code
            return
        if out.token_ids:
            p.output_ids.extend(out.token_ids)
            p.text += words_text(out.token_ids, first=not p.text)  # readable words, agents/engine/words.py
        p.cached_tokens = out.cached_tokens
        if out.finish_reason is not None:
            p.e2e_latency = asyncio.get_running_loop().time() - arrival
            p.finish = out.finish_reason

    async def _stream(
        self, request: web.Request, p: Progress, queue: asyncio.Queue[TokenOutput | Aborted], arrival: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        interval, sent = self.srv.cfg.stream_interval, -1
        while p.finish is None:
            self._apply(p, await queue.get(), arrival)
            while not queue.empty() and p.finish is None:  # coalesce tokens that arrived together
                self._apply(p, queue.get_nowait(), arrival)
            if p.finish is not None or sent < 0 or p.completion_tokens - sent >= interval:
                sent = p.completion_tokens
                try:
                    await resp.write(b"".join(stream_chunks(p)))
                except ConnectionResetError:
                    break  # the finally of generation() aborts the request unless it finished
        if p.finish is not None:
            with contextlib.suppress(ConnectionResetError):
                await resp.write_eof()
        return resp

    # ------------------------------------------------------------------------------------- information

    async def models(self, request: web.Request) -> web.Response:
        cfg = self.srv.cfg
        model = {
            "id": cfg.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "sglang",
            "root": cfg.model_name,
            "max_model_len": cfg.context_length,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        """``/health`` and ``/health_generate`` as SGLang's ``health_generate`` (http_server.py).

        503 (empty body) at once while starting or exiting; with the generation probe off
        (``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0``) ``/health`` only answers 200 at once; otherwise
        200 after a probe of at least one second (:meth:`EngineServer.health_probe`), 503 if it timed out.
        """
        srv = self.srv
        if not srv.accepting_health:
            return web.Response(status=503)
        if request.path == "/health" and not srv.cfg.health_generation:
            return web.Response(status=200)
        return web.Response(status=200 if await srv.health_probe() else 503)

    async def ready(self, request: web.Request) -> web.Response:
        """``/ready`` (http_server.py ``ready``): 200 once up and not exiting, else 503; never probes."""
        return web.Response(status=200 if self.srv.is_ready else 503)

    async def abort_request(self, request: web.Request) -> web.Response:
        """``POST /abort_request`` ``{"rid": str, "abort_all": bool}`` (http_server.py ``abort_request``).

        200 with an empty body, whether or not the rid was known (SGLang ignores unknown rids, and an
        empty rid without ``abort_all``). The aborted request ends with ``finish_reason``
        ``{"type": "abort", "message": "Aborted", ...}`` (a 200 response, not an error).
        """
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError) as exc:
            return sglang_error(f"malformed JSON body: {str(exc)[:200]}", type_="Bad Request")
        if not isinstance(body, dict):
            return sglang_error("request body must be a JSON object", type_="Bad Request")
        rid, abort_all = body.get("rid") or "", body.get("abort_all", False)
        if not isinstance(rid, str) or not isinstance(abort_all, bool):
            return sglang_error("'rid' must be a string and 'abort_all' a boolean", type_="Bad Request")
        self.srv.abort_requests(rid, abort_all)
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.srv.cfg.model_name,
                "tokenizer_path": self.srv.tokenizer.name,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.srv.server_info())

    async def loads(self, request: web.Request) -> web.Response:
        core = self.srv.core
        stat = core.load_stat()
        entry: dict[str, Any] = {"dp_rank": 0, **dataclasses.asdict(stat)}
        entry["num_used_tokens"] = stat.num_tokens
        entry["num_active_tokens"] = stat.num_total_tokens
        entry["token_usage"] = stat.num_tokens / max(1, stat.max_total_num_tokens)
        entry["cache_hit_rate"] = core.cache_hit_rate
        body = {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": "0.5.23-emulated",
            "accelerator": None,
            "num_accelerators": 1,
            "loads": [entry],
        }
        return web.json_response(body)

    async def flush_cache(self, request: web.Request) -> web.Response:
        """200 ``Cache flushed.`` when idle (emits ``AllBlocksCleared``), else 400 as SGLang."""
        if request.method not in ("GET", "POST"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
        if not self.srv.flush_cache():
            return web.Response(status=400, text="Cache not flushed because there are pending requests.\n")
        return web.Response(text="Cache flushed.\n")

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.srv.metrics.render(self.srv.core)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
