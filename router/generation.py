"""The router's generation endpoints (``POST /generate``, ``/v1/completions``, ``/v1/chat/completions``):
one request, in order, from its ``Content-Length`` to the dispatcher.

A ``Content-Length`` over the body limit is refused (413) before anything else; admission
(:mod:`router.admission`: a slot, or a place in the bounded queue, or 429 with ``Retry-After``) before the
body is read, so a waiting request holds no body; the body is read (413 past the limit, 408 after a
``client_body_timeout`` gap) and decoded and validated in one pass
(:func:`kvindex.protocol.http.decode_request`, 400 naming the field); tokenized and block-hashed (off the
loop when long); then routed, forwarded and retried by :class:`router.dispatch.Dispatcher`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

from aiohttp import web

from kvindex.hashing import BlockHash, PrefixHashCache
from kvindex.protocol.http import PATHS, GenerationRequest, RequestError, decode_request, error_body
from kvindex.protocol.tokenizer import Tokenizer
from router.admission import Admission, Rejected
from router.config import RouterConfig
from router.dispatch import Dispatcher
from router.forward import Outcome, RequestBody, with_rid
from router.metrics import RouterMetrics
from router.model.model import RoutingModel

__all__ = ["THREAD_WORK_SIZE", "Generation", "error_response", "unavailable"]

log = logging.getLogger("router.server")  # the server's logger: its log lines keep their name

THREAD_WORK_SIZE = 65536
"""Prompts longer than this (characters or token ids) are tokenized and block-hashed in a worker thread,
and bodies longer than 16x this (bytes) JSON-decoded there, so the event loop keeps serving."""


def error_response(
    status: int, message: str, param: str | None = None, type_: str | None = None
) -> web.Response:
    """An OpenAI-style JSON error (:func:`kvindex.protocol.http.error_body`) with HTTP ``status``."""
    return web.json_response(error_body(status, message, param, type_), status=status)


def unavailable(message: str) -> web.Response:
    """503 ``service_unavailable``."""
    return error_response(503, message, type_="service_unavailable")


class Generation:
    """The generation handler of one router: the parts of :class:`router.server.RouterServer` a request
    goes through. Every method runs on the router's event loop."""

    def __init__(
        self,
        cfg: RouterConfig,
        core: RoutingModel,
        tokenizer: Tokenizer,
        metrics: RouterMetrics,
        admission: Admission,
        dispatcher: Dispatcher,
    ) -> None:
        self.cfg = cfg
        self.core = core
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.admission = admission
        self.dispatcher = dispatcher
        self.prefix_hashes = PrefixHashCache()
        """Block hashing for every request: digests of a prefix an earlier request shared are reused."""

    def overloaded(self) -> bool:
        """Whether every routable instance has ``max_queued_prefill_tokens`` or more queued."""
        bound = self.cfg.max_queued_prefill_tokens
        if bound <= 0:
            return False
        views = self.core.table.views()
        return bool(views) and all(v.queued_prefill_tokens >= bound for v in views)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One generation request (any of :data:`PATHS`), start to end; counts it by outcome."""
        endpoint = PATHS[request.path]
        arrived = time.monotonic()
        label = "client_closed"
        try:
            try:
                out = await self._admitted(request, endpoint, arrived)
            except Exception:  # a router bug: answer with a JSON error, not aiohttp's HTML 500
                log.exception("internal error on %s", request.path)
                out = Outcome(error_response(500, "internal router error"), "500")
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
        return Outcome(error_response(413, msg, type_="request_too_large"), "413")

    def _body_timeout(self) -> Outcome:
        self.metrics.rejected.labels("body_timeout").inc()
        msg = f"request body not received: nothing arrived for {self.cfg.client_body_timeout:g} s (--client-body-timeout)"
        resp = error_response(408, msg, type_="request_timeout")
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
            if self.overloaded():
                self.admission.rejected["overloaded"] += 1
                raise Rejected("overloaded")
            waited = await self.admission.acquire()
        except Rejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            retry_after = max(1, math.ceil(self.cfg.queue_timeout))
            why = {
                "queue_full": "its queue is full",
                "queue_wait": f"a slot is more than {self.cfg.max_queue_wait:g} s away",
                "queue_timeout": "no slot freed in time",
                "overloaded": "every engine's prefill queue is full",
            }
            msg = f"the router is at capacity: {why[exc.reason]}; retry after {retry_after} s"
            resp = error_response(429, msg, type_="rate_limit_exceeded")
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
            return Outcome(error_response(exc.status, exc.message, exc.param, exc.type), str(exc.status))
        if self.core.routable_count() == 0:
            return Outcome(unavailable("no live engine instance to serve the request"), "503")
        model = req.model if endpoint != "generate" else None
        if model is not None and not self.core.serves_model(model):
            served = ", ".join(self.core.models()) or "none"
            msg = f"model {model!r} is not served by any live instance (served: {served})"
            return Outcome(error_response(400, msg, param="model"), "400")
        try:
            n_tokens, hashes = await self._tokenize(req)
        except RequestError as exc:
            return Outcome(error_response(exc.status, exc.message, exc.param, exc.type), str(exc.status))
        rid, stream = req.rid, req.stream
        del req  # the token ids are no longer needed: only the hashes are kept while the request runs
        if rid is None:  # one body for every attempt: the caller's copy is this one, not a second
            rid = f"lmr-{os.urandom(16).hex()}"  # as unguessable as uuid4, a quarter of its cost
            raw = with_rid(raw, rid)
        body = RequestBody(raw)
        del raw  # the holder's reference is the only one: a started stream drops it (RequestBody)
        return await self.dispatcher.dispatch(request, body, rid, stream, n_tokens, hashes, model, arrived)

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
