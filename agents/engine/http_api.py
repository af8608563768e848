"""The emulated engine's HTTP API (aiohttp), the subset of SGLang 0.5.23's that the cluster uses.

Routes: ``POST /generate``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /health_generate``, ``GET /model_info``, ``GET /server_info``, ``GET /v1/loads``,
``GET|POST /flush_cache``, ``GET /metrics``. Bodies: :mod:`agents.engine.openai_format`.

Requests are parsed by :mod:`router.protocol` (exactly as the router parses them). Client errors
(malformed JSON, bad fields, an unknown ``model`` on ``/v1`` endpoints, a prompt too long) answer 400
with the OpenAI error body; no client input yields a 500. A client that disconnects aborts its request
in the core, which frees its KV.

``GET /v1/loads`` answers ``{"timestamp": unix_s, "loads": [{"dp_rank": 0, <every LoadStat field>,
"token_usage": num_tokens / max_total_num_tokens, "cache_hit_rate"}]}`` (one entry: the engine is one
DP rank).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agents.engine.core import Request, RequestRejected, TokenOutput
from agents.engine.openai_format import Progress, final_body, stream_chunks
from agents.engine.words import words_text
from router.protocol import PARSERS, Endpoint, RequestError, error_body

if TYPE_CHECKING:
    from agents.engine.server import EngineServer

log = logging.getLogger("agents.engine.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 131k-token prompt as a JSON id list is ~1 MB; leave room


def error_response(
    status: int, message: str, param: str | None = None, type_: str | None = None
) -> web.Response:
    """JSON error in the OpenAI shape (:func:`router.protocol.error_body`)."""
    return web.json_response(error_body(status, message, param, type_), status=status)


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
    """Route handlers over one :class:`EngineServer`."""

    def __init__(self, srv: EngineServer) -> None:
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
                raise RequestError(f"malformed JSON body: {str(exc)[:200]}") from None
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
            return error_response(exc.status, exc.message, exc.param, exc.type)
        except RequestRejected as exc:
            return error_response(400, str(exc))
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
            if p.finish == "abort":
                return error_response(503, p.abort_message, type_="server_error")
            return web.json_response(final_body(p))
        finally:
            if p.finish is None:  # client went away (handler cancelled or write failed)
                srv.cancel(rid)

    def _apply(self, p: Progress, out: TokenOutput | None, arrival: float) -> None:
        if out is None:
            p.finish, p.abort_message = "abort", "the server is shutting down"
            return
        if out.token_ids:
            p.output_ids.extend(out.token_ids)
            p.text += words_text(out.token_ids, first=not p.text)  # readable words, agents/engine/words.py
        p.cached_tokens = out.cached_tokens
        if out.finish_reason is not None:
            p.e2e_latency = asyncio.get_running_loop().time() - arrival
            p.finish = out.finish_reason

    async def _stream(
        self, request: web.Request, p: Progress, queue: asyncio.Queue[TokenOutput | None], arrival: float
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
        """200 while the scheduler loop runs (``/health_generate`` too: the loop is what generates)."""
        if not self.srv.alive:
            return web.Response(status=503, text="scheduler not running")
        return web.Response(text="")

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
        entry["token_usage"] = stat.num_tokens / max(1, stat.max_total_num_tokens)
        entry["cache_hit_rate"] = core.cache_hit_rate
        return web.json_response({"timestamp": time.time(), "loads": [entry]})

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
