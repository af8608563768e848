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

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Final

import zmq
import zmq.asyncio

from kvindex import curve
from kvindex.protocol import (
    TOPIC_DECISIONS,
    DecisionMessage,
    RequestFinished,
    RequestRouted,
    RouterHeartbeat,
    encode_message,
)
from kvindex.protocol.numbered import DECISION_TOPIC_OF, DecisionReceived, router_epoch
from kvindex.transport import NumberedSubscriber, Publisher
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
        self.term = 0
        """The fencing epoch stamped on every frame (set by the HA node)."""
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            self._pub = Publisher(self._ctx, host, port)
        except (zmq.ZMQError, curve.CurveError):
            curve.release(self._ctx)
            self._ctx.term()
            raise
        self.endpoint = self._pub.endpoint
        self._request_ids: dict[int, str] = {}
        self.published: Counter[str] = Counter()
        """Frames published, by message type."""

    def publish(self, topic: bytes, msg: DecisionMessage) -> None:
        """Send one frame (numbered). Mutates the seq; never blocks; does nothing after :meth:`close`."""
        if self._pub.publish(topic, encode_message(msg)) >= 0:
            self.published[type(msg).__name__] += 1

    def routed(self, r: Routed, prompt_tokens: int, request_id: str | None) -> None:
        """Publish the decision ``r`` for a prompt of ``prompt_tokens`` tokens."""
        msg = routed_message(self.router_epoch, r, prompt_tokens, request_id, term=self.term)
        self._request_ids[r.ticket] = msg.request_id
        self.publish(TOPIC_DECISIONS, msg)

    def finished(self, r: Routed, status: str) -> None:
        """Publish the end of the request decided as ``r`` (``status``: the router's outcome label)."""
        rid = self._request_ids.pop(r.ticket, None)
        self.publish(TOPIC_DECISIONS, finished_message(self.router_epoch, r, status, rid, term=self.term))

    def close(self) -> None:
        """Close the socket and the context. Idempotent."""
        if not self._ctx.closed:
            self._pub.close()
            curve.release(self._ctx)
            self._ctx.term()


def routed_message(
    router_epoch: int,
    r: Routed,
    prompt_tokens: int,
    request_id: str | None,
    ts: float | None = None,
    *,
    term: int = 0,
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
        term=term,
    )


def finished_message(
    router_epoch: int, r: Routed, status: str, request_id: str | None = None, *, term: int = 0
) -> RequestFinished:
    """The :class:`RequestFinished` of the request decided as ``r``."""
    rid = request_id or f"{router_epoch:x}-{r.ticket}"
    return RequestFinished(router_epoch, rid, r.ticket, r.instance, status, time.time(), term)


def heartbeat_of(
    core: RoutingModel,
    router_epoch: int,
    role: str,
    http: str,
    pid: int,
    *,
    term: int = 0,
    admin: str = "",
    decisions: str = "",
) -> RouterHeartbeat:
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
        term=term,
        admin=admin,
        decisions=decisions,
    )


# ----------------------------------------------------------------------------------------- subscriber


class DecisionSubscriber(NumberedSubscriber[DecisionReceived]):
    """SUB sockets to routers' decision streams, handing decoded frames to ``on_message``.

    Lifecycle: construct, :meth:`start` (in a running loop), :meth:`close`. Each endpoint has a reader
    task and a monitor task; :meth:`connected` says whether the TCP connection to it is up now, and
    ``on_connection(endpoint, up)`` (optional) is called on every change: how a standby learns at once
    that its primary's process is gone. A dead router's endpoint is retried from 50 ms, backing off to
    2 s. Malformed frames are counted, logged (rate-limited) and skipped. A malformed endpoint raises
    ``zmq.ZMQError``.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        on_message: Callable[[DecisionReceived], None],
        *,
        ctx: zmq.asyncio.Context,
        on_connection: Callable[[str, bool], None] | None = None,
    ) -> None:
        super().__init__(
            endpoints,
            on_message,
            topic_of=DECISION_TOPIC_OF,
            epoch_of=router_epoch,
            make=DecisionReceived,
            ctx=ctx,
            what="decision frame",
            monitor=True,
            on_connection=on_connection,
            reconnect_ivl=0.05,
        )
