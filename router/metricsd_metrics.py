"""What the metrics daemon (:mod:`router.metricsd`) counts and remembers: :class:`ClusterMetrics`, the
base of :class:`~router.metricsd.MetricsDaemon`, holds the Prometheus registry, the counters fed by every
agent frame and decision-stream frame (``on_agent``, ``on_decision``) and the last report of each instance
and router, which the gauges (:class:`_GaugeCollector`) read at scrape time. No I/O: the daemon's
subscriptions feed it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
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
from kvindex.protocol.numbered import DecisionReceived, Received
from router.metrics import SCORE_BUCKETS
from router.metricsd_config import MetricsdConfig

RESYNC_KINDS = ("gap", "epoch", "seq_back")
"""Discontinuities after which a router resyncs an instance from a snapshot."""


@dataclass
class _Instance:
    heartbeat: Heartbeat | None = None
    heartbeat_at: float = 0.0
    load: LoadReport | None = None


@dataclass
class _Router:
    heartbeat: RouterHeartbeat
    heartbeat_at: float


class ClusterMetrics:
    """The counters and last reports of every instance and router. Single owner: the event loop."""

    def __init__(self, cfg: MetricsdConfig, mono: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._mono = mono
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


class _GaugeCollector(Collector):
    """Last reports of every instance and router, read at scrape time."""

    def __init__(self, d: ClusterMetrics) -> None:
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
