"""A router's decision stream: publishing it, subscribing to it, and mirroring it into a standby's core.

Theory of operation
-------------------
Every routing decision changes two things in the deciding router besides the choice itself: the request's
blocks become speculative entries of the chosen instance in the index, and the request is added to that
instance's pending dispatches (batch size + 1, queued prefill + its new tokens) until a load report
covers it or it ends. Those are the only parts of a router's state that the agents' streams do not carry.
So the primary publishes each decision (:class:`~kvindex.protocol.RequestRouted`) and each end
(:class:`~kvindex.protocol.RequestFinished`), and a standby that also follows every agent applies them to its
own core (:class:`DecisionMirror`): same index, same speculative entries, same pending accounting, give
or take the milliseconds the frames travel.

Pending entries are dated with the primary's dispatch time, so the same load reports drop them in both
routers. A load report that reached the standby before the decision (different sockets) already covers
it: the mirror re-applies the instance's last report right after adding the entry.

The stream is PUB/SUB, at most once. A lost frame shows as a seq gap (counted). A lost ``RequestRouted``
costs its speculative entries (the engine's own events follow within a step) and its pending entry (the
next load report covers it anyway); a lost ``RequestFinished`` would leave a ticket open forever, so every
:class:`~kvindex.protocol.RouterHeartbeat` lists the primary's open tickets and the mirror forgets any other
(frames of one stream arrive in publishing order, so every decision older than the heartbeat is in).

:class:`DecisionPublisher` never blocks (a PUB socket drops at its high-water mark); it is called from
request handlers. :class:`DecisionSubscriber` reads any number of decision streams (the standby reads
one, the metrics daemon every router's) and reports connects/disconnects from a ZeroMQ socket monitor,
which is how a standby learns at once that its primary's process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvindex.logutil import RateLimitedLog
from kvindex.protocol import (
    TOPIC_DECISIONS,
    DecisionMessage,
    RequestFinished,
    RequestRouted,
    RouterHeartbeat,
    encode_message,
    make_frame,
)
from kvindex.protocol.numbered import DECISION_TOPIC_OF, DecisionReceived, NumberedStream, router_epoch
from router.model.model import Routed, RoutingModel

log = logging.getLogger(__name__)

ROUTER_HEARTBEAT_INTERVAL: Final = 0.1
"""Seconds between two heartbeats of a router on its decision stream."""


# ------------------------------------------------------------------------------------------ publisher


class DecisionPublisher:
    """This router's decision stream: a PUB socket bound on ``host:port`` (0 = OS-assigned).

    One sequence number across both topics. ``publish`` never blocks and never raises on a full queue
    (PUB drops frames for a subscriber past its high-water mark; followers see the gap); after
    :meth:`close` it does nothing. Uses its own (synchronous) ZeroMQ context, so that it can outlive the
    router's asyncio one while the last requests finish. Raises ``zmq.ZMQError`` from the constructor if
    the port cannot be bound.
    """

    def __init__(self, host: str, port: int, router_epoch: int) -> None:
        self.router_epoch = router_epoch
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        addr = "*" if host in ("", "*", "0.0.0.0") else host
        try:
            self._sock.bind(f"tcp://{addr}:{port or '*'}")
        except zmq.ZMQError:
            self._sock.close(0)
            self._ctx.term()
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._closed = False
        self._seq = 0
        self._request_ids: dict[int, str] = {}
        self.published: Counter[str] = Counter()
        """Frames published, by message type."""

    def publish(self, topic: bytes, msg: DecisionMessage) -> None:
        """Send one frame (numbered). Mutates the seq; never blocks."""
        if self._closed:
            return
        frame = make_frame(topic, self._seq, encode_message(msg))
        self._seq += 1
        with contextlib.suppress(zmq.Again):  # not for PUB in practice; the seq gap tells followers
            self._sock.send_multipart(frame, flags=zmq.NOBLOCK)
        self.published[type(msg).__name__] += 1

    def routed(self, r: Routed, prompt_tokens: int, request_id: str | None) -> None:
        """Publish the decision ``r`` for a prompt of ``prompt_tokens`` tokens."""
        msg = routed_message(self.router_epoch, r, prompt_tokens, request_id)
        self._request_ids[r.ticket] = msg.request_id
        self.publish(TOPIC_DECISIONS, msg)

    def finished(self, r: Routed, status: str) -> None:
        """Publish the end of the request decided as ``r`` (``status``: the router's outcome label)."""
        rid = self._request_ids.pop(r.ticket, None)
        self.publish(TOPIC_DECISIONS, finished_message(self.router_epoch, r, status, rid))

    def close(self) -> None:
        """Close the socket and the context. Idempotent."""
        if not self._closed:
            self._closed = True
            self._sock.close(0)
            self._ctx.term()


def routed_message(
    router_epoch: int, r: Routed, prompt_tokens: int, request_id: str | None, ts: float | None = None
) -> RequestRouted:
    """The :class:`RequestRouted` of decision ``r`` (``request_id`` made up from the ticket if None;
    ``ts`` the dispatch time, Unix seconds, now if None)."""
    d = r.decision
    return RequestRouted(
        router_epoch=router_epoch,
        request_id=request_id[:200] if request_id else f"{router_epoch:x}-{r.ticket}",
        ticket=r.ticket,
        instance=d.instance,
        policy=d.policy,
        ts=time.time() if ts is None else ts,
        prompt_tokens=prompt_tokens,
        new_tokens=d.new_tokens,
        score=d.score,
        block_hashes=r.hashes,
        failure_cases=d.failure_cases,
    )


def finished_message(
    router_epoch: int, r: Routed, status: str, request_id: str | None = None
) -> RequestFinished:
    """The :class:`RequestFinished` of the request decided as ``r``."""
    rid = request_id or f"{router_epoch:x}-{r.ticket}"
    return RequestFinished(router_epoch, rid, r.ticket, r.instance, status, time.time())


def heartbeat_of(core: RoutingModel, router_epoch: int, role: str, http: str, pid: int) -> RouterHeartbeat:
    """A :class:`RouterHeartbeat` describing ``core`` now. Does not mutate."""
    idx = core.index
    tickets = tuple(sorted(t for st in core.table for t in st.open_tickets))
    return RouterHeartbeat(
        router_epoch=router_epoch,
        role=role,
        ts=time.time(),
        http=http,
        pid=pid,
        index_blocks=idx.total_blocks() if idx is not None else 0,
        speculative_blocks=idx.speculative_blocks() if idx is not None else 0,
        inflight=len(tickets),
        instances_routable=core.routable_count(),
        interval=ROUTER_HEARTBEAT_INTERVAL,
        open_tickets=tickets,
    )


# ----------------------------------------------------------------------------------------- subscriber


class DecisionSubscriber:
    """SUB sockets to routers' decision streams, handing decoded frames to ``on_message``.

    Lifecycle: construct, :meth:`start` (in a running loop), :meth:`close`. Each endpoint has a reader
    task and a monitor task; :meth:`connected` says whether the TCP connection to it is up now, and
    ``on_connection(endpoint, up)`` (optional) is called on every change. Malformed frames are counted,
    logged (rate-limited) and skipped. A malformed endpoint raises ``zmq.ZMQError``.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        on_message: Callable[[DecisionReceived], None],
        *,
        ctx: zmq.asyncio.Context,
        on_connection: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._endpoints = list(dict.fromkeys(endpoints))
        self._on_message = on_message
        self._on_connection = on_connection
        self.ctx = ctx
        self._socks: dict[str, zmq.asyncio.Socket] = {}
        self._monitors: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._up: dict[str, bool] = {}
        self._rl = RateLimitedLog(log)
        self._stream = NumberedStream(DECISION_TOPIC_OF, router_epoch, self._rl, "decision frame")
        self.stats = self._stream.stats
        self._closed = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._endpoints)

    def start(self) -> None:
        """Connect to every endpoint and start reading. Raises ``zmq.ZMQError``."""
        for ep in self._endpoints:
            self._open(ep)

    def add_endpoint(self, endpoint: str) -> None:
        """Follow one more decision stream (no-op if followed). Raises ``zmq.ZMQError``."""
        if endpoint not in self._endpoints:
            self._endpoints.append(endpoint)
        self._open(endpoint)

    def connected(self, endpoint: str) -> bool:
        """Whether the connection to ``endpoint`` is up (per the socket monitor)."""
        return self._up.get(endpoint, False)

    def _open(self, endpoint: str) -> None:
        if endpoint in self._socks or self._closed:
            return
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)  # a dead router's endpoint: retried with backoff to 2 s
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)
            raise
        self._socks[endpoint] = sock
        self._monitors[endpoint] = mon
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._read(endpoint, sock), name=f"decisions:{endpoint}"))
        self._tasks.append(loop.create_task(self._monitor(endpoint, mon), name=f"monitor:{endpoint}"))

    async def close(self) -> None:
        """Stop the tasks and close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ep, sock in self._socks.items():
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            self._monitors[ep].close(0)
            sock.close(0)
        self._socks.clear()
        self._monitors.clear()

    async def _monitor(self, endpoint: str, mon: zmq.asyncio.Socket) -> None:
        while True:
            frames = await mon.recv_multipart()
            try:
                event = parse_monitor_message(frames)["event"]
            except Exception:  # a malformed monitor frame: ignore it, the heartbeat still guards
                continue
            up = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if up != self._up.get(endpoint, False):
                self._up[endpoint] = up
                log.info("decision stream %s %s", endpoint, "connected" if up else "disconnected")
                if self._on_connection is not None:
                    self._on_connection(endpoint, up)

    async def _read(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                rec = self.handle_frames(endpoint, frames)
                if rec is not None:
                    self._on_message(rec)
            except Exception:  # a bug must not silence the stream
                self.stats.malformed["callback_error"] += 1
                log.exception("handling a decision frame from %s failed", endpoint)

    def handle_frames(self, endpoint: str, frames: Sequence[bytes]) -> DecisionReceived | None:
        """Decode and track one multipart frame; None (counted, logged) if malformed. Never raises on
        frame content. Exposed for tests and tools that have no sockets."""
        got = self._stream.receive(endpoint, frames)
        if got is None:
            return None
        topic, seq, msg, disc, lost = got
        assert isinstance(msg, RequestRouted | RequestFinished | RouterHeartbeat)
        return DecisionReceived(endpoint, topic, seq, msg, disc, lost)
