"""Per-instance concurrency limits that follow each engine's own capacity. Pure: no I/O, no clock.

Why (issue 13, docs/robustness.md "Overload"): a fixed bound on requests in flight cannot know how many
requests an engine runs at once (its KV cache, its ``max_running_requests`` and the prompts decide), so
beyond capacity the excess queued inside the engines, where it costs every admitted request TTFT; bounds
in queued prefill tokens or in seconds learned from past TTFTs lag behind the queue they try to bound.
The engine's own report says it directly: requests *waiting* (SGLang's waiting queue: not yet scheduled
for want of KV cache, slots or prefill budget) beside those *running*.

The rule, per instance, at each load report (AIMD, as TCP's congestion window):

* the engine queues requests beyond its prefill budget (``waiting > queue_allowance``): the limit drops to
  what it runs now plus the allowance (never below ``floor``): more in flight would only wait there;
* no such queue and the router keeps the instance at its limit (``inflight >= limit``): the limit grows by
  one, probing for room (never above ``ceiling``);
* otherwise it stays.

``queue_allowance`` (requests) lets a short queue form, as chunked prefill makes one at any load: a
prompt longer than one chunk waits a step or two whatever the load. The router admits while the sum of
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

    Raises ``ValueError`` unless ``1 <= floor <= ceiling`` and ``queue_allowance >= 0``.
    """

    __slots__ = ("_limits", "ceiling", "floor", "queue_allowance")

    def __init__(self, ceiling: int, floor: int = 1, queue_allowance: int = 1) -> None:
        if not 1 <= floor <= ceiling or queue_allowance < 0:
            raise ValueError(
                f"need 1 <= floor <= ceiling and queue_allowance >= 0, got {floor}, {ceiling}, {queue_allowance}"
            )
        self.ceiling = ceiling
        self.floor = floor
        self.queue_allowance = queue_allowance
        self._limits: dict[str, int] = {}

    def limit_of(self, name: str) -> int:
        """The instance's limit in requests (``ceiling`` before its first report)."""
        return self._limits.get(name, self.ceiling)

    def on_report(self, name: str, running: int, waiting: int, inflight: int) -> int:
        """Adapt ``name``'s limit to a load report (``running``, ``waiting`` requests on the engine;
        ``inflight``: requests the router has open to it now). Returns the new limit. Mutates."""
        limit = self.limit_of(name)
        if waiting > self.queue_allowance:
            limit = max(self.floor, min(limit, running + self.queue_allowance))
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
