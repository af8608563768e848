"""Prometheus metrics of the emulated engine, under SGLang's names (``sglang:*``, label ``model_name``).

Each engine owns its :class:`CollectorRegistry`, so several engines (or tests) in one process never
collide. Gauges are refreshed from the core when scraped; counters and histograms are fed as tokens
are delivered.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agents.engine.core import EngineCore

# SGLang's bucket layouts (srt/metrics/collector.py), in seconds.
_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 160.0)
_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1,
                0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                150.0, 200.0, 250.0, 300.0, 350.0, 500.0, 1000.0)  # fmt: skip
_LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class EngineMetrics:
    """The ``/metrics`` exposition of one engine."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, lbl, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, lbl, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, lbl, buckets=buckets, registry=r).labels(model_name)

        self.num_running_reqs = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.num_queue_reqs = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "The number of used KV tokens.")
        self.token_usage = gauge("sglang:token_usage", "The token usage (used / max_total_num_tokens).")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate (cached / prompt).")
        self.max_total_num_tokens = gauge("sglang:max_total_num_tokens", "KV cache capacity in tokens.")
        self.prompt_tokens = counter("sglang:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("sglang:generation_tokens", "Number of generation tokens processed.")
        self.cached_tokens = counter("sglang:cached_tokens", "Number of prompt tokens served from the cache.")
        self.num_requests = counter("sglang:num_requests", "Number of requests finished.")
        self.ttft = histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS,
        )
        self.itl = histogram(
            "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS
        )
        self.tpot = histogram(
            "sglang:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            _ITL_BUCKETS,
        )
        self.e2e = histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of end-to-end request latency in seconds.",
            _E2E_BUCKETS,
        )
        # Not SGLang's: how faithfully this emulator kept its modelled pace on a busy host.
        self.step_lateness = histogram(
            "emulated_engine:step_lateness_seconds",
            "Seconds each step's outputs were delivered after the modelled step end (event-loop wake-up"
            " delay; later steps are shortened to catch up).",
            _LATENESS_BUCKETS,
        )
        self.pace_resync = counter(
            "emulated_engine:pace_resync_seconds",
            "Modelled time given up because the event loop fell more than the catch-up window behind"
            " (every later token is delivered that much later than the model says).",
        )

    def on_first_token(self, ttft_s: float, prompt_tokens: int, cached_tokens: int) -> None:
        """A request produced its first token ``ttft_s`` seconds after arrival."""
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)

    def on_token(self, gap_s: float | None) -> None:
        """One generated token; ``gap_s`` since the previous one of the request (None for the first)."""
        self.generation_tokens.inc()
        if gap_s is not None:
            self.itl.observe(gap_s)

    def on_finish(self, e2e_s: float, ttft_s: float | None, completion_tokens: int) -> None:
        """A request finished ``e2e_s`` seconds after arrival."""
        self.num_requests.inc()
        self.e2e.observe(e2e_s)
        if ttft_s is not None and completion_tokens > 1:
            self.tpot.observe((e2e_s - ttft_s) / (completion_tokens - 1))

    def render(self, core: EngineCore) -> bytes:
        """Refresh the gauges from ``core`` and return the text exposition."""
        stat = core.load_stat()
        self.num_running_reqs.set(stat.num_running_reqs)
        self.num_queue_reqs.set(stat.num_waiting_reqs)
        self.num_used_tokens.set(stat.num_tokens)
        self.token_usage.set(stat.num_tokens / max(1, stat.max_total_num_tokens))
        self.cache_hit_rate.set(core.cache_hit_rate)
        self.max_total_num_tokens.set(stat.max_total_num_tokens)
        return generate_latest(self.registry)
