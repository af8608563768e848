"""The SGLang 0.5.23 behaviour contract (docs/sglang-contract.md) over real sockets on 127.0.0.1.

Each test names the SGLang file and function whose behaviour it pins. The emulated engine runs with the
slow ``/health`` probe on here (``health_generation=True``), whatever the session default
(tests/conftest.py turns it off for tests that do not care about health timing).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from agents.agent.config import AgentConfig
from agents.agent.engine_link import check_health
from agents.agent.health import EngineHealth, Health
from agents.engine.config import ServerConfig
from agents.engine.health import ENV_HEALTH_GENERATION, ServerStatus
from agents.engine.server import EngineServer
from kvindex.protocol.ready import parse_ready
from tests.live_rig import AgentRunner, agent_config, close_all, engine_config, wait_until

pytestmark = pytest.mark.timeout(60)

SLOW = engine_config(health_generation=True, health_check_timeout=20.0, keepalive_timeout=5.0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def started(cfg: ServerConfig) -> EngineServer:
    srv = EngineServer(cfg)
    await srv.start()
    return srv


async def timed_get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    async with http.get(url) as r:
        body = await r.read()
        return r.status, body, time.monotonic() - t0


def long_stream(rid: str) -> dict[str, Any]:
    return {
        "input_ids": list(range(1, 40)),
        "sampling_params": {"max_new_tokens": 100_000, "ignore_eos": True},
        "stream": True,
        "rid": rid,
    }


# ------------------------------------------------------------------------------------------ /health


async def test_health_is_a_probe_of_at_least_a_second_idle_and_busy(http: aiohttp.ClientSession) -> None:
    """http_server.py ``health_generate``: sleeps 1 s before it looks, idle (its own 1-token request
    ran) or busy (the scheduler's next output); 200 with an empty body."""
    srv = await started(replace(SLOW, time_scale=0.5))
    try:
        base = srv.endpoints["http"]
        for path in ("/health", "/health_generate"):
            status, body, took = await timed_get(http, base + path)
            assert (status, body) == (200, b"") and took >= 0.95, (path, took)
        assert not srv.core.busy  # the probe request is gone
        async with http.post(base + "/generate", json=long_stream("busy")) as r:
            await r.content.readuntil(b"\n\n")
            status, body, took = await timed_get(http, base + "/health")
            assert (status, body) == (200, b"") and took >= 0.95
            assert all(not rid.startswith("HEALTH_CHECK") for rid in srv.core._seqs)  # no probe when busy
    finally:
        await srv.stop()


async def test_probe_off_answers_health_at_once_but_not_health_generate(http: aiohttp.ClientSession) -> None:
    """``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0`` short-cuts ``/health`` only (http_server.py)."""
    srv = await started(replace(SLOW, health_generation=False))
    try:
        base = srv.endpoints["http"]
        status, _, took = await timed_get(http, base + "/health")
        assert status == 200 and took < 0.5
        status, _, took = await timed_get(http, base + "/health_generate")
        assert status == 200 and took >= 0.95
    finally:
        await srv.stop()


async def test_health_is_503_at_once_while_starting_and_while_draining(http: aiohttp.ClientSession) -> None:
    """``health_generate``: 503, empty body, no probe, while ``ServerStatus.Starting`` and after SIGTERM
    (``gracefully_exit``); ``/ready`` likewise. The drain lets requests in flight finish
    (tokenizer_manager.py ``sigterm_watchdog``)."""
    srv = await started(replace(SLOW, startup_delay=1.5, time_scale=1.0))
    try:
        base = srv.endpoints["http"]
        for path in ("/health", "/health_generate", "/ready"):
            status, body, took = await timed_get(http, base + path)
            assert (status, body) == (503, b"") and took < 0.5, path
        await wait_until(lambda: srv.status is ServerStatus.UP, "engine up", timeout=5)
        assert (await timed_get(http, base + "/ready"))[0] == 200
        assert (await timed_get(http, base + "/health"))[0] == 200
        body = {**long_stream("inflight"), "sampling_params": {"max_new_tokens": 60, "ignore_eos": True}}
        async with http.post(base + "/generate", json=body) as r:
            await r.content.readuntil(b"\n\n")
            drain = asyncio.create_task(srv.drain(timeout=30))
            await asyncio.sleep(0.05)
            status, _, took = await timed_get(http, base + "/health")
            assert status == 503 and took < 0.5 and not drain.done()
            rest = (await r.read()).decode()
        last = json.loads(rest.split("\n\n")[-3][len("data: ") :])
        assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 60}
        await asyncio.wait_for(drain, 5)
    finally:
        await srv.stop()


async def test_probe_without_scheduler_output_times_out_503(http: aiohttp.ClientSession) -> None:
    """``health_generate``: no scheduler output for ``SGLANG_HEALTH_CHECK_TIMEOUT`` s -> 503 and
    ``ServerStatus.UnHealthy`` (``/ready`` 503 too)."""
    srv = await started(replace(SLOW, health_check_timeout=1.5))
    try:
        srv._tasks[0].cancel()  # the scheduler loop hangs (from the outside: it never answers again)
        status, _, took = await timed_get(http, srv.endpoints["http"] + "/health")
        assert status == 503 and 1.5 <= took < 3.5
        assert srv.status is ServerStatus.UNHEALTHY
        assert (await timed_get(http, srv.endpoints["http"] + "/ready"))[0] == 503
    finally:
        await srv.stop()


# --------------------------------------------------------------------------------------- keep-alive


async def test_idle_keepalive_is_closed_after_5s_and_the_agent_copes(http: aiohttp.ClientSession) -> None:
    """uvicorn ``timeout_keep_alive`` = ``SGLANG_TIMEOUT_KEEP_ALIVE`` (5 s, http_server.py ``launch_server``).

    After 6 s idle: a raw keep-alive socket has been closed by the engine; a client pool that still holds
    the connection retries on a fresh one and sees 200; an agent whose health checks come 5.5 s apart
    (so every check meets a connection the engine closed) never counts a failure.
    """
    srv = await started(replace(SLOW, health_generation=False))
    runner = AgentRunner(
        agent_config(srv.endpoints["http"], "ka", health_interval=5.5, health_timeout=5.0, health_failures=1)
    )
    try:
        await runner.start()
        host, port = "127.0.0.1", srv.ports["http"]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"close" not in head.lower()
        stale = aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=60))
        try:
            assert await check_health(stale, srv.endpoints["http"], 5.0) is Health.OK  # pooled now
            await asyncio.sleep(4.0)
            assert not reader.at_eof()  # still open within the keep-alive time
            assert await asyncio.wait_for(reader.read(1), 2.5) == b""  # closed by the engine at ~5 s
            await asyncio.sleep(0.5)
            assert await check_health(stale, srv.endpoints["http"], 5.0) is Health.OK
        finally:
            writer.close()
            await stale.close()
        await wait_until(lambda: runner.agent.counters.health_checks >= 1, "an agent check", timeout=3)
        assert runner.agent.counters.health_failures == 0
        assert runner.agent.engine_healthy and runner.agent.counters.health_not_ready == 0
    finally:
        await close_all(runner.stop, srv.stop)


async def test_check_health_retries_a_dead_connection_once() -> None:
    """A server that drops connections unanswered (a keep-alive closed as the request went out): the
    agent's check retries once on a fresh connection (aiohttp itself also retries an idempotent GET
    once, so the first two connections are dropped here), and reports FAILED when every one drops."""
    seen = 0
    drop_first = 2

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        await reader.readuntil(b"\r\n\r\n")
        if seen > drop_first:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as s:
            assert await check_health(s, url, 2.0) is Health.OK
            assert seen == 3
            seen, drop_first = 0, 10
            assert await check_health(s, url, 2.0) is Health.FAILED
            assert seen == 4  # our two attempts (one retry), each retried once inside aiohttp; no more
    finally:
        server.close()
        await server.wait_closed()


async def test_refused_connection_marks_the_engine_down_at_once() -> None:
    """Nothing listening on the engine's port is ``REFUSED``, which marks the engine down on the first
    check; a timeout (``FAILED``) needs ``failures_to_down`` in a row."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: connecting to it is refused
    async with aiohttp.ClientSession() as s:
        assert await check_health(s, f"http://127.0.0.1:{port}", 2.0) is Health.REFUSED
    health = EngineHealth(failures_to_down=3)
    assert not health.observe(Health.FAILED) and not health.observe(Health.FAILED) and health.healthy
    assert health.observe(Health.FAILED) and not health.healthy
    assert health.observe(Health.OK) and health.healthy
    assert health.observe(Health.REFUSED) and not health.healthy and health.failed_in_row == 1
    assert not health.observe(Health.FAILED) and health.observe(Health.OK) and health.healthy


# ------------------------------------------------------------------------------------------ agent


async def test_agent_with_default_health_settings_follows_sglang_health(http: aiohttp.ClientSession) -> None:
    """Against ``health_generate`` (503 while starting, then 200 after >= 1 s) the agent waits through the
    start and stays healthy under load with its defaults (interval 2 s, timeout 5 s, 3 failures); the
    old settings (1 s timeout) fail every check."""
    srv = await started(replace(SLOW, startup_delay=1.0, time_scale=0.05))
    d = AgentConfig(engine_url=srv.endpoints["http"])  # the shipped defaults
    assert (d.health_interval, d.health_timeout, d.health_failures) == (2.0, 5.0, 3)
    runner = AgentRunner(
        replace(
            agent_config(srv.endpoints["http"], "sg"),
            health_interval=d.health_interval,
            health_timeout=d.health_timeout,
            health_failures=d.health_failures,
        )
    )
    try:
        assert (await timed_get(http, srv.endpoints["http"] + "/health"))[0] == 503
        await runner.start()  # waited through the 503s of the start
        assert srv.status is ServerStatus.UP
        async with aiohttp.ClientSession() as s:
            assert await check_health(s, srv.endpoints["http"], 1.0) is Health.FAILED  # a 1 s timeout
        body = {
            "input_ids": list(range(1, 60)),
            "sampling_params": {"max_new_tokens": 30, "ignore_eos": True},
        }

        async def load() -> None:
            for _ in range(10):
                async with http.post(srv.endpoints["http"] + "/generate", json=body) as r:
                    assert r.status == 200

        await asyncio.gather(load(), asyncio.sleep(6.5))
        a = runner.agent
        assert a.counters.health_checks >= 2
        assert a.engine_healthy and a.counters.health_failures == 0 and a.counters.health_not_ready == 0
    finally:
        await close_all(runner.stop, srv.stop)


async def test_agent_marks_engine_down_on_503_at_once_and_after_n_failures() -> None:
    """A 503 (draining, ``health_generate``) marks the engine unhealthy at the first check; so does a dead
    engine (connection refused: nothing listens). Timeouts need ``health_failures`` in a row
    (``test_refused_connection_marks_the_engine_down_at_once``)."""
    srv = await started(replace(SLOW, health_generation=False))
    runner = AgentRunner(agent_config(srv.endpoints["http"], "dn", health_interval=0.05, health_failures=3))
    try:
        await runner.start()
        a = runner.agent
        srv.status = ServerStatus.EXITING
        await wait_until(lambda: not a.engine_healthy, "503 seen", timeout=2)
        assert a.counters.health_not_ready >= 1 and a.counters.health_failures == 0
        srv.status = ServerStatus.UP
        await wait_until(lambda: a.engine_healthy, "healthy again", timeout=2)
        await srv.stop()
        await wait_until(lambda: not a.engine_healthy, "down at the first refused check", timeout=3)
        assert a.counters.health_failures >= 1  # the refused one (a pooled connection may break first)
    finally:
        await close_all(runner.stop, srv.stop)


# ----------------------------------------------------------------------------------- abort_request


async def test_abort_request_stops_a_running_request(http: aiohttp.ClientSession) -> None:
    """http_server.py ``abort_request`` (body ``AbortReq``: ``rid``, ``abort_all``): 200, empty body; the
    request ends with ``FINISH_ABORT`` (``{"type": "abort", "message": "Aborted", "status_code": null,
    ...}``), stream closed by ``data: [DONE]``; its KV is freed. Unknown rids are ignored."""
    srv = await started(replace(SLOW, health_generation=False, time_scale=0.2))
    try:
        base = srv.endpoints["http"]
        async with http.post(base + "/generate", json=long_stream("victim")) as r:
            await r.content.readuntil(b"\n\n")
            assert srv.core.busy
            async with http.post(base + "/abort_request", json={"rid": "victim"}) as a:
                assert (a.status, await a.read()) == (200, b"")
            rest = (await r.read()).decode()
        events = [e[len("data: ") :] for e in rest.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        meta = json.loads(events[-2])["meta_info"]
        assert meta["finish_reason"] == {
            "type": "abort",
            "message": "Aborted",
            "status_code": None,
            "err_type": None,
        }
        assert meta["completion_tokens"] < 100_000
        await wait_until(lambda: not srv.core.busy, "core idle", timeout=2)
        assert srv.core.cache.private_tokens == 0
        async with http.post(base + "/abort_request", json={"rid": "nobody"}) as a:
            assert a.status == 200
        body = {**long_stream("x"), "stream": False}
        task = asyncio.create_task(http.post(base + "/generate", json=body))
        await wait_until(lambda: srv.core.busy, "running", timeout=2)
        async with http.post(base + "/abort_request", json={"abort_all": True}) as a:
            assert a.status == 200
        resp = await asyncio.wait_for(task, 5)
        res = await resp.json()
        assert resp.status == 200 and res["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        await srv.stop()


def test_idle_engine_process_at_time_scale_0_answers_every_probe_in_about_a_second() -> None:
    """``health_generate`` compares ``time.time()`` stamps, so the probe's own 1-token output always counts.
    The engine process runs on uvloop, whose ``loop.time()`` is libuv's cached millisecond clock: stamps
    from it made the probe and an instant (time scale 0) step read the same value, ``>`` failed, and an
    idle engine looked unhealthy for up to its 20 s timeout, probe after probe (an agent waited up to a
    minute to start). Every probe of an idle engine process must answer 200 in about a second."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", ENV_HEALTH_GENERATION: "1"}
    cmd = [sys.executable, "-m", "agents.engine.server", "--port", "0", "--time-scale", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready = parse_ready(proc.stdout.readline())
        assert ready is not None
        for _ in range(6):
            t0 = time.monotonic()
            with urllib.request.urlopen(ready.endpoints["http"] + "/health", timeout=10) as r:
                assert r.status == 200
            took = time.monotonic() - t0
            assert 0.95 <= took < 5.0, took
    finally:
        proc.kill()
        proc.wait()
