"""The router's Prometheus metrics, on its own ``CollectorRegistry`` (never the process-global one).

Request-path metrics (counters and histograms) are updated by the HTTP handlers. Everything the core and
the subscriber already count is read at scrape time by :class:`_StateCollector`, so the core stays free of
prometheus-client and the counters have a single source of truth.

Latencies are measured at the router, in seconds: ``router_ttft_seconds`` from request arrival to the
first streamed chunk sent to the client (streamed requests only); ``router_tpot_seconds`` the mean time
between SSE ``data:`` events after the first, per streamed request with at least two events (chunk arrival
times stand in for token times); ``router_e2e_latency_seconds`` from arrival to the last byte sent.

Per decision: ``router_decision_score`` (the policy's value for the chosen instance: LMetric's product in
token-requests), and ``router_prompt_tokens_total`` / ``router_matched_tokens_total`` (prompt tokens, and
those the index said were cached on the chosen instance: their ratio is the router's expected hit ratio).
Per instance, read at scrape time: up, routable, the router's effective batch size and queued prefill
tokens (last load report plus its own not-yet-reported dispatches), requests in flight, pending
dispatches and speculative blocks. HA metrics (role, takeovers, mirroring) come from :mod:`router.ha`.
Staleness of the agents' streams: ``router_kv_event_age_seconds`` (engine publish to router receipt of a
KV event batch) and ``router_load_report_age_seconds`` (agent receipt to router receipt of a load report).
Failing fast and overload (docs/robustness.md): timeouts by kind, failed attempts by kind, retries,
aborts sent to engines, rejections by reason, queue wait; read at scrape time, the admission gauges and
each instance's breaker state (:class:`_RobustnessCollector`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kvindex.protocol import EventBatch, LoadReport
from router.breaker import STATE_VALUES
from router.model.lmetric import FAILURE_KINDS
from router.model.policies import Decision

if TYPE_CHECKING:
    from router.admission import Admission
    from router.breaker import Breakers
    from router.model.model import RoutingModel
    from router.subscriber import Subscriber

_AGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
_LATENCY_BUCKETS = (*Histogram.DEFAULT_BUCKETS[:-1], 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5)
SCORE_BUCKETS = (0.0, *(m * 10.0**e for e in range(2, 10) for m in (1.0, 2.5, 5.0)), 1e10)
"""LMetric products, in token-requests: 0 (fully cached, nothing queued) up to 1e10 (a 100k-token backlog
times 100 requests)."""


class RouterMetrics:
    """The registry plus the request-path instruments. ``render()`` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, core: RoutingModel, subscriber: Subscriber | None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "router_requests_total",
            "Generation requests answered, by endpoint and outcome (HTTP status, 'stream_error' for an "
            "engine failing mid-stream, 'client_closed' for a client gone before the end)",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "router_ttft_seconds",
            "Arrival to first streamed chunk, streamed requests",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "router_tpot_seconds",
            "Mean time between streamed SSE events after the first, per streamed request",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "router_e2e_latency_seconds",
            "Arrival to last byte sent, requests an engine answered",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "router_retries_total",
            "Attempts re-routed to another instance after a failed attempt (nothing sent to the client)",
            registry=r,
        )
        self.attempt_failures = Counter(
            "router_attempt_failures_total",
            "Failed attempts on an engine, by kind (connect, timeout_connect, timeout_headers, "
            "timeout_idle, timeout_total, status_429, status_5xx, broken, instance_down)",
            ["kind"],
            registry=r,
        )
        self.timeouts = Counter(
            "router_upstream_timeouts_total",
            "Engine waits that timed out, by kind (connect, headers, idle, total)",
            ["kind"],
            registry=r,
        )
        self.timeouts_excused = Counter(
            "router_timeouts_excused_total",
            "Engine timeouts not charged to the instance: the router's own event loop was late for at "
            "least half of the attempt (router.looplag)",
            registry=r,
        )
        for kind in ("connect", "headers", "idle", "total"):
            self.timeouts.labels(kind)
        self.aborts = Counter(
            "router_upstream_aborts_total",
            "POST /abort_request sent to an engine, by reason (client_closed, attempt_failed)",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "router_rejected_total",
            "Requests refused before routing, by reason (queue_full, queue_wait, queue_timeout, overloaded: 429; "
            "body_too_large: 413; body_timeout: 408)",
            ["reason"],
            registry=r,
        )
        for reason in (
            "queue_full",
            "queue_wait",
            "queue_timeout",
            "overloaded",
            "body_too_large",
            "body_timeout",
        ):
            self.rejected.labels(reason)
        self.queue_wait = Histogram(
            "router_queue_wait_seconds",
            "Time admitted requests waited in the admission queue (0 for those admitted at once)",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.score = Histogram(
            "router_decision_score",
            "Policy value of the chosen instance per decision (LMetric: (queued prefill + new tokens) x "
            "(batch size + 1); 0 for round robin)",
            ["policy"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "router_prompt_tokens", "Prompt tokens of routed requests (every attempt)", registry=r
        )
        self.matched_tokens = Counter(
            "router_matched_tokens",
            "Prompt tokens the index expected cached on the chosen instance (every attempt)",
            registry=r,
        )
        self.event_age = Histogram(
            "router_kv_event_age_seconds",
            "Engine publish to router receipt of each KV event batch (router clock minus the engine's"
            " KVEventBatch ts; assumes synchronised clocks): how stale the index is",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.load_age = Histogram(
            "router_load_report_age_seconds",
            "Agent receipt to router receipt of each load report (router clock minus the LoadReport ts)",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(core, subscriber))

    def watch(self, admission: Admission, breakers: Breakers, core: RoutingModel) -> None:
        """Export the admission gauges and the breakers' states, read at scrape time."""
        self.registry.register(_RobustnessCollector(admission, breakers, core))

    def observe_decision(self, decision: Decision, prompt_tokens: int) -> None:
        """Count one routing decision for a prompt of ``prompt_tokens`` tokens."""
        self.score.labels(decision.policy).observe(decision.score)
        self.prompt_tokens.inc(prompt_tokens)
        self.matched_tokens.inc(decision.cached_tokens)

    def observe_stream_age(self, msg: object, now: float) -> None:
        """Observe ``now`` (Unix seconds) minus the ``ts`` of an agent's EventBatch or LoadReport; other
        messages, and negative ages from skewed clocks (counted as 0), change nothing else."""
        if isinstance(msg, EventBatch):
            self.event_age.observe(max(0.0, now - msg.ts))
        elif isinstance(msg, LoadReport):
            self.load_age.observe(max(0.0, now - msg.ts))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Reads the core's and the subscriber's counters and gauges at scrape time."""

    def __init__(self, core: RoutingModel, subscriber: Subscriber | None) -> None:
        self._core = core
        self._sub = subscriber

    def collect(self) -> Iterator[Metric]:
        core = self._core
        stats = core.stats
        dec = CounterMetricFamily(
            "router_decisions",
            "Routing decisions by policy and chosen instance",
            labels=["policy", "instance"],
        )
        for (policy, inst), n in sorted(stats.decisions.items()):
            dec.add_metric([policy, inst], n)
        yield dec
        fail = CounterMetricFamily(
            "router_failure_cases",
            "Requests where a known failure case of the policy was detected, by kind",
            labels=["kind"],
        )
        for kind in sorted(set(FAILURE_KINDS) | set(stats.failure_cases)):
            fail.add_metric([kind], stats.failure_cases.get(kind, 0))
        yield fail
        res = CounterMetricFamily(
            "router_resyncs",
            "Snapshot resyncs started, by instance and reason",
            labels=["instance", "reason"],
        )
        for (inst, reason), n in sorted(stats.resyncs.items()):
            res.add_metric([inst, reason], n)
        yield res
        snapf = CounterMetricFamily(
            "router_snapshot_failures", "Failed or rejected snapshot fetches, by reason", labels=["reason"]
        )
        for reason, n in sorted(stats.snapshot_failures.items()):
            snapf.add_metric([reason], n)
        yield snapf
        down = CounterMetricFamily(
            "router_instance_down", "Transitions of an instance to DOWN, by reason", labels=["reason"]
        )
        for reason, n in sorted(stats.down_transitions.items()):
            down.add_metric([reason], n)
        yield down
        yield GaugeMetricFamily("router_instances_up", "Instances that are up", value=core.instances_up())
        yield GaugeMetricFamily(
            "router_instances_routable", "Instances up, synced and not suspect", value=core.routable_count()
        )
        idx = core.index
        yield GaugeMetricFamily(
            "router_index_blocks",
            "Distinct block hashes in the global index (held really or speculatively)",
            value=idx.total_blocks() if idx is not None else 0,
        )
        yield GaugeMetricFamily(
            "router_speculative_blocks",
            "Unconfirmed speculative index entries, all instances",
            value=idx.speculative_blocks() if idx is not None else 0,
        )
        per = GaugeMetricFamily(
            "router_instance_blocks", "Real blocks held per instance", labels=["instance"]
        )
        if idx is not None:
            for name in sorted(idx.instances()):
                per.add_metric([name], idx.blocks_of(name))
        yield per
        yield from _instance_gauges(core)
        if self._sub is not None:
            ss = self._sub.stats
            frames = CounterMetricFamily(
                "router_frames", "Stream frames decoded, by message type", labels=["kind"]
            )
            for kind, n in sorted(ss.frames.items()):
                frames.add_metric([kind], n)
            yield frames
            bad = CounterMetricFamily(
                "router_malformed_frames", "Stream frames skipped as malformed, by reason", labels=["reason"]
            )
            for reason, n in sorted(ss.malformed.items()):
                bad.add_metric([reason], n)
            yield bad
            disc = CounterMetricFamily(
                "router_stream_discontinuities",
                "Frames not following their agent's previous one, by kind",
                labels=["kind"],
            )
            for kind, n in sorted(ss.discontinuities.items()):
                disc.add_metric([kind], n)
            yield disc


_INSTANCE_GAUGES = (
    ("router_instance_up", "1 if the instance is up (healthy heartbeat within the timeout)"),
    ("router_instance_routable", "1 if the instance is up, synced and not suspect"),
    (
        "router_instance_batch_size",
        "Running + waiting requests as the router counts them (last report + own dispatches)",
    ),
    (
        "router_instance_queued_prefill_tokens",
        "Queued prefill tokens as the router counts them (last report + own dispatches)",
    ),
    ("router_instance_inflight", "Requests this router has open to the instance"),
    ("router_instance_pending", "Dispatches not yet covered by a load report"),
    ("router_instance_speculative_blocks", "Unconfirmed speculative index entries of the instance"),
)


def _instance_gauges(core: RoutingModel) -> Iterator[Metric]:
    fams = {name: GaugeMetricFamily(name, doc, labels=["instance"]) for name, doc in _INSTANCE_GAUGES}
    idx = core.index
    for st in sorted(core.table, key=lambda s: s.name):
        v = st.view()
        values = (
            float(st.up),
            float(st.is_routable),
            v.batch_size,
            v.queued_prefill_tokens,
            st.inflight,
            len(st.pending),
            idx.speculative_blocks(st.name) if idx is not None else 0,
        )
        for (name, _), val in zip(_INSTANCE_GAUGES, values, strict=True):
            fams[name].add_metric([st.name], val)
    yield from fams.values()


class _RobustnessCollector(Collector):
    """Admission gauges and per-instance breaker states, read at scrape time."""

    def __init__(self, admission: Admission, breakers: Breakers, core: RoutingModel) -> None:
        self._adm = admission
        self._br = breakers
        self._core = core

    def collect(self) -> Iterator[Metric]:
        adm = self._adm
        yield GaugeMetricFamily(
            "router_inflight_requests", "Requests admitted and not finished", value=adm.inflight
        )
        yield GaugeMetricFamily("router_queued_requests", "Requests waiting for admission", value=adm.queued)
        yield GaugeMetricFamily(
            "router_inflight_limit",
            "Current bound on requests in flight (per instance x routable)",
            value=adm.limit(),
        )
        state = GaugeMetricFamily(
            "router_instance_breaker_state",
            "Circuit breaker of the instance: 0 closed, 1 half-open, 2 open",
            labels=["instance"],
        )
        stalled = GaugeMetricFamily(
            "router_instance_stalled",
            "1 while the instance's engine load stream is silent",
            labels=["instance"],
        )
        opens = CounterMetricFamily(
            "router_breaker_opens", "Times the instance's circuit breaker opened", labels=["instance"]
        )
        names = sorted({st.name for st in self._core.table} | set(self._br.names()))
        for name in names:
            state.add_metric([name], STATE_VALUES[self._br.state(name)])
            stalled.add_metric([name], float(self._br.is_stalled(name)))
            opens.add_metric([name], self._br.opens(name))
        yield state
        yield stalled
        yield opens
        yield CounterMetricFamily(
            "router_breaker_ejections_capped",
            "Ejections refused because the cap on ejected instances was reached",
            value=self._br.capped,
        )
