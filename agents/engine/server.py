"""The emulated SGLang engine as a process: HTTP API + KV event, replay and load sockets around the core.

``python -m agents.engine.server --help`` lists the flags. One asyncio task owns the core: it schedules
a step at loop time, sleeps the modelled duration times ``--time-scale``, applies the step, hands the
tokens to the waiting HTTP handlers and publishes the step's KV events as one ``KVEventBatch`` on the
PUB socket (seq from 0, +1 per published batch, steps without events skipped), keeping ``(seq,
payload)`` in a replay buffer of ``--buffer-steps`` batches. It sleeps on an event while idle.

Sockets (SGLang 0.5.23 formats): the KV PUB, the replay ROUTER and the load PUB, in
:mod:`agents.engine.streams`.

HTTP follows SGLang 0.5.23's server (docs/sglang-contract.md): idle keep-alive connections are closed after
``SGLANG_TIMEOUT_KEEP_ALIVE`` seconds (5, uvicorn's ``timeout_keep_alive``); ``/health`` is SGLang's
generation probe (:mod:`agents.engine.health`), 503 while starting (``--startup-delay``) or exiting.
SIGTERM drains as SGLang's ``sigterm_watchdog`` does (``/health`` 503, requests in flight run to their end,
at most ``--drain-timeout`` seconds); SIGINT stops at once.

Once everything is bound it prints ``READY {"role": "engine", "endpoints": {"http", "kv", "replay",
"load"}}`` (:mod:`kvindex.protocol.ready`). SIGINT/SIGTERM or cancellation shut it down cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agents.engine.config import ServerConfig, parse_args
from agents.engine.core import EngineCore, Request, RequestRejected, TokenOutput
from agents.engine.core_types import Aborted
from agents.engine.health import (
    HEALTH_CHECK_RID_PREFIX,
    PROBE_TICK,
    ServerStatus,
)
from agents.engine.http_api import HttpApi
from agents.engine.metrics import EngineMetrics
from agents.engine.profiles import get_profile
from agents.engine.streams import EngineStreams
from kvindex.process import run_process, stop_signals
from kvindex.protocol.ready import announce_ready
from kvindex.protocol.tokenizer import load_tokenizer

log = logging.getLogger("agents.engine")
# Seconds the step pacing may fall behind before it resyncs to the clock. Within this bound a stall of the
# event loop (a large request body parsed, the process descheduled on a busy host) is caught up by running
# the next steps back to back, so modelled GPU time is not lost to emulator CPU time; beyond it (sustained
# overload) the engine gives up catching up rather than bursting without end.
_MAX_LAG = 1.0


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine task %s crashed", task.get_coro(), exc_info=task.exception())


def server_ssl(cfg: ServerConfig) -> ssl.SSLContext | None:
    """The HTTPS context of ``cfg`` (SGLang's ``--ssl-certfile``/``--ssl-keyfile``, TLS >= 1.2, no client
    certificates), None for plain HTTP. Raises ``OSError`` / ``ssl.SSLError`` for an unreadable
    certificate or key, or a wrong password."""
    if not cfg.ssl_certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile, cfg.ssl_keyfile_password)
    return ctx


@dataclass(slots=True)
class _Live:
    """A request an HTTP handler waits on; an :class:`Aborted` in the queue ends it early."""

    queue: asyncio.Queue[TokenOutput | Aborted]
    arrival: float
    first_token: float | None = None
    last_token: float | None = None


class EngineServer:
    """Runtime state of one emulated engine. ``await start()``, use, ``await stop()``."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.profile = get_profile(cfg.profile)
        self.core = EngineCore(cfg.engine_config(), self.profile)
        self.tokenizer = load_tokenizer(None)
        self.metrics = EngineMetrics(cfg.model_name)
        self.endpoints: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.streams = EngineStreams(cfg)
        self._live: dict[str, _Live] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._wake: asyncio.Event | None = None
        self._deadline = 0.0
        self.status = ServerStatus.STARTING
        # time.monotonic() of the scheduler's last output (SGLang: TokenizerManager.last_receive_tstamp,
        # from time.time()). Not loop.time(): uvloop's is libuv's cached millisecond clock, so a probe and
        # the 1-token step that answers it often read the same value and ``>`` never held on an idle engine
        # (the agent then waited up to a minute for an engine to look healthy).
        self.last_receive = 0.0

    # ---------------------------------------------------------------------------------------- lifecycle

    @property
    def malformed_replay_requests(self) -> int:
        """Replay requests ignored for their shape."""
        return self.streams.malformed_replay_requests

    async def start(self) -> None:
        """Bind every socket and the HTTP port (HTTPS with ``ssl_certfile``), start the core, replay and
        load tasks. Raises ``OSError`` / ``ssl.SSLError`` (port in use, unreadable certificate or key)."""
        cfg = self.cfg
        self._wake = asyncio.Event()
        self.streams.bind()
        self.ports.update(self.streams.ports)
        self.endpoints.update(self.streams.endpoints)
        self._runner = web.AppRunner(
            HttpApi(self).app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=cfg.keepalive_timeout,  # uvicorn's timeout_keep_alive in SGLang
        )
        await self._runner.setup()
        tls = server_ssl(cfg)
        await web.TCPSite(self._runner, cfg.host, cfg.port, ssl_context=tls).start()
        self.ports["http"] = int(self._runner.addresses[0][1])
        scheme = "https" if tls is not None else "http"
        self.endpoints = {"http": f"{scheme}://{cfg.host}:{self.ports['http']}", **self.endpoints}
        for coro in (self._core_loop(), self.streams.replay_loop(), self.streams.load_loop(self.core)):
            task = asyncio.create_task(coro)
            task.add_done_callback(_log_crash)
            self._tasks.append(task)
        self.last_receive = time.monotonic()
        if cfg.startup_delay > 0:
            task = asyncio.create_task(self._come_up(cfg.startup_delay))
            task.add_done_callback(_log_crash)
            self._tasks.append(task)
        else:
            self.status = ServerStatus.UP

    async def _come_up(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.status is ServerStatus.STARTING:
            self.status = ServerStatus.UP

    async def drain(self, timeout: float) -> None:
        """Begin a graceful exit (``/health`` 503 from now on) and wait, at most ``timeout`` seconds, until
        no request is in flight. New requests are still accepted meanwhile, as SGLang does."""
        self.status = ServerStatus.EXITING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._live and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop the tasks, end every open request (streams get an abort), close HTTP and sockets."""
        self.status = ServerStatus.EXITING
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for live in self._live.values():
            live.queue.put_nowait(Aborted("the server is shutting down", 503))
        self._live.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.streams.close()

    @property
    def alive(self) -> bool:
        """Whether the scheduler task runs."""
        return bool(self._tasks) and not self._tasks[0].done()

    @property
    def accepting_health(self) -> bool:
        """False while starting or exiting: ``/health`` then answers 503 without probing."""
        return self.status not in (ServerStatus.STARTING, ServerStatus.EXITING)

    @property
    def is_ready(self) -> bool:
        """SGLang's ``is_ready``: up (warmed, last probe fine) and not exiting."""
        return self.status is ServerStatus.UP

    async def health_probe(self) -> bool:
        """SGLang's generation probe (http_server.py ``health_generate``). Takes at least one second.

        If the core is idle, a 1-token request (prompt ``[0]``) is queued, as SGLang's scheduler runs the
        probe only when fully idle; when busy, the running requests' next step is the sign of life. Every
        second up to ``health_check_timeout`` it looks whether the scheduler produced output since the
        probe began: True (and status up) at the first such look, else False (status unhealthy).
        """
        loop = asyncio.get_running_loop()
        tic = loop.time()
        seen = time.monotonic()  # compared with last_receive (see __init__)
        rid: str | None = None
        if self.alive and not self.core.busy:
            rid = f"{HEALTH_CHECK_RID_PREFIX}_{uuid.uuid4().hex}"
            try:
                self.core.add_request(Request(rid, (0,), 1, True, tic), tic)
            except RequestRejected:  # pragma: no cover - a 1-token prompt always fits
                rid = None
            else:
                assert self._wake is not None
                self._wake.set()
        try:
            while loop.time() < tic + self.cfg.health_check_timeout:
                await asyncio.sleep(PROBE_TICK)
                if self.last_receive > seen:
                    if self.status is ServerStatus.UNHEALTHY:
                        self.status = ServerStatus.UP
                    return True
            if self.status is ServerStatus.UP:
                self.status = ServerStatus.UNHEALTHY
            log.error("health check failed: no scheduler output for %g s", self.cfg.health_check_timeout)
            return False
        finally:
            if rid is not None:
                self.core.abort(rid)  # no-op once it finished

    # ------------------------------------------------------------------------------------ requests API

    def submit(self, req: Request) -> asyncio.Queue[TokenOutput | Aborted]:
        """Queue ``req`` in the core; its outputs will arrive on the returned queue.

        Raises:
            RequestRejected: see :meth:`EngineCore.add_request`.
        """
        if not self.alive:
            raise RequestRejected("the engine is shutting down")
        self.core.add_request(req, req.arrival)
        live = _Live(asyncio.Queue(), req.arrival)
        self._live[req.rid] = live
        assert self._wake is not None
        self._wake.set()
        return live.queue

    def cancel(self, rid: str) -> None:
        """Abort ``rid`` (client gone): frees its KV in the core."""
        if self._live.pop(rid, None) is not None:
            self.core.abort(rid)

    def abort_requests(self, rid: str, abort_all: bool = False) -> int:
        """``/abort_request``: end ``rid`` (or every request) now with a graceful abort; returns how many.

        As SGLang's ``TokenizerManager.abort_request``: an empty rid without ``abort_all`` and an unknown
        rid are ignored. The core frees their KV at once; their clients get finish reason ``abort``.
        """
        if abort_all:
            rids = list(self._live)
        elif rid and rid in self._live:
            rids = [rid]
        else:
            return 0
        for r in rids:
            live = self._live.pop(r)
            self.core.abort(r)
            live.queue.put_nowait(Aborted())
        return len(rids)

    def flush_cache(self) -> bool:
        """Flush the radix cache if idle, publishing ``AllBlocksCleared`` at once."""
        if not self.core.flush_cache():
            return False
        self._publish_events()
        return True

    def server_info(self) -> dict[str, Any]:
        """``/server_info``: the server args SGLang reports, plus the ``kv_events`` discovery block."""
        cfg, p = self.cfg, self.ports
        return {
            "model_path": cfg.model_name,
            "tokenizer_path": self.tokenizer.name,
            "served_model_name": cfg.model_name,
            "host": cfg.host,
            "port": p.get("http"),
            "page_size": cfg.page_size,
            "max_running_requests": cfg.max_running_requests,
            "max_total_num_tokens": self.core.max_total_num_tokens,
            "chunked_prefill_size": cfg.chunked_prefill_size,
            "enable_mixed_chunk": cfg.enable_mixed_chunk,
            "context_length": cfg.context_length,
            "stream_interval": cfg.stream_interval,
            "dp_size": 1,
            "profile": self.profile.name,
            "time_scale": cfg.time_scale,
            "version": "0.5.23-emulated",
            "kv_events": {
                "publisher": "zmq",
                "endpoint_host": cfg.host,
                "endpoint_port_base": p.get("kv"),
                "topic": cfg.kv_topic,
                "block_size": cfg.page_size,
                "dp_size": 1,
                "replay_endpoint_port_base": p.get("replay"),
                "load_endpoint_port_base": p.get("load"),
                "load_topic": "load",
            },
        }

    # ------------------------------------------------------------------------------------------- tasks

    async def _core_loop(self) -> None:
        loop, core, wake = asyncio.get_running_loop(), self.core, self._wake
        assert wake is not None
        while True:
            step = core.schedule(loop.time())
            if step is None:
                self._publish_events()
                self._deadline = 0.0  # idle: the next step starts from the clock
                wake.clear()
                if core.busy:  # defensive: never stall if the core holds work it could not schedule
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), 0.05)
                else:
                    await wake.wait()
                continue
            # Back-to-back steps chain on the previous deadline, so the Python work between steps does
            # not slow the modelled pace; more than _MAX_LAG behind (overloaded loop) resyncs to now.
            start = loop.time()
            if start - self._deadline < _MAX_LAG:
                start = min(start, self._deadline)
            elif self._deadline > 0.0:
                self.metrics.pace_resync.inc(start - self._deadline)
            self._deadline = start + step.duration * self.cfg.time_scale
            await asyncio.sleep(max(0.0, self._deadline - loop.time()))
            now = loop.time()
            self.metrics.step_lateness.observe(max(0.0, now - self._deadline))
            outputs = core.complete(step, now)
            self.last_receive = time.monotonic()
            self._publish_events()
            for out in outputs:
                self._deliver(out, now)

    def _deliver(self, out: TokenOutput, now: float) -> None:
        live = self._live.get(out.rid)
        if live is None:
            return
        if out.first_token:
            live.first_token = now
            self.metrics.on_first_token(now - live.arrival, out.prompt_tokens, out.cached_tokens)
        for _ in out.token_ids:
            self.metrics.on_token(None if live.last_token is None else now - live.last_token)
            live.last_token = now
        if out.finished:
            del self._live[out.rid]
            ttft = None if live.first_token is None else live.first_token - live.arrival
            self.metrics.on_finish(now - live.arrival, ttft, out.completion_tokens)
        live.queue.put_nowait(out)

    def _publish_events(self) -> None:
        self.streams.publish_events(self.core.drain_events())


async def serve(cfg: ServerConfig, announce: bool = True) -> None:
    """Run one engine until SIGINT/SIGTERM or cancellation, then shut down cleanly. SIGTERM drains the
    requests in flight first (at most ``cfg.drain_timeout`` seconds), as SGLang does; SIGINT stops at once.
    """
    server = EngineServer(cfg)
    await server.start()
    try:
        async with stop_signals() as stop:
            if announce:
                announce_ready("engine", server.endpoints, instance=None)
            log.info("engine serving: %s", server.endpoints)
            await stop.wait()
            if stop.by is signal.SIGTERM:
                log.info("SIGTERM: draining (at most %g s)", cfg.drain_timeout)
                await server.drain(cfg.drain_timeout)
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.engine.server``: parse flags, serve until a signal. Returns the exit status."""
    cfg = parse_args(argv)
    return run_process(lambda: serve(cfg), what="the emulated engine", log_level=cfg.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
