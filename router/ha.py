"""Hot standby: a router's role, its decision stream, following a primary, and taking its port over.

Theory of operation
-------------------
A **primary** serves the HTTP port and publishes every decision and a heartbeat (every
:data:`~router.decisions.ROUTER_HEARTBEAT_INTERVAL` s) on its decision stream. A **standby** runs the very
same :class:`~router.server.RouterServer` (subscriber, core, ticker) without binding the HTTP port, and
follows the primary's decision stream through a :class:`~router.decisions.DecisionMirror`, so its index,
speculative entries and per-instance dispatch accounting are the primary's. It publishes its own stream
too (heartbeats saying ``standby``), so observers see both routers.

Takeover (on one machine). The standby considers the primary gone when the connection to its decision
stream dropped (the socket monitor reports it within milliseconds of the process dying) or when no
heartbeat came for ``primary_timeout`` seconds. It then tries to bind the HTTP port itself, every few
milliseconds, with ``SO_REUSEADDR`` and without ``SO_REUSEPORT``: on Linux that bind fails for as long as
any socket listens on the port, so it succeeds only once the primary's listener is closed, i.e. the
primary process is dead or has shut down. Two routers can therefore never serve the port at once, and a
primary that was merely slow keeps its port (the standby goes back to waiting when heartbeats resume).
Once bound, the standby closes its decision subscription, releases the dispatches it mirrored (their
requests died with the primary's connections), starts serving from its warm state and heartbeats as
``primary``: a new standby can follow it. Across machines the port check means nothing; a virtual IP
(keepalived), a Kubernetes Lease or an etcd lease (:mod:`router.etcd_lease`, ``--takeover etcd``: the
holder of a leader key serves, with the key's create revision as its epoch) decides instead
(docs/ha.md). Whichever way two routers came to serve at once (a frozen primary resumed, a split
healed), the fencing epoch settles it: :mod:`router.fence`.

Requests that can fail: those the primary had accepted when it died (their connections close with it),
and connections made while no process listens (between the primary's death and the standby's bind the
kernel refuses them). Every request that connects after the bind is served by the new primary.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from kvindex.protocol import RouterHeartbeat
from kvindex.protocol.numbered import DecisionReceived
from router import auth
from router.decisions import (
    ROUTER_HEARTBEAT_INTERVAL,
    DecisionPublisher,
    DecisionSubscriber,
)
from router.etcd_lease import EtcdLease, LeaseHeld, parse_endpoints
from router.ha_admin import HAAdmin
from router.ha_state import SERVING_ROLES, HACollector

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

BIND_RETRY_MIN = 0.005
BIND_RETRY_MAX = 0.05
"""Seconds between two bind attempts while the primary looks gone (growing from min to max)."""


def try_bind(host: str, port: int) -> socket.socket | None:
    """A listening TCP socket on ``host:port`` (``SO_REUSEADDR``, no ``SO_REUSEPORT``), or None while the
    address is in use (another socket listens there) or not on this machine (a virtual IP that keepalived
    has not moved here yet). Raises ``OSError`` for any other failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            return None
        raise
    sock.setblocking(False)
    return sock


class HANode(HAAdmin):
    """Role, decision stream, primary following and takeover around one :class:`RouterServer`.

    Lifecycle: :meth:`start`, (:meth:`wait_for_primary`), :meth:`stop`. ``role`` changes from
    ``standby`` to ``primary`` at a takeover, never back. Its fields and reports are
    :class:`~router.ha_state.HAState`'s, its admin port and peer registration
    :class:`~router.ha_admin.HAAdmin`'s.
    """

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the server (binding the port only as primary), the decision stream, and for a standby
        the following and the takeover watch. Raises ``OSError`` / ``zmq.ZMQError`` on a bind failure."""
        server, cfg = self.server, self.cfg
        if cfg.decisions_port is not None:
            self.publisher = DecisionPublisher(cfg.decisions_host or cfg.host, cfg.decisions_port, self.epoch)
            self.publisher.term = self.fence.term
            server.decisions = self.publisher
        if cfg.takeover == "etcd":
            await self._start_lease()
        server.extra_state = self.state_json
        server.metrics.registry.register(HACollector(self))
        server.middlewares.append(self._gate)
        await server.start(bind=self.role in SERVING_ROLES)
        loop = asyncio.get_running_loop()
        self.peers = DecisionSubscriber(cfg.peer_decisions, self._on_peer, ctx=server.subscriber.ctx)
        self.peers.start()
        if self.role == "standby":
            assert cfg.primary_decisions is not None  # RouterConfig checks it
            self.follower = DecisionSubscriber(
                [cfg.primary_decisions], self._on_primary_stream, ctx=server.subscriber.ctx
            )
            self.follower.start()
            self._started = time.monotonic()
            if cfg.takeover == "auto":
                self._tasks.append(loop.create_task(self._watch(), name="ha-watch"))
            elif cfg.takeover == "etcd":
                self._tasks.append(loop.create_task(self._campaign(), name="etcd-campaign"))
        # The beat keeps the fence's clock even without a decision stream: with no beat, the fence would
        # see one endless stall and hold every request at the gate (the launch fuzz slow-sender finding).
        self._tasks.append(loop.create_task(self._beat(), name="ha-heartbeat"))
        if cfg.admin_port is not None:
            await self._start_admin(cfg.admin_port)
        if cfg.metrics_port is not None:
            await self._start_metrics(cfg.metrics_port)
        log.info(
            "router %s (epoch %x): decisions %s, admin %s%s",
            self.role,
            self.epoch,
            self.publisher.endpoint if self.publisher else "off",
            self.admin_url or "off",
            f", following {cfg.primary_decisions}" if self.follower else "",
        )

    async def wait_for_primary(self, timeout: float) -> bool:
        """A standby: wait until the primary's first heartbeat arrived (at most ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while self.role == "standby" and self.mirror.primary is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        """Stop everything (the server included). Safe after a failed start."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.lease is not None:  # a holder resigns (the key goes): its standby takes over at once
            await self.lease.close(resign=True)
        for sub in (self.follower, self.peers):
            if sub is not None:
                await sub.close()
        for runner in (self._admin, self._metrics_site):
            if runner is not None:
                await runner.cleanup()
        self._admin = self._metrics_site = None
        await self.server.stop()
        if self.publisher is not None:
            self.publisher.close()

    # -------------------------------------------------------------------------------------- following

    def primary_alive(self, now: float) -> bool:
        """A standby's view: the decision stream is connected and a heartbeat came recently."""
        f = self.follower
        if f is None or self.cfg.primary_decisions is None:
            return False
        hb_at = self.mirror.heartbeat_at
        if hb_at is None:  # never heard from it: allow one timeout from our start to connect
            return now - self._started <= self.cfg.primary_timeout
        if self.mirror.primary is not None and self.mirror.primary.role == "fenced":
            return False
        return f.connected(self.cfg.primary_decisions) and now - hb_at <= self.cfg.primary_timeout

    async def _watch(self) -> None:
        delay = BIND_RETRY_MIN
        while self.role == "standby":
            now = time.monotonic()
            if self.primary_alive(now):
                delay = BIND_RETRY_MIN
                self.primary_lost_at = None
                await asyncio.sleep(0.01)
                continue
            if self.primary_lost_at is None:
                self.primary_lost_at = time.time()
                log.warning("primary looks gone; trying to take port %d over", self.cfg.port)
            self.bind_attempts += 1
            try:
                sock = try_bind(self.cfg.host, self.cfg.port)
            except OSError as exc:
                log.error("cannot bind %s:%d for a takeover: %s", self.cfg.host, self.cfg.port, exc)
                sock = None
            if sock is not None:
                await self._promote(sock)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, BIND_RETRY_MAX)

    async def promote_now(self) -> bool:
        """Take the port over now if it can be bound (an external elector decided). Returns whether this
        router is the primary afterwards. Raises ``OSError`` for a bind failure other than "in use"."""
        if self.role in SERVING_ROLES:
            return True
        if self._promoting:  # the watch got there first
            await self._promoted.wait()
            return True
        if self.primary_lost_at is None:
            self.primary_lost_at = time.time()
        self.bind_attempts += 1
        sock = try_bind(self.cfg.host, self.cfg.port)
        if sock is None:
            return False
        await self._promote(sock)
        return True

    async def _promote(self, sock: socket.socket, term: int | None = None) -> None:
        if self._promoting:
            sock.close()
            return
        self._promoting = True
        # The old primary's stream stays open: no more mirroring (the role check in
        # _on_primary_stream), but if that router comes back it is seen, and fenced (router/fence.py).
        released = self.mirror.release()
        self.fence.term = self.fence.promotion_term() if term is None else term
        if self.publisher is not None:
            self.publisher.term = self.fence.term
        await self.server.bind(sock)
        self.role = "primary"
        self.takeovers += 1
        self.promoted_at = time.time()
        self._publish_heartbeat()
        self._promoted.set()
        lost = self.primary_lost_at
        log.warning(
            "took over as primary (epoch %d) on %s %.0f ms after the primary was seen gone; %d mirrored "
            "dispatches released; index %d blocks",
            self.fence.term,
            self.server.url,
            1000 * (self.promoted_at - lost) if lost else 0.0,
            released,
            self.server.core.index.total_blocks() if self.server.core.index else 0,
        )

    async def wait_promoted(self) -> None:
        """Return once this router took over (never, for a primary)."""
        await self._promoted.wait()

    # ------------------------------------------------------------------------------------ heartbeats

    async def _beat(self) -> None:
        while True:
            self.fence.beat()
            try:
                self._publish_heartbeat()
            except Exception:  # a bug here must not stop the heartbeat for good
                log.exception("router heartbeat failed")
            await asyncio.sleep(ROUTER_HEARTBEAT_INTERVAL)

    # -------------------------------------------------------------------------------------- fencing

    def _on_primary_stream(self, rec: DecisionReceived) -> None:
        """The followed primary's stream: mirrored while standing by, watched for its epoch always."""
        if self.role == "standby":
            self.mirror.on_message(rec)
        if isinstance(rec.msg, RouterHeartbeat):
            self._observe(rec.msg)
            if self.role == "standby" and rec.msg.role == "primary":
                self._register_with(rec.msg)

    def _on_peer(self, rec: DecisionReceived) -> None:
        if isinstance(rec.msg, RouterHeartbeat):
            self._observe(rec.msg)

    def _observe(self, hb: RouterHeartbeat) -> None:
        if self.fence.observe(hb) and self.role == "primary":
            self._tasks.append(asyncio.get_running_loop().create_task(self._step_down(hb), name="fence"))

    async def _step_down(self, hb: RouterHeartbeat) -> None:
        if self.role != "primary":
            return
        self.role = "fenced"
        self.fence.fenced_by = hb
        await self.server.unbind()
        self._publish_heartbeat()
        log.error(
            "FENCED: router %x serves %s as primary with epoch %d > this router's %d; stopped serving and "
            "released %s:%d",
            hb.router_epoch,
            hb.http,
            hb.term,
            self.fence.term,
            self.cfg.host,
            self.server.port,
        )
        self.fenced.set()

    # ------------------------------------------------------------------------------------ etcd lease

    async def _start_lease(self) -> None:
        """Make the lease; a primary must win it before it binds the port (its epoch is the key's create
        revision). Raises :class:`~router.etcd_lease.LeaseHeld` if another router holds the key for
        longer than two TTLs, ``EtcdUnavailable`` without the client."""
        cfg = self.cfg
        value = {
            "router_epoch": f"{self.epoch:x}",
            "http": f"{auth.scheme(cfg)}://{cfg.host}:{cfg.port}",
            "decisions": self.publisher.endpoint if self.publisher else "",
            "pid": os.getpid(),
        }
        endpoints = parse_endpoints(",".join(cfg.etcd_endpoints))
        self.lease = EtcdLease(endpoints, cfg.etcd_prefix, cfg.etcd_lease_ttl, value)
        self.server.metrics.registry.register(self.lease.collector())
        if self.role != "primary":
            return
        wait = 2 * cfg.etcd_lease_ttl + 1.0  # a killed holder's key expires within one TTL
        try:
            self.fence.term = await asyncio.wait_for(self.lease.campaign(), wait)
        except asyncio.TimeoutError:
            h = self.lease.holder
            if h is None:
                raise LeaseHeld(
                    f"could not campaign for etcd key {self.lease.key.decode()} within {wait:g} s: is etcd "
                    f"reachable at {','.join(cfg.etcd_endpoints)}?"
                ) from None
            raise LeaseHeld(
                f"etcd key {self.lease.key.decode()} is held by router {h.router_epoch} serving {h.http} "
                f"(epoch {h.epoch}) for more than {wait:g} s: start this router as --role standby "
                f"--primary-decisions {h.decisions}"
            ) from None
        if self.publisher is not None:
            self.publisher.term = self.fence.term
        self._tasks.append(asyncio.get_running_loop().create_task(self._hold(), name="etcd-hold"))

    async def _campaign(self) -> None:
        """A standby: win the key (it waits for the holder's lease to go), bind the port, serve."""
        assert self.lease is not None
        term = await self.lease.campaign()
        self.primary_lost_at = self.lease.vacant_at or time.time()
        delay = BIND_RETRY_MIN
        while (sock := try_bind(self.cfg.host, self.cfg.port)) is None:  # the port is this host's
            self.bind_attempts += 1
            if self.lease.lost.is_set():
                return
            if delay == BIND_RETRY_MIN:
                log.warning("won the etcd key but %s:%d is in use; retrying", self.cfg.host, self.cfg.port)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BIND_RETRY_MAX)
        await self._promote(sock, term)
        await self._hold()

    async def _hold(self) -> None:
        """A holder: stop serving once the lease is lost."""
        assert self.lease is not None
        await self.lease.lost.wait()
        if self.role != "primary":
            return
        self.role = "fenced"
        await self.server.unbind()
        self._publish_heartbeat()
        log.error(
            "FENCED: lost the etcd lease (epoch %d): %s; stopped serving and released %s:%d",
            self.fence.term,
            self.lease.lost_reason,
            self.cfg.host,
            self.cfg.port,
        )
        self.fenced.set()

    # ----------------------------------------------------------------------------------------- state
