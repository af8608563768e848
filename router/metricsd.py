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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kvindex.protocol import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    Heartbeat,
    LoadReport,
    RequestFinished,
    RequestRouted,
    RouterHeartbeat,
)
from kvindex.protocol.cluster_file import ClusterFileError, read_cluster_file
from kvindex.protocol.numbered import DecisionReceived, Received
from kvindex.protocol.ready import announce_ready
from kvindex.transport import Stop, run_process, stop_signals
from router.auth import AuthConfigError, KeyRing, require_key
from router.decisions import DecisionSubscriber
from router.metrics import SCORE_BUCKETS
from router.subscriber import Subscriber

log = logging.getLogger("router.metricsd")

RESYNC_KINDS = ("gap", "epoch", "seq_back")
"""Discontinuities after which a router resyncs an instance from a snapshot."""


@dataclass(frozen=True)
class MetricsdConfig:
    """The daemon's configuration. Times in seconds.

    An instance is ``up`` while its last heartbeat is healthy and younger than ``heartbeat_timeout``; a
    router likewise with ``router_timeout``. Routers silent for ``forget_after`` drop out of the gauges.
    """

    host: str = "127.0.0.1"
    port: int = 9400
    agents: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ()
    cluster_file: Path | None = None
    heartbeat_timeout: float = 1.0
    router_timeout: float = 0.5
    forget_after: float = 300.0
    log_level: str = "INFO"
    metrics_keys: tuple[str, ...] = field(default=(), repr=False)
    """Key specs (``file:PATH``, ``env:NAME`` or the key; router/auth.py) for ``/metrics``; none: open."""


def parse_args(argv: Sequence[str] | None = None) -> MetricsdConfig:
    """Parse the command line into a :class:`MetricsdConfig` (argparse only here)."""
    p = argparse.ArgumentParser(
        prog="python -m router.metricsd",
        description="Prometheus metrics of an SGLang cluster from its agents' streams and its routers' "
        "decision streams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to bind")
    p.add_argument("--port", type=int, default=9400, help="HTTP port for /metrics (0 = OS-assigned)")
    p.add_argument("--agent", dest="agents", action="append", default=[], metavar="ENDPOINT",
                   help="an agent's PUB endpoint; repeat per agent")  # fmt: skip
    p.add_argument("--decisions", action="append", default=[], metavar="ENDPOINT",
                   help="a router's decision stream (its --decisions-port); repeat per router")  # fmt: skip
    p.add_argument(
        "--cluster-file",
        type=Path,
        default=None,
        help="launch cluster's cluster.json: follow every agent and router it lists, as they change",
    )
    p.add_argument("--heartbeat-timeout", type=float, default=1.0, help="instance down after this silence")
    p.add_argument("--router-timeout", type=float, default=0.5, help="router down after this silence")
    p.add_argument("--forget-after", type=float, default=300.0, help="drop a silent router's gauges")
    p.add_argument("--log-level", default="INFO", type=str.upper, help="log level")
    p.add_argument(
        "--metrics-key",
        dest="metrics_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="scrapers send 'Authorization: Bearer KEY' for /metrics (/health stays open); KEY is "
        "file:PATH (one key a line), env:NAME (comma-separated) or the key itself (visible in ps: avoid); "
        "repeat to accept several; SIGHUP re-reads files (default: no key, /metrics open)",
    )
    ns = p.parse_args(argv)
    if not 0 <= ns.port <= 65535:
        p.error(f"--port out of range: {ns.port}")
    return MetricsdConfig(
        host=ns.host,
        port=ns.port,
        agents=tuple(ns.agents),
        decisions=tuple(ns.decisions),
        cluster_file=ns.cluster_file,
        heartbeat_timeout=ns.heartbeat_timeout,
        router_timeout=ns.router_timeout,
        forget_after=ns.forget_after,
        log_level=ns.log_level,
        metrics_keys=tuple(ns.metrics_keys),
    )


@dataclass
class _Instance:
    heartbeat: Heartbeat | None = None
    heartbeat_at: float = 0.0
    load: LoadReport | None = None


@dataclass
class _Router:
    heartbeat: RouterHeartbeat
    heartbeat_at: float


class MetricsDaemon:
    """Subscriptions + counters + the HTTP endpoint. Single owner: the event loop.

    Raises :class:`~router.auth.AuthConfigError` from the constructor for a key spec without a key."""

    def __init__(self, cfg: MetricsdConfig, mono: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._mono = mono
        self.keys = KeyRing(cfg.metrics_keys, "metrics")
        self.ctx = zmq.asyncio.Context()
        self.agents = Subscriber(cfg.agents, self.on_agent, ctx=self.ctx)
        self.routers = DecisionSubscriber(cfg.decisions, self.on_decision, ctx=self.ctx)
        self.instances: dict[str, _Instance] = {}
        self.router_state: dict[str, _Router] = {}
        self.registry = r = CollectorRegistry()
        i, rt = ["instance"], ["router"]
        self.kv_events = Counter("lmetric_instance_kv_events", "KV events by type", [*i, "type"], registry=r)
        self.kv_blocks = Counter(
            "lmetric_instance_kv_blocks", "Blocks in KV events by event type", [*i, "type"], registry=r
        )
        self.frames = Counter(
            "lmetric_instance_frames", "Agent frames by message kind", [*i, "kind"], registry=r
        )
        self.gaps = Counter("lmetric_instance_seq_gaps", "Sequence gaps in an agent's stream", i, registry=r)
        self.lost = Counter("lmetric_instance_lost_frames", "Agent frames never received", i, registry=r)
        self.resyncs = Counter(
            "lmetric_instance_resyncs",
            "Stream discontinuities that make a router resync the instance from a snapshot",
            [*i, "reason"],
            registry=r,
        )
        self.decisions = Counter(
            "lmetric_router_decisions", "Routing decisions", [*rt, "policy", "instance"], registry=r
        )
        self.score = Histogram(
            "lmetric_router_decision_score",
            "Policy value of the chosen instance (LMetric: (queued prefill + new tokens) x (batch size + 1))",
            [*rt, "policy"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.failure_cases = Counter(
            "lmetric_router_failure_cases", "Detected policy failure cases", [*rt, "kind"], registry=r
        )
        self.finished = Counter(
            "lmetric_router_requests_finished",
            "Routed requests that ended, by outcome",
            [*rt, "instance", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("lmetric_router_prompt_tokens", "Prompt tokens routed", rt, registry=r)
        self.new_tokens = Counter(
            "lmetric_router_new_tokens", "Routed prompt tokens not expected cached", rt, registry=r
        )
        self.decision_lost = Counter(
            "lmetric_router_decision_lost_frames", "Decision-stream frames never received", rt, registry=r
        )
        r.register(_GaugeCollector(self))
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._cluster_mtime = 0.0
        self.url = ""

    # ------------------------------------------------------------------------------------- streams

    def on_agent(self, rec: Received) -> None:
        """Count one agent frame. Mutates; never raises on content."""
        msg = rec.msg
        name = msg.instance
        st = self.instances.setdefault(name, _Instance())
        self.frames.labels(name, type(msg).__name__).inc()
        if rec.discontinuity in RESYNC_KINDS:
            self.resyncs.labels(name, rec.discontinuity).inc()
        if rec.discontinuity == "gap":
            self.gaps.labels(name).inc()
            self.lost.labels(name).inc(rec.lost)
        if isinstance(msg, EventBatch):
            for ev in msg.events:
                kind = type(ev).__name__
                self.kv_events.labels(name, kind).inc()
                if isinstance(ev, BlockStored | BlockRemoved):
                    self.kv_blocks.labels(name, kind).inc(len(ev.block_hashes))
        elif isinstance(msg, LoadReport):
            st.load = msg
        else:
            st.heartbeat = msg
            st.heartbeat_at = self._mono()

    def on_decision(self, rec: DecisionReceived) -> None:
        """Count one decision-stream frame. Mutates; never raises on content."""
        msg = rec.msg
        router = f"{msg.router_epoch:x}"
        if rec.discontinuity == "gap":
            self.decision_lost.labels(router).inc(rec.lost)
        if isinstance(msg, RequestRouted):
            self.decisions.labels(router, msg.policy, msg.instance).inc()
            self.score.labels(router, msg.policy).observe(msg.score)
            for kind in msg.failure_cases:
                self.failure_cases.labels(router, kind).inc()
            self.prompt_tokens.labels(router).inc(msg.prompt_tokens)
            self.new_tokens.labels(router).inc(msg.new_tokens)
        elif isinstance(msg, RequestFinished):
            self.finished.labels(router, msg.instance, msg.status).inc()
        else:
            self.router_state[router] = _Router(msg, self._mono())

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


class _GaugeCollector(Collector):
    """Last reports of every instance and router, read at scrape time."""

    def __init__(self, d: MetricsDaemon) -> None:
        self._d = d

    def collect(self) -> Iterator[Metric]:
        d = self._d
        now = d._mono()

        def fam(name: str, doc: str, labels: Sequence[str] = ("instance",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        up = fam("lmetric_instance_up", "1 while a healthy heartbeat is younger than the timeout")
        age = fam("lmetric_instance_heartbeat_age_seconds", "Seconds since the last heartbeat")
        blocks = fam("lmetric_instance_cached_blocks", "Blocks in the agent's mirror of the engine cache")
        load_fams = {
            "running": fam("lmetric_instance_running_requests", "Running requests (last load report)"),
            "waiting": fam("lmetric_instance_waiting_requests", "Waiting requests (last load report)"),
            "queued_prefill_tokens": fam("lmetric_instance_queued_prefill_tokens", "Uncached prompt tokens not yet prefilled"),
            "kv_used_tokens": fam("lmetric_instance_kv_used_tokens", "KV cache tokens in use"),
            "kv_capacity_tokens": fam("lmetric_instance_kv_capacity_tokens", "KV cache capacity in tokens"),
            "max_running_requests": fam("lmetric_instance_max_running_requests", "Engine's running-request cap"),
        }  # fmt: skip
        usage = fam("lmetric_instance_kv_usage_ratio", "KV tokens in use / capacity")
        for name, st in sorted(d.instances.items()):
            hb = st.heartbeat
            if hb is not None:
                a = now - st.heartbeat_at
                age.add_metric([name], a)
                up.add_metric([name], float(hb.engine_healthy and a <= d.cfg.heartbeat_timeout))
                blocks.add_metric([name], hb.cached_blocks)
            if st.load is not None:
                for attr, f in load_fams.items():
                    f.add_metric([name], getattr(st.load, attr))
                cap = st.load.kv_capacity_tokens
                usage.add_metric([name], st.load.kv_used_tokens / cap if cap else 0.0)
        yield from (up, age, blocks, *load_fams.values(), usage)

        rl = ("router",)
        r_up = fam("lmetric_router_up", "1 while the router's heartbeats arrive", rl)
        r_primary = fam("lmetric_router_primary", "1 if the router's last heartbeat said primary", rl)
        r_age = fam("lmetric_router_heartbeat_age_seconds", "Seconds since the router's last heartbeat", rl)
        r_fams = {
            "index_blocks": fam("lmetric_router_index_blocks", "Distinct blocks in the router's index", rl),
            "speculative_blocks": fam("lmetric_router_speculative_blocks", "Speculative index entries", rl),
            "inflight": fam("lmetric_router_inflight_requests", "Requests the router has in flight", rl),
            "instances_routable": fam("lmetric_router_instances_routable", "Instances the router can route to", rl),
        }  # fmt: skip
        primaries = actives = 0
        for router, rs in sorted(d.router_state.items()):
            a = now - rs.heartbeat_at
            if a > d.cfg.forget_after:
                continue
            alive = a <= d.cfg.router_timeout
            is_primary = rs.heartbeat.role == "primary"
            primaries += int(alive and is_primary)
            actives += int(alive and rs.heartbeat.role == "active")
            r_up.add_metric([router], float(alive))
            r_primary.add_metric([router], float(is_primary))
            r_age.add_metric([router], a)
            for attr, f in r_fams.items():
                f.add_metric([router], getattr(rs.heartbeat, attr))
        yield from (r_up, r_primary, r_age, *r_fams.values())
        yield GaugeMetricFamily(
            "lmetric_primaries", "Routers alive and primary (1 when healthy)", value=primaries
        )
        yield GaugeMetricFamily(
            "lmetric_active_routers",
            "Routers alive with role active (launch cluster --routers K: K when healthy, and no primary)",
            value=actives,
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
