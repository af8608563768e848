"""Simulated engine instances: one :class:`EngineCore` each, driven on the simulator's virtual clock.

An instance behaves as the live emulated engine's core loop (``agents/engine/server.py``) with no
wall-clock pacing error: a step is scheduled when the previous one completes (or, when idle, when a
request arrives), lasts exactly its modelled ``duration``, and at its end the tokens it produced are
delivered and its KV events (evictions made when it was scheduled, inserts made at completion) are
published as one batch. Only one step is in flight per instance.

:meth:`SimInstance.run_until` is the hot path: decode steps are millions per simulated hour. When the
step that follows a completion also ends before the next event anywhere in the cluster (``horizon``), it
is completed right away without a round trip through the event heap. That is exactly the order the heap
would produce (nothing else can happen in between), just cheaper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agents.engine.core import EngineCore, Request, Step, TokenOutput
from launch.sim.router_tier import SimRouterTier

__all__ = ["LiveRequest", "SimInstance"]


@dataclass(slots=True)
class LiveRequest:
    """A request in flight on an instance. Times in virtual seconds."""

    index: int
    arrival: float
    ticket: int
    prompt_tokens: int
    first_token_at: float | None = None


FinishCallback = Callable[[LiveRequest, TokenOutput, float], None]
"""Called with the request, its last output and the virtual time it finished."""


class SimInstance:
    """One engine instance of the simulated cluster.

    Attributes (batch statistics; "batch size" = running requests, prefilling or decoding, when a step
    is scheduled):
        steps: steps run. ``batch_sum``/``batch_max``: sum and max of the batch size over steps.
        batch_time: sum of batch size x step duration (seconds); ``busy_s``: sum of step durations.
        last_end: virtual time its last completed step ended.
    """

    def __init__(
        self, idx: int, name: str, core: EngineCore, router: SimRouterTier, on_finish: FinishCallback
    ) -> None:
        self.idx = idx
        self.name = name
        self.core = core
        self.router = router
        self.on_finish = on_finish
        self.step: Step | None = None
        self.live: dict[str, LiveRequest] = {}
        self.steps = 0
        self.batch_sum = 0
        self.batch_max = 0
        self.batch_time = 0.0
        self.busy_s = 0.0
        self.last_end = 0.0

    def add(self, req: Request, live: LiveRequest, now: float) -> None:
        """Queue ``req`` at ``now``. Raises :class:`RequestRejected` as :meth:`EngineCore.add_request`."""
        self.core.add_request(req, now)
        self.live[req.rid] = live

    def start(self, now: float) -> float | None:
        """If idle, schedule a step at ``now``; returns its end time (None if idle or already busy)."""
        if self.step is not None:
            return None
        return self._schedule(now)

    def _schedule(self, now: float) -> float | None:
        core = self.core
        step = self.step = core.schedule(now)
        if step is None:
            return None
        bs = len(core._admitted)  # == core.num_running, without the property call on the hot path
        self.steps += 1
        self.batch_sum += bs
        if bs > self.batch_max:
            self.batch_max = bs
        d = step.duration
        self.batch_time += bs * d
        self.busy_s += d
        return now + d

    def run_until(self, now: float, horizon: float) -> float | None:
        """Complete the step in flight (it ends at ``now``), start the next, and keep going while the next
        step ends before ``horizon``. Returns the end of the step left in flight (None if idle)."""
        core, router, live, idx = self.core, self.router, self.live, self.idx
        while True:
            step = self.step
            assert step is not None
            outs = core.complete(step, now)
            events = core.drain_events()
            if events:
                router.kv_events(idx, now, events)
            for o in outs:
                if o.first_token or o.finish_reason is not None:
                    lv = live[o.rid]
                    if o.first_token:
                        lv.first_token_at = now
                    if o.finish_reason is not None:
                        del live[o.rid]
                        router.finish(idx, lv.ticket, now)
                        self.on_finish(lv, o, now)
            durations = core.run_quiet_decodes(now, horizon)
            if durations:  # quiet decode steps, completed in one call: account for each as _schedule does
                bs = len(core._admitted)
                self.steps += len(durations)
                self.batch_sum += bs * len(durations)
                if bs > self.batch_max:
                    self.batch_max = bs
                for d in durations:
                    self.batch_time += bs * d
                    self.busy_s += d
                    now += d
            self.last_end = now
            end = self._schedule(now)
            if end is None:  # idle: the live engine publishes what scheduling emitted, if anything
                events = core.drain_events()
                if events:
                    router.kv_events(idx, now, events)
                return None
            if end >= horizon:
                return end
            now = end
