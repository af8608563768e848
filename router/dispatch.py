"""Routing, forwarding and retrying one request; failing fast when an instance dies. The router's I/O half
of a request after admission and validation (:mod:`router.server` does those).

Theory of operation. :meth:`Dispatcher.dispatch` makes at most ``1 + max_retries`` attempts, driven by
``tenacity`` (jittered exponential wait between them). Each attempt routes with the model, excluding
the instances already tried and those the circuit breakers eject (:mod:`router.breaker`), forwards with
:func:`router.forward.forward`, and on :class:`router.forward.AttemptFailed` (nothing sent to the client
yet) records the failure, aborts the request on that engine if it may hold it, and lets tenacity try the
next-best instance. A failure that already reached the client (a broken stream) is final.

Every request carries an SGLang ``rid`` (the client's, or ``lmr-<hex>`` spliced into the body): when
the client disconnects, or the router gives up on an attempt the engine may still be running, the
router posts ``/abort_request {"rid"}`` to that engine (docs/sglang-contract.md row 10), so it stops
decoding for nobody. The pending dispatch is always released (:meth:`RoutingModel.finish`).

The tick (:meth:`Dispatcher.tick`, every 50-100 ms) ends the attempts in flight on instances the model
took down because their agent said the engine is unhealthy (not when the agent itself went silent: the
engine may be serving fine): each is cancelled with :attr:`Attempt.killed` set, so a
request that had sent nothing is retried elsewhere and a stream already under way ends with an error
event, instead of waiting for a timeout. It also ejects instances whose engine load stream went silent
while their agent still beats (a stopped or hung engine publishes nothing): a refused connection is
immediate evidence of a dead engine, a silent load stream the quickest of a stopped one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from kvindex.protocol.http import error_body
from router.breaker import Breakers
from router.config import RouterConfig
from router.forward import INSTANCE_HEADER, Attempt, AttemptFailed, Outcome, RequestBody, Timeouts, forward
from router.looplag import EXCUSE_SHARE, LoopLag
from router.metrics import RouterMetrics
from router.model.model import NoLiveInstance, RoutingModel
from router.model.slots import DecisionSlots

if TYPE_CHECKING:
    from router.decisions import DecisionPublisher

log = logging.getLogger(__name__)

RETRY_BACKOFF_MAX = 0.5
"""Longest wait between two attempts, in seconds."""
ABORT_TIMEOUT = 2.0
"""Seconds an ``/abort_request`` to an engine may take (it is best effort)."""
STALL_FLOOR = 0.3
"""A load stream is never called silent before this many seconds."""


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, AttemptFailed) and exc.retriable


class Dispatcher:
    """Route + forward + retry for the live router (see the module docstring). One per router."""

    def __init__(
        self, cfg: RouterConfig, core: RoutingModel, metrics: RouterMetrics, tick_period: float = 0.1
    ) -> None:
        """``tick_period``: seconds between the caller's calls of :meth:`tick` (the loop-lag clock)."""
        self.cfg = cfg
        self.core = core
        self.metrics = metrics
        self.timeouts = Timeouts(
            cfg.connect_timeout, cfg.headers_timeout, cfg.idle_timeout, cfg.request_timeout
        )
        self._backoff = wait_random_exponential(multiplier=cfg.retry_backoff, max=RETRY_BACKOFF_MAX)
        self.breakers = Breakers(cfg.breaker_failures, cfg.breaker_window, cfg.breaker_open, cfg.max_ejected)
        self.session: aiohttp.ClientSession | None = None
        self.decisions: DecisionPublisher | None = None
        self.slots: DecisionSlots | None = None
        """Active routers taking turns (:mod:`router.model.slots`): wait for this router's slot."""
        self._attempts: dict[str, set[Attempt]] = {}
        self._aborts: set[asyncio.Task[None]] = set()
        self.lag = LoopLag(tick_period)
        """How late the router's own loop runs: a timeout while it was mostly late is not the engine's."""
        self._last_load: dict[str, float] = {}
        self._load_interval: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------- request

    async def dispatch(
        self,
        request: web.Request,
        body: RequestBody,
        rid: str,
        stream: bool,
        prompt_tokens: int,
        hashes: Sequence[int],
        model: str | None,
        arrived: float,
    ) -> Outcome:
        """Answer ``request`` (its ``body`` carries ``rid`` and is dropped once a stream started; its
        prompt ``prompt_tokens`` long, whose full blocks hash to ``hashes``) from the best instance,
        retrying on others while nothing was sent.
        Only the hashes are kept for the retries, not the token ids: a long prompt's ids are megabytes of
        Python ints.

        Raises:
            asyncio.CancelledError: the client went away (the engine was asked to abort).
        """
        tried: list[str] = []
        failed: list[AttemptFailed] = []
        # The first attempt runs without tenacity (building its retry state costs ~3 % of a short request's
        # CPU); only a retriable failure starts tenacity's loop for the remaining attempts, which backs off
        # (jittered exponential) before each of them.
        try:
            return await self._attempt(
                request, body, rid, stream, prompt_tokens, hashes, model, arrived, tried
            )
        except AttemptFailed as exc:
            if not exc.retriable or self.cfg.max_retries <= 0:
                return exc.fallback
            failed.append(exc)
            self._count_retry(None)
        except NoLiveInstance as exc:
            return Outcome(_error(503, f"{exc} to serve the request", type_="service_unavailable"), "503")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_retries),
            wait=self._backoff,
            retry=retry_if_exception(_retriable),
            before=self._sleep_first,
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        return await self._attempt(
                            request, body, rid, stream, prompt_tokens, hashes, model, arrived, tried
                        )
                    except AttemptFailed as exc:
                        failed.append(exc)
                        raise
        except AttemptFailed as exc:
            return exc.fallback
        except NoLiveInstance:
            # every other instance was tried: the last engine's answer (or our 502/504)
            return failed[-1].fallback
        raise AssertionError("unreachable: tenacity either returns or reraises")  # pragma: no cover

    async def _sleep_first(self, state: RetryCallState) -> None:
        """Before the first retry: the back-off the first attempt's failure earns."""
        if state.attempt_number == 1:
            await asyncio.sleep(self._backoff(state))

    def _count_retry(self, state: RetryCallState | None) -> None:
        self.metrics.retries.inc()

    async def _attempt(
        self,
        request: web.Request,
        body: RequestBody,
        rid: str,
        stream: bool,
        prompt_tokens: int,
        hashes: Sequence[int],
        model: str | None,
        arrived: float,
        tried: list[str],
    ) -> Outcome:
        assert self.session is not None, "dispatcher not started"
        blocked = self.breakers.blocked()
        exclude = set(tried) | blocked if blocked else tried
        if self.slots is not None and (wait := self.slots.wait(time.time())) > 0:
            await asyncio.sleep(wait)
        routed = self.core.route_hashes(prompt_tokens, hashes, model=model, exclude=exclude)
        inst = routed.instance
        tried.append(inst)
        self.breakers.on_dispatch(inst)
        self.metrics.observe_decision(routed.decision, prompt_tokens)
        if self.decisions is not None:
            self.decisions.routed(routed, prompt_tokens, request.headers.get("X-Request-Id"))
        att = Attempt(inst, asyncio.current_task())
        self._attempts.setdefault(inst, set()).add(att)
        status = "client_closed"  # unless forward returns or raises something else
        url = routed.engine_url
        started = time.monotonic()
        try:
            out = await forward(
                self.session, request, url + request.path_qs, body, stream, arrived, self.timeouts, att
            )
            status = out.label
            if out.failure is not None:  # broke mid-stream: final, but the engine's fault
                self._failed(inst, out.failure, url, rid, accepted=True, started=started)
            elif out.label == "client_closed":
                self._abort(url, rid, "client_closed")
            else:
                self.breakers.success(inst)
            return out
        except AttemptFailed as exc:
            status = exc.kind
            exc.fallback.response.headers.setdefault(INSTANCE_HEADER, inst)
            self._failed(inst, exc.kind, url, rid, accepted=exc.accepted, started=started)
            raise
        except asyncio.CancelledError:
            self._abort(url, rid, "client_closed")
            raise
        finally:
            self._attempts[inst].discard(att)
            self.core.finish(inst, routed.ticket)
            if self.decisions is not None:
                self.decisions.finished(routed, status)

    def _failed(self, inst: str, kind: str, url: str, rid: str, *, accepted: bool, started: float) -> None:
        """Account a failed attempt that began at ``started`` (monotonic s). A timeout while the router's
        own loop was late for at least :data:`router.looplag.EXCUSE_SHARE` of the attempt is counted
        (``router_timeouts_excused_total``) but neither marks the instance suspect nor counts towards its
        breaker: the router, not the engine, was slow."""
        self.metrics.attempt_failures.labels(kind).inc()
        if kind.startswith("timeout_"):
            self.metrics.timeouts.labels(kind.removeprefix("timeout_")).inc()
        if not (kind.startswith("timeout_") and self._router_was_late(inst, kind, started)):
            if kind in ("connect", "timeout_connect"):
                self.core.mark_suspect(inst)
            if kind != "instance_down" and self.breakers.failure(inst, len(self.core.table)):
                log.warning("circuit breaker of instance %s opened (%s)", inst, kind)
        if accepted and kind != "instance_down":
            self._abort(url, rid, "attempt_failed")
        log.info("attempt on instance %s failed: %s", inst, kind)

    def _router_was_late(self, inst: str, kind: str, started: float) -> bool:
        """Whether the router's loop was late for at least :data:`EXCUSE_SHARE` of an attempt begun at
        ``started`` (monotonic s); counted and logged when it was."""
        share = self.lag.share(started, time.monotonic())
        if share < EXCUSE_SHARE:
            return False
        self.metrics.timeouts_excused.inc()
        log.warning(
            "attempt on instance %s: %s while the router's event loop was late for %.0f %% of it: "
            "not charged to the instance", inst, kind, 100 * share,
        )  # fmt: skip
        return True

    def _abort(self, engine_url: str, rid: str, reason: str) -> None:
        """Ask the engine to stop ``rid`` (fire and forget; tracked so that :meth:`close` can wait)."""
        if self.session is None or self.session.closed:
            return
        self.metrics.aborts.labels(reason).inc()
        task = asyncio.get_running_loop().create_task(self._post_abort(engine_url, rid))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _post_abort(self, engine_url: str, rid: str) -> None:
        assert self.session is not None
        try:
            async with self.session.post(
                engine_url + "/abort_request",
                json={"rid": rid},
                timeout=aiohttp.ClientTimeout(total=ABORT_TIMEOUT),
            ) as r:
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("abort of %s at %s failed: %r", rid, engine_url, exc)

    # ------------------------------------------------------------------------------------------ ticks

    def on_load(self, instance: str, now: float) -> None:
        """A load report of ``instance`` arrived at monotonic ``now``: learn its usual interval and end a
        stall. Mutates."""
        last = self._last_load.get(instance)
        if last is not None:
            dt = min(now - last, 5.0)
            prev = self._load_interval.get(instance)
            self._load_interval[instance] = dt if prev is None else 0.8 * prev + 0.2 * dt
        self._last_load[instance] = now
        if self.breakers.is_stalled(instance):
            self.breakers.set_stalled(instance, False, len(self.core.table))
            log.warning("instance %s: engine load stream resumed", instance)

    def tick(self, now: float) -> None:
        """End attempts on instances that went down; eject up instances whose load stream went silent.
        Called every ``tick_period`` s: its lateness is the loop's (:attr:`lag`)."""
        self.lag.tick(now)
        table = self.core.table
        for inst, atts in self._attempts.items():
            st = table.get(inst)
            # Only when the agent says its engine is unhealthy: an agent gone silent (heartbeat timeout)
            # says nothing about the engine, whose streams may be running fine.
            if atts and (st is None or (not st.up and st.down_reason == "engine_unhealthy")):
                for a in list(atts):
                    if a.killed is None and a.task is not None and not a.task.done():
                        a.killed = "instance_down"
                        a.task.cancel()
                        self.metrics.attempt_failures.labels("instance_down").inc()
        if self.cfg.stall_after <= 0:
            return
        known = len(table)
        for st in table.up():
            last = self._last_load.get(st.name)
            interval = self._load_interval.get(st.name)
            if last is None or interval is None or self.breakers.is_stalled(st.name):
                continue
            limit = max(STALL_FLOOR, min(self.cfg.stall_after, 5 * interval))
            # A silence the router's own late loop explains (its reports may be waiting in the socket) is
            # not the engine's: the same rule as for timeouts (router.looplag).
            if (
                now - last > limit
                and self.lag.share(last, now) < EXCUSE_SHARE
                and self.breakers.set_stalled(st.name, True, known)
            ):
                log.warning("instance %s: engine load stream silent for %.2f s: ejected", st.name, now - last)

    def state_json(self) -> dict[str, Any]:
        """The breakers and in-flight attempts (for ``GET /router/state``)."""
        return {
            name: {
                "breaker": self.breakers.state(name),
                "stalled": self.breakers.is_stalled(name),
                "opens": self.breakers.opens(name),
                "attempts_in_flight": len(self._attempts.get(name, ())),
            }
            for name in sorted(set(self.breakers.names()) | set(self._attempts))
        }

    async def close(self) -> None:
        """Wait (briefly) for the aborts still being sent."""
        if self._aborts:
            await asyncio.wait(list(self._aborts), timeout=ABORT_TIMEOUT)


def _error(status: int, message: str, type_: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, None, type_), status=status)
