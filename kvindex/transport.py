"""ZeroMQ sockets, one small piece per pattern. The I/O of kvindex, with :mod:`kvindex.process`.

Everything else in :mod:`kvindex` but :mod:`kvindex.process` is pure; this module is where the bytes of :mod:`kvindex.protocol` meet
sockets. Every socket is made by :func:`make_socket`, so every one gets the same options: linger 0, a
high-water mark, on receiving sockets a maximum message size (:data:`MAX_MESSAGE_SIZE`: a peer cannot
make a process allocate more than that for one frame), and CURVE when the process was given keys
(:mod:`kvindex.curve`: a binding PUB/ROUTER is a CURVE server, a connecting SUB/DEALER a client; sockets
that speak to an engine in SGLang's protocol pass ``curve=False``).

Patterns:

* :class:`Publisher` — a bound PUB socket numbering its frames ``(topic, seq, payload)``. Never blocks: a
  subscriber past its high-water mark loses frames and sees the gap in the sequence.
* :class:`NumberedSubscriber` — SUB sockets, one per publisher endpoint (so each frame is attributed to
  its publisher even when it does not decode), decoding and tracking every frame with
  :class:`~kvindex.protocol.numbered.NumberedStream`; optionally a socket monitor reporting connects and
  disconnects. Nothing a peer sends stops a reader task.
* :func:`subscribe` — a SUB socket on one endpoint and topic, for raw frames (an agent following its
  engine's SGLang streams).
* :func:`bind_router` / :func:`request_reply` — a bound ROUTER answering DEALERs, and a one-shot DEALER
  request with a timeout (snapshots); SGLang's multi-reply replay has its client in
  :mod:`agents.agent.engine_link`.

Processes' start-up and shutdown (:func:`run_process`, :func:`stop_signals`, :class:`Stop`) live in
:mod:`kvindex.process`; they are re-exported here for the modules that import them from this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvindex import curve as _curve
from kvindex.logutil import RateLimitedLog
from kvindex.process import Stop as Stop
from kvindex.process import run_process as run_process
from kvindex.process import stop_signals as stop_signals
from kvindex.protocol.frames import make_frame
from kvindex.protocol.messages import WireMessage
from kvindex.protocol.numbered import Discontinuity, NumberedStream, SubscriberStats

__all__ = [
    "HWM",
    "MAX_MESSAGE_SIZE",
    "NumberedSubscriber",
    "Publisher",
    "Stop",
    "bind_address",
    "bind_router",
    "make_socket",
    "request_reply",
    "run_process",
    "stop_signals",
    "subscribe",
]

log = logging.getLogger(__name__)

HWM: Final = 100_000
"""Frames a socket queues per peer before it drops (PUB) or stops reading (SUB)."""
MAX_MESSAGE_SIZE: Final = 256 * 2**20
"""Bytes: the largest frame a receiving socket accepts; a larger one drops the connection (ZMQ_MAXMSGSIZE).
A full snapshot of a 1 M-block instance is ~60 MB; a KV event batch of a 131 k-token prefill ~1 MB."""

_RECEIVING: Final = frozenset({zmq.SUB, zmq.ROUTER, zmq.DEALER})


def bind_address(host: str, port: int | None) -> str:
    """``tcp://host:port`` for a bind; ``""``, ``"*"`` and ``"0.0.0.0"`` mean every interface, port 0 or
    None an OS-assigned one."""
    addr = "*" if host in ("", "*", "0.0.0.0") else host
    return f"tcp://{addr}:{port or '*'}"


_SERVERS: Final = frozenset({zmq.PUB, zmq.ROUTER})
"""Socket kinds that bind here (CURVE servers); the others connect (CURVE clients)."""


def make_socket(ctx: zmq.Context[Any], kind: int, *, hwm: int = HWM, curve: bool = True) -> Any:
    """A socket of ``kind`` from ``ctx`` (sync or asyncio) with the options every socket here gets.

    With ``curve`` (the default) and CURVE keys configured for the process (:mod:`kvindex.curve`), a PUB
    or ROUTER is made a CURVE server and any other kind a CURVE client. Raises
    :class:`kvindex.curve.CurveError` when CURVE is on and this process lacks the key it needs."""
    sock = ctx.socket(kind)
    try:
        if curve:
            _curve.arm(ctx, sock, server=kind in _SERVERS)
    except BaseException:
        sock.close(0)
        raise
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.PUB:
        sock.setsockopt(zmq.SNDHWM, hwm)
    if kind in _RECEIVING:
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_SIZE)
    return sock


def _sync(ctx: zmq.Context[Any]) -> zmq.Context[zmq.Socket[bytes]]:
    """A synchronous context sharing ``ctx``'s I/O threads (``ctx`` itself if it is one)."""
    if isinstance(ctx, zmq.asyncio.Context):
        return zmq.Context.shadow(ctx.underlying)
    return ctx


# ------------------------------------------------------------------------------------------ publisher


class Publisher:
    """A PUB socket bound on ``host:port`` (0 = OS-assigned), numbering its frames from 0.

    ``publish`` sends ``(topic, seq, payload)`` synchronously and never blocks (PUB drops frames for a
    subscriber past its high-water mark). ``endpoint`` is the bound ``tcp://...`` URL. Raises
    ``zmq.ZMQError`` from the constructor if the address cannot be bound.
    """

    def __init__(
        self, ctx: zmq.Context[Any], host: str, port: int | None, *, hwm: int = HWM, curve: bool = True
    ) -> None:
        self._sock: zmq.Socket[bytes] = make_socket(_sync(ctx), zmq.PUB, hwm=hwm, curve=curve)
        try:
            self._sock.bind(bind_address(host, port))
        except zmq.ZMQError:
            self._sock.close(0)
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seq = 0
        """The seq the next frame gets."""
        self._closed = False

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.endpoint.rsplit(":", 1)[1])

    def publish(self, topic: bytes, payload: bytes) -> int:
        """Send one numbered frame; returns its seq. After :meth:`close`, returns -1 and sends nothing."""
        if self._closed:
            return -1
        seq = self.seq
        self.seq += 1
        with contextlib.suppress(zmq.Again):  # not for PUB in practice; the seq gap tells subscribers
            self._sock.send_multipart(make_frame(topic, seq, payload), flags=zmq.NOBLOCK, copy=False)
        return seq

    def close(self) -> None:
        """Close the socket. Idempotent."""
        if not self._closed:
            self._closed = True
            self._sock.close(0)


# ----------------------------------------------------------------------------------------- subscriber

R = TypeVar("R")


class NumberedSubscriber(Generic[R]):
    """SUB sockets to numbered-stream publishers, handing each decoded frame to ``on_message``.

    Lifecycle: construct, :meth:`start` (in a running loop), :meth:`close`. ``topic_of``/``epoch_of``
    describe the stream (:class:`~kvindex.protocol.numbered.NumberedStream`); ``make`` builds the
    received record ``make(endpoint, topic, seq, msg, discontinuity, lost)``. With ``monitor`` each
    endpoint also gets a socket monitor: :meth:`connected` says whether the TCP connection is up and
    ``on_connection(endpoint, up)`` is called on every change; ``reconnect_ivl`` (seconds) how soon a lost
    publisher is retried. Malformed frames are counted in :attr:`stats`, logged (rate-limited) and
    skipped; an exception in ``on_message`` is counted as ``callback_error`` and logged. A malformed
    endpoint raises ``zmq.ZMQError``.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        on_message: Callable[[R], None],
        *,
        topic_of: Mapping[type, bytes],
        epoch_of: Callable[[WireMessage], int],
        make: Callable[[str, bytes, int, Any, Discontinuity | None, int], R],
        ctx: zmq.asyncio.Context | None = None,
        what: str = "frame",
        monitor: bool = False,
        on_connection: Callable[[str, bool], None] | None = None,
        reconnect_ivl: float | None = None,
        log_interval: float = 5.0,
        hwm: int = HWM,
    ) -> None:
        self._endpoints = list(dict.fromkeys(endpoints))
        self._on_message = on_message
        self._make = make
        self._own_ctx = ctx is None
        self.ctx: zmq.asyncio.Context = ctx if ctx is not None else zmq.asyncio.Context()
        self._monitor = monitor
        self._on_connection = on_connection
        self._reconnect_ivl = reconnect_ivl
        self._hwm = hwm
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._monitors: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._up: dict[str, bool] = {}
        self._stream = NumberedStream(topic_of, epoch_of, RateLimitedLog(log, log_interval), what)
        self.stats: SubscriberStats = self._stream.stats
        self._closed = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The publisher endpoints subscribed to."""
        return tuple(self._endpoints)

    def start(self) -> None:
        """Connect to every endpoint and start reading. Needs a running loop; raises ``zmq.ZMQError``."""
        for ep in self._endpoints:
            self._open(ep)

    def add_endpoint(self, endpoint: str) -> None:
        """Subscribe to one more publisher (no-op if subscribed). Raises ``zmq.ZMQError``."""
        if endpoint not in self._endpoints:
            self._endpoints.append(endpoint)
        self._open(endpoint)

    def connected(self, endpoint: str) -> bool:
        """Whether the connection to ``endpoint`` is up (per the socket monitor; False without one)."""
        return self._up.get(endpoint, False)

    def _open(self, endpoint: str) -> None:
        if endpoint in self._sockets or self._closed:
            return
        sock: zmq.asyncio.Socket = make_socket(self.ctx, zmq.SUB, hwm=self._hwm)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self._reconnect_ivl is not None:
            sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(self._reconnect_ivl * 1000)))
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        mon = None
        if self._monitor:
            mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            if mon is not None:
                sock.disable_monitor()
                mon.close(0)
            sock.close(0)
            raise
        self._sockets[endpoint] = sock
        spawn = asyncio.get_running_loop().create_task
        self._tasks.append(spawn(self._read(endpoint, sock), name=f"sub:{endpoint}"))
        if mon is not None:
            self._monitors[endpoint] = mon
            self._tasks.append(spawn(self._watch(endpoint, mon), name=f"monitor:{endpoint}"))

    async def close(self) -> None:
        """Stop the tasks and close the sockets (and the context if this object made it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ep, sock in self._sockets.items():
            if ep in self._monitors:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
                self._monitors[ep].close(0)
            sock.close(0)
        self._tasks.clear()
        self._sockets.clear()
        self._monitors.clear()
        if self._own_ctx:
            self.ctx.destroy(linger=0)

    async def _watch(self, endpoint: str, mon: zmq.asyncio.Socket) -> None:
        while True:
            frames = await mon.recv_multipart()
            try:
                event = parse_monitor_message(frames)["event"]
            except Exception:  # a malformed monitor frame: ignore it, the stream's heartbeats still guard
                continue
            up = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if up != self._up.get(endpoint, False):
                self._up[endpoint] = up
                log.info("stream %s %s", endpoint, "connected" if up else "disconnected")
                if self._on_connection is not None:
                    self._on_connection(endpoint, up)

    async def _read(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                rec = self.handle_frames(endpoint, frames)
                if rec is not None:
                    self._on_message(rec)
            except Exception:  # a bug must not silence a publisher: count, log, read on
                self.stats.malformed["callback_error"] += 1
                log.exception("handling a frame from %s failed", endpoint)

    def handle_frames(self, endpoint: str, frames: Sequence[bytes]) -> R | None:
        """Decode and track one multipart frame of ``endpoint``; None (counted, logged) if malformed.

        Exposed so that tests and tools can drive the subscriber without sockets. Mutates the tracked
        seq/epoch and the counters; never raises on frame content.
        """
        got = self._stream.receive(endpoint, frames)
        if got is None:
            return None
        topic, seq, msg, disc, lost = got
        return self._make(endpoint, topic, seq, msg, disc, lost)


def subscribe(
    ctx: zmq.asyncio.Context, endpoint: str, topic: bytes = b"", *, hwm: int = HWM, curve: bool = True
) -> Any:
    """An asyncio SUB socket connected to ``endpoint``, subscribed to ``topic`` (raw frames; the caller
    closes it; ``curve=False`` for an engine's SGLang stream). Raises ``zmq.ZMQError`` for a malformed
    endpoint."""
    sock = make_socket(ctx, zmq.SUB, hwm=hwm, curve=curve)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock


# ------------------------------------------------------------------------------------ request / reply


def bind_router(ctx: zmq.Context[Any], host: str, port: int | None, *, curve: bool = True) -> tuple[Any, str]:
    """A ROUTER socket (asyncio if ``ctx`` is) bound on ``host:port``, and its ``tcp://`` endpoint
    (``curve=False``: an engine's SGLang replay socket). Raises ``zmq.ZMQError`` if the address cannot be
    bound."""
    sock = make_socket(ctx, zmq.ROUTER, curve=curve)
    try:
        sock.bind(bind_address(host, port))
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


class RequestFailed(Exception):
    """A :func:`request_reply` got no answer: ``reason`` is ``connect`` or ``timeout``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


async def request_reply(
    ctx: zmq.asyncio.Context, endpoint: str, frames: Sequence[bytes], timeout: float
) -> list[bytes]:
    """Send ``frames`` from a fresh DEALER to the ROUTER at ``endpoint`` and return the first reply,
    waiting at most ``timeout`` seconds for each step.

    Raises:
        RequestFailed: ``connect`` (an endpoint ZeroMQ cannot connect to) or ``timeout``.
    """
    sock = make_socket(ctx, zmq.DEALER)
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise RequestFailed("connect", f"{endpoint}: {exc}") from exc
        try:
            await asyncio.wait_for(sock.send_multipart(list(frames)), timeout)
            reply: list[bytes] = await asyncio.wait_for(sock.recv_multipart(), timeout)
        except asyncio.TimeoutError:
            raise RequestFailed("timeout", f"no reply from {endpoint} in {timeout:g} s") from None
    finally:
        sock.close(0)
    return reply
