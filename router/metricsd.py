"""``python -m router.metricsd``: the metrics daemon. Turns the cluster's streams into Prometheus metrics.

It subscribes to every agent (the router's own :class:`~router.subscriber.Subscriber`) and to every
router's decision stream (:class:`~router.decisions.DecisionSubscriber`), and serves ``GET /metrics``
(prometheus-client text format) and ``GET /health`` on its own HTTP port. It keeps no index: it only
counts and remembers the last report of each instance and each router, so it stays cheap whatever the
cluster's size. Routers come and go (a standby takes over, a new standby starts): with
``--cluster-file`` the daemon re-reads the launcher's cluster file and follows every router and agent
listed there; ``--decisions`` endpoints given on the command line are followed too. With ``--metrics-key``
``/metrics`` needs ``Authorization: Bearer KEY`` (401 with an OpenAI-style body otherwise; ``/health``
stays open); the HTTP port binds ``--host``, loopback by default (docs/security.md).

Metrics (``lmetric_`` prefix; per instance labelled ``instance``, per router ``router`` = its epoch in
hex, which changes when the process restarts):

* instance gauges: ``up``, ``heartbeat_age_seconds``, ``running_requests``, ``waiting_requests``,
  ``queued_prefill_tokens``, ``kv_used_tokens``, ``kv_capacity_tokens``, ``kv_usage_ratio``,
  ``cached_blocks``, ``max_running_requests``;
* instance counters: ``kv_events_total{type}`` and ``kv_blocks_total{type}`` (take ``rate()``),
  ``frames_total{kind}``, ``seq_gaps_total``, ``lost_frames_total``, ``resyncs_total{reason}`` (stream
  discontinuities that make a router resync from a snapshot: ``gap``, ``epoch``, ``seq_back``);
* router counters: ``decisions_total{policy,instance}``, ``decision_score`` (histogram, ``policy``),
  ``failure_cases_total{kind}``, ``requests_finished_total{instance,status}``, ``prompt_tokens_total``,
  ``new_tokens_total`` (``1 - new/prompt`` is the router's expected hit ratio),
  ``decision_lost_frames_total``;
* router gauges (from its heartbeats): ``router_up``, ``router_primary``, ``router_heartbeat_age_seconds``,
  ``router_index_blocks``, ``router_speculative_blocks``, ``router_inflight_requests``,
  ``router_instances_routable``; and ``lmetric_primaries``, the number of live primaries (1 when healthy).

This module is the daemon's shell (subscriptions, the cluster file, the HTTP port, ``serve``, ``main``); the
counters and gauges are :mod:`router.metricsd_metrics`, the configuration :mod:`router.metricsd_config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvindex.protocol.cluster_file import ClusterFileError, read_cluster_file
from kvindex.protocol.ready import announce_ready
from kvindex.transport import Stop, run_process, stop_signals
from router.auth import AuthConfigError, KeyRing, require_key
from router.decisions import DecisionSubscriber
from router.metricsd_config import MetricsdConfig, parse_args
from router.metricsd_metrics import ClusterMetrics
from router.subscriber import Subscriber

__all__ = ["MetricsDaemon", "MetricsdConfig", "main", "parse_args", "serve"]

log = logging.getLogger("router.metricsd")


class MetricsDaemon(ClusterMetrics):
    """Subscriptions + counters (:class:`~router.metricsd_metrics.ClusterMetrics`) + the HTTP endpoint.
    Single owner: the event loop.

    Raises :class:`~router.auth.AuthConfigError` from the constructor for a key spec without a key."""

    def __init__(self, cfg: MetricsdConfig, mono: Callable[[], float] = time.monotonic) -> None:
        self.keys = KeyRing(cfg.metrics_keys, "metrics")
        super().__init__(cfg, mono)
        self.ctx = zmq.asyncio.Context()
        self.agents = Subscriber(cfg.agents, self.on_agent, ctx=self.ctx)
        self.routers = DecisionSubscriber(cfg.decisions, self.on_decision, ctx=self.ctx)
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._cluster_mtime = 0.0
        self.url = ""

    # ----------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Subscribe, bind the HTTP port, start following the cluster file. Raises ``OSError`` /
        ``zmq.ZMQError``."""
        self.agents.start()
        self.routers.start()
        self.read_cluster_file()
        app = web.Application(middlewares=[require_key(self.keys)])
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/health", self._handle_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.cfg.host, self.cfg.port).start()
        self.url = f"http://{self.cfg.host}:{int(self._runner.addresses[0][1])}"
        if self.cfg.cluster_file is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="cluster-file")
        log.info(
            "metrics daemon on %s/metrics (%s): %d agent(s), %d router stream(s)%s",
            self.url,
            f"{len(self.keys)} key(s)" if self.keys.enabled else "no key",
            len(self.agents.endpoints),
            len(self.routers.endpoints),
            f", following {self.cfg.cluster_file}" if self.cfg.cluster_file else "",
        )

    def reload_keys(self) -> None:
        """Re-read the key files and variables (SIGHUP); on error the old keys stay. Never raises."""
        try:
            self.keys.load()
            log.info("keys reloaded: %d metrics key(s)", len(self.keys))
        except AuthConfigError as exc:
            log.error("keys not reloaded, the old ones stay: %s", exc)

    async def stop(self) -> None:
        """Close everything. Safe after a failed start."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._runner is not None:
            await self._runner.cleanup()
        await self.routers.close()
        await self.agents.close()
        self.ctx.destroy(linger=0)

    def read_cluster_file(self) -> None:
        """Follow every agent and router the cluster file lists (if it changed). Never raises."""
        path = self.cfg.cluster_file
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime
            if mtime == self._cluster_mtime:
                return
            info = read_cluster_file(path)
            self._cluster_mtime = mtime
            for ep in info.endpoints("agent", "pub"):
                self.agents.add_endpoint(ep)
            for ep in info.endpoints("router-", "decisions", running_only=True):
                self.routers.add_endpoint(ep)
        except (OSError, ClusterFileError, zmq.ZMQError) as exc:
            log.debug("cluster file %s not read: %s", path, exc)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.read_cluster_file()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "instances": len(self.instances), "routers": len(self.router_state)}
        )


async def serve(
    cfg: MetricsdConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[MetricsDaemon], None] | None = None,
) -> None:
    """Run the daemon until SIGINT/SIGTERM or ``stop``; announce READY (role ``metrics``) or call
    ``on_ready``. Raises what :meth:`MetricsDaemon.start` raises."""
    async with stop_signals(Stop(stop) if stop is not None else None) as stopped:
        daemon = MetricsDaemon(cfg)
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / a side thread
                loop.add_signal_handler(signal.SIGHUP, daemon.reload_keys)
            await daemon.start()
            if on_ready is not None:
                on_ready(daemon)
            else:
                announce_ready("metrics", {"http": daemon.url})
            await stopped.wait()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            await daemon.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m router.metricsd``. Returns the exit status (1: it could not start)."""
    cfg = parse_args(argv)
    return run_process(
        lambda: serve(cfg),
        what="the metrics daemon",
        log_level=cfg.log_level,
        fatal=(OSError, zmq.ZMQError, AuthConfigError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
