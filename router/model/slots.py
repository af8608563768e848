"""Decision slots: k active routers taking turns to decide, so that none decides on a state that lacks a
peer's decision still in flight. Pure (the clock is the caller's).

Theory of operation
-------------------
Active routers (:mod:`router.active`) see each other's decisions a propagation delay late; two that decide
within that delay may both send a request to the same instance (a *race*; bursts of simultaneous
arrivals make races common, docs/scale.md). With slots, time is cut into periods of ``count x slot``
seconds (Unix time, so routers on synchronised clocks agree), router ``index`` owns the slot starting at
``index x slot`` of each period, and decides only in the first half of it. Everything it decides reaches
its peers within the second half as long as the propagation delay is under ``slot / 2``, so every router
decides knowing every earlier decision of every peer: no race. The price is the wait for one's own slot,
up to ``(count - 1/2) x slot`` seconds (mean ``count x slot / 2`` for a uniform arrival), and the need for
clocks that agree to well under ``slot / 2`` (NTP in one data centre: ~0.1-1 ms; one machine: exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DecisionSlots"]


@dataclass(frozen=True, slots=True)
class DecisionSlots:
    """Router ``index`` of ``count`` decides only in the first half of its ``slot``-second slot of every
    ``count x slot``-second period. Raises ``ValueError`` for ``slot <= 0`` or an index outside
    ``[0, count)``."""

    index: int
    count: int
    slot: float

    def __post_init__(self) -> None:
        if not self.slot > 0 or not 0 <= self.index < self.count:
            raise ValueError(
                f"need slot > 0 and 0 <= index < count, got {self.slot}, {self.index}, {self.count}"
            )

    @property
    def period(self) -> float:
        """Seconds until the same router's slot comes again."""
        return self.count * self.slot

    def next_start(self, now: float) -> float:
        """The first instant at or after ``now`` (Unix seconds, or any clock the routers share) at which
        this router may decide: ``now`` itself inside the first half of its slot. Does not mutate."""
        p = self.period
        lo = math.floor(now / p) * p + self.index * self.slot
        if now < lo:
            return lo
        if now < lo + self.slot / 2:
            return now
        return lo + p

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until this router may decide (0 inside the first half of its slot)."""
        return max(0.0, self.next_start(now) - now)
