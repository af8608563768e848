"""The ZeroMQ subscriber to the agents' cluster streams, and the snapshot fetch. Thin I/O shell.

Used by the router, the hot standby and the metrics daemon. One SUB socket per agent endpoint (so every
frame is attributed to its agent even when it does not decode), subscribed to all topics, each read by its
own task. Decoding, topic checks and seq tracking are :class:`kvindex.protocol.numbered.NumberedStream`'s
(pure); each frame reaches ``on_message`` as a :class:`~kvindex.protocol.numbered.Received`. Nothing a
peer sends can stop a reader task; an exception in ``on_message`` is logged and counted
(``callback_error``) and the task goes on.

:func:`fetch_snapshot` asks an agent's ROUTER socket for its whole mirror over a short-lived DEALER.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

import zmq
import zmq.asyncio

from kvindex.logutil import RateLimitedLog
from kvindex.protocol import EventBatch, Heartbeat, LoadReport, Snapshot, SnapshotRequest, encode_message
from kvindex.protocol.numbered import (
    AGENT_TOPIC_OF,
    NumberedStream,
    Received,
    SnapshotError,
    agent_epoch,
    parse_snapshot_reply,
)

log = logging.getLogger(__name__)

__all__ = ["Received", "SnapshotError", "Subscriber", "fetch_snapshot"]


class Subscriber:
    """SUB sockets to agent PUB endpoints, handing decoded frames to ``on_message``.

    Lifecycle: construct, :meth:`start` (inside a running event loop), :meth:`close`. ``on_message`` is
    called from the reader tasks, one frame at a time, in each agent's arrival order. Endpoints are
    ``tcp://host:port`` (anything ZeroMQ connects to); a malformed endpoint raises ``zmq.ZMQError`` from
    :meth:`start`/:meth:`add_endpoint`.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        on_message: Callable[[Received], None],
        *,
        ctx: zmq.asyncio.Context | None = None,
        log_interval: float = 5.0,
        rcvhwm: int = 100_000,
    ) -> None:
        self._endpoints = list(dict.fromkeys(endpoints))
        self._on_message = on_message
        self._own_ctx = ctx is None
        self.ctx: zmq.asyncio.Context = ctx if ctx is not None else zmq.asyncio.Context()
        self._rcvhwm = rcvhwm
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rl = RateLimitedLog(log, log_interval)
        self._stream = NumberedStream(AGENT_TOPIC_OF, agent_epoch, self._rl)
        self.stats = self._stream.stats
        self._closed = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The agent endpoints subscribed to."""
        return tuple(self._endpoints)

    def start(self) -> None:
        """Connect to every endpoint and start reading. Needs a running loop; raises ``zmq.ZMQError``."""
        for ep in self._endpoints:
            self._open(ep)

    def add_endpoint(self, endpoint: str) -> None:
        """Subscribe to one more agent (no-op if already subscribed). Raises ``zmq.ZMQError``."""
        if endpoint in self._sockets:
            return
        if endpoint not in self._endpoints:
            self._endpoints.append(endpoint)
        self._open(endpoint)

    def _open(self, endpoint: str) -> None:
        if endpoint in self._sockets:
            return
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(0)
            raise
        self._sockets[endpoint] = sock
        self._tasks[endpoint] = asyncio.get_running_loop().create_task(
            self._read(endpoint, sock), name=f"sub:{endpoint}"
        )

    async def close(self) -> None:
        """Stop the readers and close the sockets (and the context if this object created it)."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for s in self._sockets.values():
            s.close(0)
        self._tasks.clear()
        self._sockets.clear()
        if self._own_ctx:
            self.ctx.destroy(linger=0)

    async def _read(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=True)
            try:
                rec = self.handle_frames(endpoint, frames)
                if rec is not None:
                    self._on_message(rec)
            except Exception:  # a bug must not silence an agent: count, log, read on
                self.stats.malformed["callback_error"] += 1
                log.exception("handling a frame from %s failed", endpoint)

    def handle_frames(self, endpoint: str, frames: Sequence[bytes]) -> Received | None:
        """Decode and track one multipart frame of ``endpoint``; None (counted, logged) if malformed.

        Exposed so that tests and replay tools can drive the subscriber without sockets. Mutates the
        tracked seq/epoch and the counters; never raises on frame content.
        """
        got = self._stream.receive(endpoint, frames)
        if got is None:
            return None
        topic, seq, msg, disc, lost = got
        assert isinstance(msg, EventBatch | LoadReport | Heartbeat)
        return Received(endpoint, topic, seq, msg, disc, lost)


async def fetch_snapshot(ctx: zmq.asyncio.Context, endpoint: str, timeout: float) -> Snapshot:
    """Ask the agent ROUTER socket at ``endpoint`` for its whole mirror; wait at most ``timeout`` s.

    Sends ``[b"", SnapshotRequest]`` on a fresh DEALER and expects ``[b"", Snapshot]``.

    Raises:
        SnapshotError: no reply in time (``timeout``), a reply that is not a Snapshot (``bad_reply``),
        or an endpoint ZeroMQ cannot connect to (``connect``).
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise SnapshotError("connect", f"{endpoint}: {exc}") from exc
        try:
            await asyncio.wait_for(sock.send_multipart([b"", encode_message(SnapshotRequest())]), timeout)
            frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
        except asyncio.TimeoutError:
            raise SnapshotError("timeout", f"no snapshot from {endpoint} in {timeout:g} s") from None
    finally:
        sock.close(0)
    return parse_snapshot_reply(frames)
