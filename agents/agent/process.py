"""The per-instance agent: follows one engine's KV and load streams and republishes them to the cluster.

Theory of operation
-------------------
Upstream the agent speaks SGLang's protocol (sglang 0.5.23, ``srt/disaggregation/kv_events.py``; codecs in
:mod:`kvindex.protocol`): a SUB on the engine's KV stream ``(topic, seq, KVEventBatch)``, a SUB on its load
stream ``(b"load", seq, LoadStat)``, a DEALER on its replay ROUTER, and HTTP for ``/health`` and discovery.
Downstream it speaks the cluster protocol: one PUB socket carrying ``EventBatch``, ``LoadReport`` and
``Heartbeat`` frames numbered by ONE counter across topics, and a ROUTER answering ``SnapshotRequest``
with the whole mirror.

One owner task holds every piece of mutable state: the :class:`~kvindex.mirror.BlockMirror`, the PUB
socket, the cluster sequence counter and the engine-sequence tracker. Socket readers, the heartbeat
ticker and the health poller only put messages into its inbox. So a snapshot, answered by the owner
between two publishes, is exactly the state after the frame numbered ``Snapshot.seq`` — what a router
needs to apply the snapshot and then only later frames.

Engine-sequence tracking (gap repair through the replay socket, engine restarts, late joins) lives in
:mod:`agents.agent.kv_follower`, driven by the owner task; frame decoding is :mod:`agents.agent.frames`. Two things the KV stream alone cannot say are
fed to it from here: the first snapshot request that comes before any KV frame bootstraps the mirror from
the engine's replay buffer (a restarted agent next to an idle engine would otherwise serve an empty
mirror), and a suspected engine restart -- its health check recovering, or its load stream's seq going
back (SGLang numbers load frames from 0 per process) -- makes the follower verify through the replay
socket that the engine is still the one it followed (an idle engine that restarted would otherwise keep
its old blocks in the mirror until its next KV batch).

Engine health: a ``/health`` check every ``health_interval`` seconds of at most ``health_timeout``
seconds, judged by :class:`agents.agent.health.EngineHealth`.

Malformed input on any socket is counted by reason, logged (rate-limited) and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import aiohttp
import zmq
import zmq.asyncio

from agents.agent.config import AgentConfig
from agents.agent.counters import AgentCounters
from agents.agent.engine_link import (
    EngineInfo,
    ReplayClient,
    check_health,
    discover,
    engine_session,
    engine_ssl,
    wait_until_healthy,
)
from agents.agent.frames import decode_kv_frame, decode_load_frame, decode_snapshot_request, without_token_ids
from agents.agent.health import EngineHealth, Health
from agents.agent.kv_follower import KvFollower
from kvindex import curve
from kvindex import protocol as wire
from kvindex.logutil import RateLimitedLog
from kvindex.mirror import BlockMirror
from kvindex.transport import Publisher, bind_router, subscribe

__all__ = ["Agent"]

log = logging.getLogger("agents.agent")

SNDHWM = 100_000
RCVHWM = 100_000
INBOX_SIZE = 10_000


# --------------------------------------------------------------------------------- owner inbox messages


@dataclass(frozen=True, slots=True)
class _Frames:
    stream: str  # "kv", "load" or "snapshot"
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class _Tick:
    """Time to publish a heartbeat."""


@dataclass(frozen=True, slots=True)
class _Health:
    result: Health


_Inbox = _Frames | _Tick | _Health


class Agent:
    """Runtime state of one agent. ``start()`` → ``wait()`` → ``close()``; :func:`serve` drives it.

    After ``start()``: ``engine`` is the discovered :class:`EngineInfo`, ``pub_endpoint`` and
    ``snapshot_endpoint`` are the bound addresses, ``counters`` the live :class:`AgentCounters`.
    """

    def __init__(self, cfg: AgentConfig, mirror: BlockMirror | None = None) -> None:
        self.cfg = cfg
        self.instance = cfg.instance()
        self.epoch = secrets.randbelow(2**62 - 1) + 1
        self.mirror = mirror if mirror is not None else BlockMirror()
        self.counters = AgentCounters()
        self.engine: EngineInfo | None = None
        self.health = EngineHealth(cfg.health_failures)
        self.pub_endpoint = ""
        self.snapshot_endpoint = ""
        self._badlog = RateLimitedLog(log)
        self._session: aiohttp.ClientSession | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._pub: Publisher | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay: ReplayClient | None = None
        self._inbox: asyncio.Queue[_Inbox] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._follower: KvFollower | None = None
        self._bootstrap_tried = False  # a snapshot request bootstraps an unjoined follower, once
        self._load_seq: int | None = None  # last engine load-stream seq

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Wait for the engine, discover it, bind/connect every socket and start the tasks.

        Raises:
            EngineUnavailableError: the engine was not healthy within ``engine_wait``.
            EngineDiscoveryError: its KV endpoint is unknown.
            zmq.ZMQError: a socket could not be bound (e.g. port in use).
        """
        cfg = self.cfg
        try:
            log.info(
                "agent %s: waiting up to %g s for engine %s", self.instance, cfg.engine_wait, cfg.engine_url
            )
            self._session = engine_session(engine_ssl(cfg.engine_ca_file, cfg.engine_tls_verify))
            await wait_until_healthy(self._session, cfg.engine_url, cfg.engine_wait)
            eng = await discover(
                self._session, cfg.engine_url, cfg.kv_endpoint, cfg.replay_endpoint, cfg.load_endpoint
            )
            self.engine = eng
            ctx = self._ctx = zmq.asyncio.Context()
            self._pub = Publisher(ctx, cfg.host, cfg.pub_port, hwm=SNDHWM)
            self.pub_endpoint = self._pub.endpoint
            self._router, self.snapshot_endpoint = bind_router(ctx, cfg.host, cfg.snapshot_port)
            self._sockets.append(self._router)
            kv_sub = self._sub(eng.kv_endpoint, eng.kv_topic)
            load_sub = self._sub(eng.load_endpoint, eng.load_topic) if eng.load_endpoint else None
            if eng.replay_endpoint:
                self._replay = ReplayClient(
                    ctx, eng.replay_endpoint, cfg.replay_timeout, on_skipped=self._replay_reply_skipped
                )
            self._follower = KvFollower(self.mirror, self.counters, self._replay, self._emit, self.instance)
            log.info(
                "agent %s (epoch %d) following %s: kv %s, replay %s, load %s, block_size %d, model %r",
                self.instance, self.epoch, eng.url, eng.kv_endpoint, eng.replay_endpoint,
                eng.load_endpoint, eng.block_size, eng.model,
            )  # fmt: skip
            self._inbox = asyncio.Queue(INBOX_SIZE)
            spawn = asyncio.get_running_loop().create_task
            self._tasks = [
                spawn(self._owner(), name="agent-owner"),
                spawn(self._reader(kv_sub, "kv"), name="agent-kv"),
                spawn(self._reader(self._router, "snapshot"), name="agent-snapshot"),
                spawn(self._ticker(), name="agent-heartbeat"),
                spawn(self._health_loop(), name="agent-health"),
            ]
            if load_sub is not None:
                self._tasks.append(spawn(self._reader(load_sub, "load"), name="agent-load"))
            else:
                log.warning("engine %s has no load stream: no LoadReport will be published", eng.url)
        except BaseException:
            await self.close()
            raise

    @property
    def engine_healthy(self) -> bool:
        """The agent's verdict on its engine (:class:`~agents.agent.health.EngineHealth`)."""
        return self.health.healthy

    @property
    def follower(self) -> KvFollower | None:
        """The engine-stream follower (``expected`` = next engine seq), ``None`` before ``start()``. Read it
        only; the owner task mutates it."""
        return self._follower

    def endpoints(self) -> dict[str, str]:
        """The READY endpoints: ``pub``, ``snapshot`` (bound ZeroMQ URLs) and ``engine`` (HTTP URL)."""
        return {"pub": self.pub_endpoint, "snapshot": self.snapshot_endpoint, "engine": self.cfg.engine_url}

    async def wait(self) -> None:
        """Run until a task fails (re-raising its error: a bug, since network input is never fatal)."""
        await asyncio.gather(*self._tasks)

    async def close(self) -> None:
        """Cancel the tasks, close every socket with linger 0 and the HTTP session. Idempotent."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._replay is not None:
            self._replay.close()
        if self._pub is not None:
            self._pub.close()
        for s in self._sockets:
            s.close(linger=0)
        self._sockets = []
        if self._ctx is not None:
            curve.release(self._ctx)  # its ZAP handler, if CURVE is on
            self._ctx.term()
            self._ctx = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sub(self, endpoint: str, topic: bytes) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        s: zmq.asyncio.Socket = subscribe(self._ctx, endpoint, topic, hwm=RCVHWM, curve=False)
        self._sockets.append(s)
        return s

    # ------------------------------------------------------------------------- feeder tasks (no state)

    async def _put(self, msg: _Inbox) -> None:
        assert self._inbox is not None
        await self._inbox.put(msg)

    async def _reader(self, sock: zmq.asyncio.Socket, stream: str) -> None:
        while True:
            frames = await sock.recv_multipart()
            await self._put(_Frames(stream, frames))

    async def _ticker(self) -> None:
        while True:
            await self._put(_Tick())
            await asyncio.sleep(self.cfg.heartbeat_interval)

    async def _health_loop(self) -> None:
        assert self._session is not None
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            result = await check_health(self._session, self.cfg.engine_url, self.cfg.health_timeout)
            await self._put(_Health(result))

    # ------------------------------------------------------------------------------ the owner task

    async def _owner(self) -> None:
        assert self._inbox is not None
        while True:
            msg = await self._inbox.get()
            if isinstance(msg, _Frames):
                if msg.stream == "kv":
                    await self._on_kv(msg.frames)
                elif msg.stream == "load":
                    await self._on_load(msg.frames)
                else:
                    await self._on_snapshot_request(msg.frames)
            elif isinstance(msg, _Tick):
                await self._publish_heartbeat()
            else:
                await self._on_health(msg.result)

    def _replay_reply_skipped(self, reason: str) -> None:
        """A replay reply the client skipped (malformed, or stale from an earlier request)."""
        self.counters.malformed[("replay", reason)] += 1
        self._badlog.warning(f"replay:{reason}", "agent %s: skipped a %s replay reply", self.instance, reason)

    def _malformed(self, stream: str, exc: wire.WireError) -> None:
        self.counters.malformed[(stream, exc.reason)] += 1
        self._badlog.warning(f"{stream}:{exc.reason}", "agent %s: skipped malformed %s frame: %s",
                             self.instance, stream, exc)  # fmt: skip

    async def _publish(self, topic: bytes, msg: wire.ClusterMessage) -> None:
        assert self._pub is not None
        if self._pub.publish(topic, wire.encode_message(msg)) >= 0:
            self.counters.published[topic.decode()] += 1

    def _block_size(self) -> int:
        """The mirror's block size (fixed by the first BlockStored), else the engine's announced one."""
        assert self.engine is not None
        return self.mirror.block_size or self.engine.block_size

    async def _publish_heartbeat(self) -> None:
        assert self.engine is not None
        hb = wire.Heartbeat(
            instance=self.instance,
            agent_epoch=self.epoch,
            ts=time.time(),
            engine_url=self.cfg.engine_url,
            engine_healthy=self.engine_healthy,
            block_size=self._block_size(),
            cached_blocks=len(self.mirror),
            model=self.engine.model,
            snapshot_endpoint=self.snapshot_endpoint,
            interval=self.cfg.heartbeat_interval,
        )
        await self._publish(wire.TOPIC_HEARTBEAT, hb)

    async def _on_health(self, result: Health) -> None:
        self.counters.health_checks += 1
        self.counters.health_failures += result is Health.FAILED or result is Health.REFUSED
        self.counters.health_not_ready += result is Health.NOT_READY
        if not self.health.observe(result):
            return
        if self.health.healthy:
            log.info("agent %s: engine %s healthy again", self.instance, self.cfg.engine_url)
            if self._follower is not None:  # it may be a new engine process: check before going on
                await self._follower.verify()
        else:
            if self._follower is not None:
                self._follower.engine_went_down = True
            log.warning("agent %s: engine %s unhealthy", self.instance, self.cfg.engine_url)
            await self._publish_heartbeat()

    async def _on_load(self, frames: list[bytes]) -> None:
        assert self.engine is not None
        self.counters.frames_in["load"] += 1
        try:
            seq, stat = decode_load_frame(frames, self.engine.load_topic)
        except wire.WireError as exc:
            self._malformed("load", exc)
            return
        # A load seq going back is the engine restarting (or a duplicate/reordered frame): verify through
        # the replay socket, since an idle engine's KV stream would not say so for a long time.
        suspect = self._load_seq is not None and seq < self._load_seq
        self._load_seq = seq
        if suspect and self._follower is not None:
            await self._follower.verify()
        report = wire.LoadReport.of_stat(stat, self.instance, self.epoch, time.time())
        await self._publish(wire.TOPIC_LOAD, report)

    async def _on_snapshot_request(self, frames: list[bytes]) -> None:
        assert self._router is not None and self.engine is not None
        self.counters.frames_in["snapshot"] += 1
        try:
            identity = decode_snapshot_request(frames)
        except wire.WireError as exc:
            self._malformed("snapshot", exc)
            return
        if not self._bootstrap_tried and self._follower is not None and self._follower.expected is None:
            # Asked for the mirror before any KV frame came: learn the engine's cache from its replay
            # buffer first, or a restarted agent would hand out an empty mirror for a full engine.
            self._bootstrap_tried = True
            await self._follower.bootstrap()
        snap = wire.Snapshot(
            instance=self.instance,
            agent_epoch=self.epoch,
            seq=self._pub.seq - 1 if self._pub is not None else -1,
            block_size=self._block_size(),
            events=(
                tuple(self.mirror.snapshot_events())
                if self.cfg.publish_token_ids
                else without_token_ids(self.mirror.snapshot_events())
            ),
        )
        await self._router.send_multipart([identity, b"", wire.encode_message(snap)])

    async def _on_kv(self, frames: list[bytes]) -> None:
        assert self.engine is not None and self._follower is not None
        self.counters.frames_in["kv"] += 1
        try:
            seq, batch = decode_kv_frame(frames, self.engine.kv_topic)
        except wire.WireError as exc:
            self._malformed("kv", exc)
            return
        await self._follower.on_batch(seq, batch)

    async def _emit(self, engine_seq: int, ts: float, events: tuple[wire.KVEvent, ...]) -> None:
        """The follower's output: one ``EventBatch`` on the PUB socket (token ids left out unless
        ``cfg.publish_token_ids``)."""
        if not self.cfg.publish_token_ids:
            events = without_token_ids(events)
        await self._publish(
            wire.TOPIC_EVENTS, wire.EventBatch(self.instance, self.epoch, engine_seq, ts, events)
        )
