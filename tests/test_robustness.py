"""Forwarding that fails fast and recovers, and overload, over real sockets (issue 13 parts 2, 3 and 6).

The router runs in-process with fake agents (tests/test_router.py's) on loopback; engines are scripted
aiohttp apps (:class:`ScriptedEngine`) or a raw TCP server that accepts and never answers. Timeouts are
set small so that every wait is bounded; assertions are on outcomes and counters, and on timing only
with wide margins (a fast failure vs a timeout many times longer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from router.admission import Admission, Rejected
from router.breaker import CLOSED, HALF_OPEN, OPEN, Breakers
from router.forward import with_rid
from tests.test_router import PROMPT, cluster, stored, wait_until

pytestmark = pytest.mark.timeout(60)

FAST = {
    "connect_timeout": 0.5,
    "headers_timeout": 0.4,
    "idle_timeout": 0.6,
    "request_timeout": 5.0,
    "retry_backoff": 0.0,
}


class ScriptedEngine:
    """An engine whose behaviour a test sets with ``mode``; records bodies and ``/abort_request`` rids.

    Modes: ``ok`` (3 events then ``[DONE]``; JSON when not streamed), ``hang`` (never answers),
    ``die_mid_stream`` (one event, then the connection is cut), ``die_before_first`` (headers, then cut),
    ``gate`` (one event, then waits for ``gate``), ``status`` (answers ``status``), ``slow`` (``chunks``
    events, ``pause`` s apart).
    """

    def __init__(self, name: str, keepalive: float = 75.0) -> None:
        self.name = name
        self.mode = "ok"
        self.status = 500
        self.chunks = 3
        self.pause = 0.0
        self.gate = asyncio.Event()
        self.received: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.url = ""
        self._keepalive = keepalive
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._handle)
        app.router.add_post("/abort_request", self._abort)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, keepalive_timeout=self._keepalive
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def event(self, i: int) -> bytes:
        return f'data: {{"text": "{self.name}-{i}"}}\n\n'.encode()

    async def _abort(self, request: web.Request) -> web.Response:
        self.aborted.append((await request.json())["rid"])
        return web.Response()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "status":
            return web.json_response({"error": {"message": "busy", "code": self.status}}, status=self.status)
        if not body.get("stream"):
            return web.json_response({"instance": self.name, "text": "ok"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.mode == "die_before_first":
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(self.event(0))
        if self.mode == "die_mid_stream":
            await asyncio.sleep(0.05)  # the event reaches the router, then the process "dies"
            assert request.transport is not None
            request.transport.abort()
            return resp
        if self.mode == "gate":
            await self.gate.wait()
        for i in range(1, self.chunks):
            await asyncio.sleep(self.pause)
            await resp.write(self.event(i))
        await resp.write(b"data: [DONE]\n\n")
        return resp


@contextlib.asynccontextmanager
async def scripted(
    n: int, keepalive: float = 75.0, **cfg: Any
) -> AsyncIterator[tuple[Any, list[ScriptedEngine]]]:
    engines = [ScriptedEngine(f"i{k}", keepalive) for k in range(n)]
    for e in engines:
        await e.start()
    try:
        settings = {**FAST, **cfg}
        async with cluster(n, engine_urls={k: e.url for k, e in enumerate(engines)}, **settings) as c:
            yield c, engines
    finally:
        for e in engines:
            await e.stop()


@contextlib.asynccontextmanager
async def hung_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and reads, but never answers."""
    conns: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for w in conns:
            w.close()
        server.close()


async def sse(c: Any, path: str = "/generate", body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    body = body if body is not None else {"text": PROMPT, "stream": True}
    async with c.http.post(c.url(path), json=body) as r:
        return r.status, await r.read()


async def metric(c: Any, line_start: str) -> float:
    async with c.http.get(c.url("/metrics")) as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ----------------------------------------------------------------------------------------- timeouts


async def test_hung_engine_times_out_on_headers_and_the_request_is_retried_elsewhere() -> None:
    async with hung_server() as hung, scripted(2) as (c, _engines):
        c.agents[0].engine_url = hung  # i0 accepts and never answers
        await wait_until(lambda: c.inst("i0").engine_url == hung, "i0 points at the hung server")
        await c.agents[0].send_events(stored(PROMPT))
        t0 = time.monotonic()
        statuses = [await sse(c) for _ in range(3)]
        assert all(s == 200 and b"i1-2" in b for s, b in statuses), statuses
        assert time.monotonic() - t0 < 3 * (FAST["headers_timeout"] + 0.5)
        assert await metric(c, 'router_upstream_timeouts_total{kind="headers"}') >= 1
        assert await metric(c, "router_retries_total") >= 1


async def test_hung_engine_alone_gives_504_after_the_headers_timeout_and_non_stream_after_total() -> None:
    async with hung_server() as hung, scripted(1, max_retries=0, request_timeout=1.0) as (c, _):
        c.agents[0].engine_url = hung
        await wait_until(lambda: c.inst("i0").engine_url == hung, "i0 points at the hung server")
        t0 = time.monotonic()
        status, body = await sse(c)
        assert status == 504 and json.loads(body)["error"]["code"] == 504
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        status, _ = await sse(c, body={"text": PROMPT})
        assert status == 504 and 0.9 < time.monotonic() - t0 < 3.0
        assert await metric(c, 'router_upstream_timeouts_total{kind="total"}') == 1


async def test_stream_idle_gap_ends_the_stream_with_an_error_event_and_aborts_upstream() -> None:
    async with scripted(1) as (c, (eng,)):
        eng.mode = "gate"  # one event, then silence
        status, body = await sse(c)
        assert status == 200 and body.startswith(eng.event(0))
        assert b'"error"' in body and b"timeout_idle" in body
        rid = eng.received[0]["rid"]
        await wait_until(lambda: eng.aborted == [rid], "abort reached the engine")
        assert await metric(c, 'router_upstream_timeouts_total{kind="idle"}') == 1


# ---------------------------------------------------------------------------------- engine failures


async def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event() -> None:
    async with scripted(2) as (c, engines):
        for e in engines:
            e.mode = "die_mid_stream"
        status, body = await sse(c)
        assert status == 200 and b"-0" in body and b'"error"' in body and b"[DONE]" not in body
        assert await metric(c, 'router_requests_total{endpoint="generate",status="stream_error"}') == 1
        assert await metric(c, "router_retries_total") == 0  # a byte had reached the client


async def test_engine_dying_before_its_first_chunk_is_retried_on_another_instance() -> None:
    async with scripted(2) as (c, engines):
        engines[0].mode = engines[1].mode = "die_before_first"
        status, body = await sse(c)
        assert status == 502  # both failed before any byte: the client gets a clean error
        engines[1].mode = "ok"
        for _ in range(4):
            status, body = await sse(c)
            assert status == 200 and b"i1-2" in body and b"[DONE]" in body
        assert await metric(c, 'router_attempt_failures_total{kind="broken"}') >= 2


async def test_5xx_and_429_are_retried_on_the_next_instance_never_the_same() -> None:
    async with scripted(3) as (c, engines):
        engines[0].mode = engines[1].mode = "status"
        engines[1].status = 429
        for stream in (False, True):
            body = {"text": PROMPT, "stream": stream}
            async with c.http.post(c.url("/generate"), json=body) as r:
                assert r.status == 200
        for e in engines[:2]:  # each failing engine got each request at most once
            assert len(e.received) <= 2
        assert await metric(c, "router_retries_total") >= 2


async def test_all_attempts_failing_passes_the_last_engine_answer_through() -> None:
    async with scripted(2) as (c, engines):
        for e in engines:
            e.mode, e.status = "status", 503
        async with c.http.post(c.url("/generate"), json={"text": PROMPT}) as r:
            assert r.status == 503 and (await r.json())["error"]["message"] == "busy"


async def test_breaker_opens_after_failures_and_a_probe_closes_it() -> None:
    async with scripted(2, breaker_failures=2, breaker_open=0.5, max_retries=1) as (c, engines):
        engines[0].mode, engines[0].status = "status", 500
        await c.agents[0].send_events(stored(PROMPT))
        for _ in range(4):
            status, _ = await sse(c, body={"text": PROMPT})
            assert status == 200
        assert c.router.dispatcher.breakers.state("i0") in (OPEN, HALF_OPEN)
        assert await metric(c, 'router_instance_breaker_state{instance="i0"}') >= 1
        engines[0].mode = "ok"
        await asyncio.sleep(0.6)

        async def closed() -> bool:
            await sse(c, body={"text": PROMPT})
            return c.router.dispatcher.breakers.state("i0") == CLOSED

        for _ in range(20):
            if await closed():
                break
        assert c.router.dispatcher.breakers.state("i0") == CLOSED


async def test_instance_going_down_fails_its_in_flight_requests_fast() -> None:
    async with scripted(2, idle_timeout=30.0) as (c, engines):
        for e in engines:
            e.mode = "gate"
        task = asyncio.create_task(sse(c))
        await wait_until(lambda: any(e.received for e in engines), "request reached an engine")
        owner = 0 if engines[0].received else 1
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        c.agents[owner].healthy = False  # the agent says its engine is unhealthy: the model marks it down
        status, body = await asyncio.wait_for(task, 5.0)
        assert status == 200 and b'"error"' in body and b"went down" in body
        assert time.monotonic() - t0 < 2.0  # not the 30 s idle timeout
        await wait_until(lambda: c.inst(f"i{owner}").inflight == 0, "request finished")


async def test_instance_going_down_before_the_first_byte_hands_the_request_to_another() -> None:
    async with scripted(2, headers_timeout=30.0, idle_timeout=30.0) as (c, engines):
        engines[0].mode = "hang"
        await c.agents[0].send_events(stored(PROMPT))
        await wait_until(
            lambda: c.router.core.index is not None and c.router.core.index.blocks_of("i0") > 0, "i0 synced"
        )
        task = asyncio.create_task(sse(c))
        await wait_until(lambda: bool(engines[0].received), "request reached i0")
        c.agents[0].healthy = False
        status, body = await asyncio.wait_for(task, 5.0)
        assert status == 200 and b"i1-2" in body


# ------------------------------------------------------------------------------- connections, clients


async def test_stale_keepalive_after_6s_idle_is_not_a_failure() -> None:
    """The engine closes idle connections after 5 s (SGLang's uvicorn default); the router keeps them 4 s."""
    async with scripted(1, keepalive=5.0) as (c, (eng,)):
        assert (await sse(c, body={"text": PROMPT}))[0] == 200
        await asyncio.sleep(6.0)
        assert (await sse(c, body={"text": PROMPT}))[0] == 200
        assert await metric(c, "router_retries_total") == 0
        assert c.inst("i0").is_routable and len(eng.received) == 2


async def test_slow_client_gets_the_whole_stream() -> None:
    async with scripted(1) as (c, (eng,)):
        eng.chunks, eng.pause = 40, 0.005
        got = b""
        async with c.http.post(c.url("/generate"), json={"text": PROMPT, "stream": True}) as r:
            while True:
                chunk = await r.content.read(7)
                if not chunk:
                    break
                got += chunk
                await asyncio.sleep(0.002)
        assert got == b"".join(eng.event(i) for i in range(40)) + b"data: [DONE]\n\n"


async def test_client_disconnect_sends_abort_request_with_the_forwarded_rid() -> None:
    async with scripted(1, idle_timeout=30.0) as (c, (eng,)):
        eng.mode = "gate"
        for body in ({"text": PROMPT, "stream": True}, {"text": PROMPT, "stream": True, "rid": "mine-1"}):
            async with c.http.post(c.url("/generate"), json=body) as r:
                await r.content.readuntil(b"\n\n")
                r.close()
            rid = eng.received[-1]["rid"]
            assert rid == body.get("rid", rid) and rid
            await wait_until(lambda rid=rid: rid in eng.aborted, "abort reached the engine")
        await wait_until(lambda: c.inst("i0").inflight == 0, "pending dispatches released")
        assert await metric(c, 'router_upstream_aborts_total{reason="client_closed"}') == 2


async def test_abort_reaches_the_emulated_engine_and_stops_decoding() -> None:
    from agents.engine.server import EngineServer
    from tests.live_rig import engine_config

    srv = EngineServer(engine_config(time_scale=1.0))
    await srv.start()
    try:
        async with cluster(1, engine_urls={0: srv.endpoints["http"]}, **FAST) as c:
            params = {"max_new_tokens": 100000, "ignore_eos": True}
            body = {"text": PROMPT, "stream": True, "sampling_params": params}
            async with c.http.post(c.url("/generate"), json=body) as r:
                await r.content.readuntil(b"\n\n")
                r.close()
            await wait_until(lambda: not srv.core.busy, "the engine stopped decoding", timeout=5.0)
    finally:
        await srv.stop()


# -------------------------------------------------------------------------------------------- overload


async def test_burst_beyond_capacity_gets_fast_429s_with_retry_after() -> None:
    cfg = {"max_inflight_per_instance": 1, "max_queue": 1, "queue_timeout": 0.3, "idle_timeout": 30.0}
    async with scripted(1, **cfg) as (c, (eng,)):
        eng.mode = "gate"
        first = asyncio.create_task(sse(c))
        await wait_until(lambda: bool(eng.received), "first request in flight")
        queued = asyncio.create_task(sse(c))
        await wait_until(lambda: c.router.admission.queued == 1, "second request queued")
        for _ in range(5):
            t0 = time.monotonic()
            async with c.http.post(c.url("/generate"), json={"text": PROMPT}) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                err = (await r.json())["error"]
            assert time.monotonic() - t0 < 0.2 and err["code"] == 429
        status, _body = await queued
        assert status == 429  # waited its 0.3 s, no slot freed
        eng.gate.set()
        assert (await first)[0] == 200
        assert await metric(c, 'router_rejected_total{reason="queue_full"}') == 5
        assert await metric(c, 'router_rejected_total{reason="queue_timeout"}') == 1
        assert (await sse(c))[0] == 200  # capacity is back


async def test_in_flight_limit_follows_the_engines_waiting_queue() -> None:
    """router/model/concurrency.py wired to the agents' load reports: an engine that queues (waiting >
    --engine-queue-allowance) caps its instance at what it runs + the allowance, the excess gets 429 at
    once; once its queue is gone the limit grows again while the router keeps it full."""
    slow = {"headers_timeout": 30.0, "idle_timeout": 30.0, "request_timeout": 60.0}
    async with scripted(1, max_queue=0, engine_queue_allowance=2, **slow) as (c, (eng,)):
        agent = c.agents[0]
        agent.load = (3, 5, 0, 8)  # running 3, waiting 5: the limit drops to 3 + 2
        await wait_until(lambda: c.router.admission.limit() == 5, "limit down to 5")
        eng.mode = "gate"
        held = [asyncio.create_task(sse(c)) for _ in range(5)]
        await wait_until(lambda: c.router.admission.inflight == 5, "five in flight")
        t0 = time.monotonic()
        async with c.http.post(c.url("/generate"), json={"text": PROMPT}) as r:
            assert r.status == 429
        assert time.monotonic() - t0 < 0.2
        agent.load = (5, 0, 0, 8)  # the queue is gone and the router keeps it full: +1 (then not full)
        await wait_until(lambda: c.router.admission.limit() == 6, "limit grows back")
        held.append(asyncio.create_task(sse(c)))  # admitted now
        await wait_until(lambda: c.router.admission.limit() == 7, "full again: +1")
        state = await (await c.http.get(c.url("/router/state"))).json()
        assert state["admission"]["instance_limits"] == {"i0": 7}
        eng.gate.set()
        assert all(status == 200 for status, _ in await asyncio.gather(*held))


async def test_413_for_a_body_over_the_limit_declared_or_chunked() -> None:
    async with scripted(1, max_body_size=1000) as (c, (eng,)):
        big = json.dumps({"text": "x" * 2000}).encode()
        status, err = await c.post("/generate", big)
        assert status == 413 and err["error"]["code"] == 413

        async def chunks() -> AsyncIterator[bytes]:
            yield big[:500]
            yield big[500:]

        async with c.http.post(c.url("/generate"), data=chunks()) as r:
            assert r.status == 413
        assert eng.received == []
        assert await metric(c, 'router_rejected_total{reason="body_too_large"}') == 2


async def test_deeply_nested_json_is_400_not_500() -> None:
    async with scripted(1) as (c, _):
        deep = b'{"text": "x", "extra": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        status, err = await c.post("/generate", deep)
        assert status == 400 and "nested" in err["error"]["message"]


# ------------------------------------------------------------------------------------------ pure units


def test_with_rid_splices_the_field_in() -> None:
    assert json.loads(with_rid(b' {"text": "a"}', "r1")) == {"rid": "r1", "text": "a"}
    assert json.loads(with_rid(b"{ }", 'q"x')) == {"rid": 'q"x'}


def test_breaker_opens_after_failures_in_a_row_within_the_window() -> None:
    t = [0.0]
    b = Breakers(failures=3, window=10.0, open_for=2.0, max_ejected=0.5, clock=lambda: t[0])
    assert not b.failure("a", 4) and not b.failure("a", 4)
    b.success("a")  # a success restarts the count
    assert not b.failure("a", 4) and not b.failure("a", 4)
    assert b.failure("a", 4) and b.state("a") == OPEN and b.blocked() == {"a"}
    t[0] = 1.9
    assert b.blocked() == {"a"}
    t[0] = 2.1
    assert b.blocked() == set() and b.state("a") == HALF_OPEN  # one probe may go
    b.on_dispatch("a")
    assert b.blocked() == {"a"}  # the probe is in flight
    b.success("a")
    assert b.state("a") == CLOSED and b.blocked() == set()


def test_breaker_failures_outside_the_window_do_not_count_and_a_failed_probe_reopens() -> None:
    t = [0.0]
    b = Breakers(failures=2, window=1.0, open_for=1.0, clock=lambda: t[0])
    b.failure("a", 2)
    t[0] = 5.0
    assert not b.failure("a", 2)
    t[0] = 5.5
    assert b.failure("a", 2)
    t[0] = 6.6
    b.blocked()
    b.on_dispatch("a")
    assert b.failure("a", 2) and b.state("a") == OPEN and b.opens("a") == 2


def test_breaker_cap_keeps_most_instances_in() -> None:
    b = Breakers(failures=1, max_ejected=0.5, clock=lambda: 0.0)
    assert b.failure("a", 4) and b.failure("b", 4)
    assert not b.failure("c", 4) and b.capped == 1 and b.state("c") == CLOSED
    assert not b.set_stalled("c", True, 4) and b.capped == 2
    b.success("a")
    assert b.set_stalled("c", True, 4) and b.blocked() == {"b", "c"}


async def test_admission_queue_is_fifo_bounded_and_times_out() -> None:
    adm = Admission(lambda: 1, max_queue=2, queue_timeout=0.2)
    assert await adm.acquire() == 0.0
    w1 = asyncio.create_task(adm.acquire())
    w2 = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    with pytest.raises(Rejected, match="queue_full"):
        await adm.acquire()
    adm.release()
    assert await w1 >= 0.0 and adm.inflight == 1
    with pytest.raises(Rejected, match="queue_timeout"):
        await w2
    adm.release()
    assert adm.inflight == 0 and adm.queued == 0
