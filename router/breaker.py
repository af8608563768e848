"""Per-instance circuit breakers, with a cap on how many instances may be ejected at once. Pure.

Theory of operation. Each instance's breaker is ``closed`` (routable), ``open`` (ejected: the router
passes it in ``exclude`` to :meth:`router.model.model.RoutingModel.route`) or ``half_open`` (one probe
request may go; while it is in flight the instance stays ejected). A breaker opens when ``failures``
attempts in a row failed on the instance, all within the last ``window`` seconds (a success in between
starts the count again, so a busy instance with rare errors never opens). After ``open_for`` seconds it is
half-open: the next routing decision may pick it; that request's outcome closes the breaker (success) or
opens it again (failure). Separately, an instance can be ``stalled`` (its engine's load stream went
silent while its agent still beats, :meth:`set_stalled`): ejected until the stream resumes.

Ejections never exceed ``max_ejected`` of the known instances (rounded down, at least one): past it a
breaker that should open stays closed and the refusal is counted (``capped``). Every instance ejected at
once would only move the failure from the engines to the router's 503s; Envoy's outlier detection caps
ejections the same way (``max_ejection_percent``).

Why not a library: ``purgatory`` and ``aiobreaker`` wrap a call in a context manager and keep one
breaker per name, with wall-clock TTLs; neither has a cap across breakers, a probe that is a routing
decision, or a state that a router can read synchronously at routing time (docs/robustness.md).
Single owner (the event loop); clock injected; no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
"""The state as the number ``router_instance_breaker_state`` exports."""


@dataclass
class _Breaker:
    state: str = CLOSED
    failures: list[float] = field(default_factory=list)  # times of the failures in a row (bounded)
    opened_at: float = 0.0
    probing: bool = False
    stalled: bool = False
    opens: int = 0


class Breakers:
    """The breakers of every instance (created on first mention). Mutating methods say so.

    Args:
        failures: failures in a row that open a breaker (>= 1).
        window: seconds within which those failures must fall.
        open_for: seconds an open breaker waits before letting a probe through.
        max_ejected: the largest share of known instances ejected at once (0..1; at least one instance).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        failures: int = 3,
        window: float = 10.0,
        open_for: float = 2.0,
        max_ejected: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or window <= 0 or open_for <= 0 or not 0 <= max_ejected <= 1:
            raise ValueError("breaker: failures >= 1, window > 0, open_for > 0, 0 <= max_ejected <= 1")
        self.failures = failures
        self.window = window
        self.open_for = open_for
        self.max_ejected = max_ejected
        self._clock = clock
        self._b: dict[str, _Breaker] = {}
        self.capped = 0
        """Breakers (or stalls) that would have ejected an instance past the cap."""

    def _get(self, name: str) -> _Breaker:
        b = self._b.get(name)
        if b is None:
            b = self._b[name] = _Breaker()
        return b

    def _cap(self, known: int) -> int:
        return max(1, int(self.max_ejected * known)) if self.max_ejected > 0 else 0

    def _ejected_count(self) -> int:
        return sum(1 for b in self._b.values() if b.state != CLOSED or b.stalled)

    def blocked(self) -> set[str]:
        """Instances routing must skip now: open, half-open with its probe in flight, or stalled.
        Mutates (an open breaker whose ``open_for`` passed becomes half-open)."""
        now = self._clock()
        out = set()
        for name, b in self._b.items():
            if b.state == OPEN and now >= b.opened_at + self.open_for:
                b.state, b.probing = HALF_OPEN, False
            if b.stalled or b.state == OPEN or (b.state == HALF_OPEN and b.probing):
                out.add(name)
        return out

    def on_dispatch(self, name: str) -> None:
        """A request was just routed to ``name``: if its breaker is half-open, this is the probe. Mutates."""
        b = self._b.get(name)
        if b is not None and b.state == HALF_OPEN:
            b.probing = True

    def success(self, name: str) -> None:
        """An attempt on ``name`` succeeded: the failure count restarts; a half-open breaker closes.
        Mutates."""
        b = self._b.get(name)
        if b is None:
            return
        b.failures.clear()
        if b.state != CLOSED:
            b.state, b.probing = CLOSED, False

    def failure(self, name: str, known: int) -> bool:
        """An attempt on ``name`` failed (``known`` instances exist). Returns whether the breaker opened
        now. Mutates."""
        now = self._clock()
        b = self._get(name)
        if b.state == HALF_OPEN:  # the probe failed
            b.state, b.opened_at, b.probing = OPEN, now, False
            b.opens += 1
            return True
        if b.state == OPEN:
            return False
        recent = [t for t in b.failures if t > now - self.window]
        recent.append(now)
        b.failures = recent[-self.failures :]
        if len(b.failures) < self.failures:
            return False
        if self._ejected_count() + (0 if b.stalled else 1) > self._cap(known):
            self.capped += 1
            return False
        b.state, b.opened_at, b.probing = OPEN, now, False
        b.failures.clear()
        b.opens += 1
        return True

    def set_stalled(self, name: str, stalled: bool, known: int) -> bool:
        """Eject ``name`` while its engine looks stalled (or let it back). Returns whether the instance is
        now stalled (False when the cap refused). Mutates."""
        b = self._get(name)
        if stalled == b.stalled:
            return stalled
        if stalled and b.state == CLOSED and self._ejected_count() + 1 > self._cap(known):
            self.capped += 1
            return False
        b.stalled = stalled
        return stalled

    def forget(self, names: Iterable[str]) -> None:
        """Drop the breakers of ``names`` (instances gone for good). Mutates."""
        for n in names:
            self._b.pop(n, None)

    def state(self, name: str) -> str:
        """``closed``, ``half_open`` or ``open`` (``stalled`` is reported apart)."""
        b = self._b.get(name)
        return b.state if b is not None else CLOSED

    def is_stalled(self, name: str) -> bool:
        b = self._b.get(name)
        return b is not None and b.stalled

    def opens(self, name: str) -> int:
        """How many times ``name``'s breaker opened."""
        b = self._b.get(name)
        return b.opens if b is not None else 0

    def names(self) -> list[str]:
        return sorted(self._b)
