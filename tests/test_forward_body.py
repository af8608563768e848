"""A request body is kept for the retries and dropped once a stream reached the client
(``router.forward.RequestBody``), over real sockets: a client-facing aiohttp app calls :func:`forward`
against a scripted engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from router.forward import Attempt, AttemptFailed, RequestBody, Timeouts, forward
from tests.test_robustness import ScriptedEngine

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def engine() -> AsyncIterator[ScriptedEngine]:
    eng = ScriptedEngine("e0")
    await eng.start()
    yield eng
    await eng.stop()


async def _through_forward(engine: ScriptedEngine, body: RequestBody) -> tuple[int, bytes, str | None]:
    """One streamed request through :func:`forward`; returns the client's status and bytes and the kind
    of the attempt's failure (None when it did not fail)."""
    failed: list[str] = []
    timeouts = Timeouts(connect=1.0, headers=1.0, idle=1.0, total=5.0)
    async with aiohttp.ClientSession() as upstream:

        async def handle(request: web.Request) -> web.StreamResponse:
            att = Attempt("e0", asyncio.current_task())
            try:
                out = await forward(
                    upstream, request, engine.url + "/generate", body, True, time.monotonic(), timeouts, att
                )
            except AttemptFailed as exc:
                failed.append(exc.kind)
                return exc.fallback.response
            return out.response

        app = web.Application()
        app.router.add_post("/generate", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            url = f"http://127.0.0.1:{port}/generate"
            async with aiohttp.ClientSession() as client, client.post(url, data=b'{"text": "hi"}') as resp:
                data = await resp.read()
                return resp.status, data, failed[0] if failed else None
        finally:
            await runner.cleanup()


async def test_a_stream_that_reached_the_client_drops_the_body(engine: ScriptedEngine) -> None:
    body = RequestBody(b'{"text": "hi", "stream": true}')
    status, data, failed = await _through_forward(engine, body)
    assert (status, failed) == (200, None)
    assert data.endswith(b"data: [DONE]\n\n")
    assert engine.received == [{"text": "hi", "stream": True}]
    assert body.data is None


async def test_a_failure_before_the_first_chunk_keeps_the_body_for_a_retry(engine: ScriptedEngine) -> None:
    engine.mode = "die_before_first"
    raw = b'{"text": "hi", "stream": true}'
    body = RequestBody(raw)
    status, _, failed = await _through_forward(engine, body)
    assert (status, failed) == (502, "broken")
    assert body.data == raw
