"""Per-instance concurrency limits that follow each engine's own capacity. Pure: no I/O, no clock.

Why (issue 13, docs/robustness.md "Overload"): a fixed bound on requests in flight cannot know how many
requests an engine runs at once (its KV cache, its ``max_running_requests`` and the prompts decide), so
beyond capacity the excess queued inside the engines, where it costs every admitted request TTFT; bounds
in queued prefill tokens or in seconds learned from past TTFTs lag behind the queue they try to bound.
The engine's own report says it directly: requests *waiting* (SGLang's waiting queue: not yet scheduled
for want of KV cache, slots or prefill budget) beside those *running*.

The rule, per instance, at each load report (AIMD, as TCP's congestion window):

* the engine queues beyond its allowance: more than ``queue_allowance`` requests wait, or the waiting
  requests' uncached prompt tokens are more than ``queue_seconds`` of its prefill (tokens times its own
  measured prefill seconds per token, SGLang's ``total_prefill_busy_us / total_prefill_uncached_tokens``):
  the limit drops to what it runs now plus the requests that may wait (the allowance, at most the ones
  waiting; never below ``floor``): more in flight would only wait there;
* no such queue and the router keeps the instance at its limit (``inflight >= limit``): the limit grows by
  one, probing for room (never above ``ceiling``);
* otherwise it stays.

``queue_allowance`` (requests) lets a short queue form, as chunked prefill makes one at any load: a
prompt longer than one chunk waits a step or two whatever the load. ``queue_seconds`` bounds the same
queue in time: prompt lengths are heavy-tailed (Mooncake's p99 is 7x its mean), so two waiting requests
can be 0.1 s of prefill or 10 s, and the time is what every request admitted behind them adds to its
TTFT (docs/robustness.md "Overload"). The router admits while the sum of
the routable instances' limits exceeds the requests in flight (:mod:`router.admission`); the excess waits
in the router's short queue or is refused at once.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConcurrencyLimits"]


class ConcurrencyLimits:
    """Per-instance in-flight limits (see the module docstring).

    Args:
        ceiling: the largest limit (requests; ``--max-inflight-per-instance``), also a new instance's.
        floor: the smallest limit (requests, >= 1).
        queue_allowance: waiting requests an engine may have before its limit drops.
        queue_seconds: seconds of prefill work an engine may have waiting before its limit drops
            (0 = no bound in time).

    Raises ``ValueError`` unless ``1 <= floor <= ceiling``, ``queue_allowance >= 0`` and
    ``queue_seconds >= 0``.
    """

    __slots__ = ("_limits", "ceiling", "floor", "queue_allowance", "queue_seconds")

    def __init__(
        self, ceiling: int, floor: int = 1, queue_allowance: int = 1, queue_seconds: float = 0.0
    ) -> None:
        if not 1 <= floor <= ceiling or queue_allowance < 0 or queue_seconds < 0:
            raise ValueError(
                "need 1 <= floor <= ceiling, queue_allowance >= 0 and queue_seconds >= 0, got "
                f"{floor}, {ceiling}, {queue_allowance}, {queue_seconds}"
            )
        self.ceiling = ceiling
        self.floor = floor
        self.queue_allowance = queue_allowance
        self.queue_seconds = queue_seconds
        self._limits: dict[str, int] = {}

    def limit_of(self, name: str) -> int:
        """The instance's limit in requests (``ceiling`` before its first report)."""
        return self._limits.get(name, self.ceiling)

    def on_report(
        self, name: str, running: int, waiting: int, inflight: int, queued_seconds: float | None = None
    ) -> int:
        """Adapt ``name``'s limit to a load report (``running``, ``waiting`` requests on the engine;
        ``inflight``: requests the router has open to it now; ``queued_seconds``: the engine's waiting
        prefill work in seconds, ``None`` if unknown). Returns the new limit. Mutates."""
        limit = self.limit_of(name)
        too_long = (
            bool(self.queue_seconds) and queued_seconds is not None and queued_seconds > self.queue_seconds
        )
        if waiting > self.queue_allowance or (too_long and waiting > 0):
            limit = max(self.floor, min(limit, running + min(waiting, self.queue_allowance)))
        elif inflight >= limit:
            limit = min(self.ceiling, limit + 1)
        self._limits[name] = limit
        return limit

    def total(self, names: Iterable[str]) -> int:
        """Sum of the limits of ``names`` (the routable instances), in requests."""
        return sum(self._limits.get(n, self.ceiling) for n in names)

    def forget(self, name: str) -> None:
        """Drop ``name``'s limit (it starts at ``ceiling`` again if it comes back). Mutates."""
        self._limits.pop(name, None)

    def snapshot(self) -> dict[str, int]:
        """Every instance's limit (for ``GET /router/state``)."""
        return dict(self._limits)
