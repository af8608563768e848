"""An HA router's state (:class:`HAState`, the base of :class:`router.ha.HANode`): its role, epoch and
fence, decision stream, followed primary and mirror, takeover counts and lease; what it reports of them:
the READY line's endpoints, its heartbeat, the ``ha`` section of ``GET /router/state`` and its Prometheus
metrics (:class:`HACollector`). It changes nothing; :mod:`router.ha` drives it."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvindex.protocol import TOPIC_ROUTER_HEARTBEAT
from router import auth
from router.decisions import DecisionPublisher, DecisionSubscriber, heartbeat_of
from router.etcd_lease import EtcdLease
from router.fence import Fence
from router.model.mirror import DecisionMirror

if TYPE_CHECKING:
    from router.server import RouterServer


SERVING_ROLES = ("primary", "active")
"""Roles that serve the HTTP port. ``active`` (:mod:`router.active`) serves beside other active routers
and is outside fencing: it heartbeats with term 0 and never steps down (only a ``primary`` does)."""


class HAState:
    """The fields of an HA router around one :class:`RouterServer`, and the reports read from them."""

    def __init__(self, server: RouterServer) -> None:
        self.server = server
        cfg = server.cfg
        self.cfg = cfg
        self.role = cfg.role
        self.epoch = secrets.randbelow(2**62 - 1) + 1
        """This process's incarnation id (random; not comparable between routers)."""
        self.fence = Fence(1 if cfg.role == "primary" else 0, self.epoch, cfg.primary_timeout)
        self.fenced = asyncio.Event()
        """Set once this router stepped down for a primary with a higher epoch."""
        self.peers: DecisionSubscriber | None = None
        self._registered_with: str | None = None
        self.publisher: DecisionPublisher | None = None
        self.follower: DecisionSubscriber | None = None
        self.mirror = DecisionMirror(server.core)
        self.takeovers = 0
        self.promoted_at: float | None = None
        """Wall clock (Unix seconds) of this router's takeover, if it took over."""
        self.primary_lost_at: float | None = None
        """Wall clock when the primary was first seen gone, for the takeover that followed."""
        self.bind_attempts = 0
        self._started = time.monotonic()
        self._admin: web.AppRunner | None = None
        self.admin_url: str | None = None
        self._metrics_site: web.AppRunner | None = None
        self.metrics_url: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._promoted = asyncio.Event()
        self._promoting = False
        self.lease: EtcdLease | None = None
        """``--takeover etcd``: this router's side of the election (serves only while it holds the key)."""

    def endpoints(self) -> dict[str, str]:
        """The READY line's endpoints: ``http`` (served, or to be served after a takeover), ``decisions``
        and ``admin`` when on."""
        http = (
            self.server.url
            if self.server.port
            else f"{auth.scheme(self.cfg)}://{self.cfg.host}:{self.cfg.port}"
        )
        eps = {"http": http}
        if self.publisher is not None:
            eps["decisions"] = self.publisher.endpoint
        if self.admin_url is not None:
            eps["admin"] = self.admin_url
        if self.metrics_url is not None:
            eps["metrics"] = self.metrics_url
        return eps

    def _publish_heartbeat(self) -> None:
        if self.publisher is None:
            return
        hb = heartbeat_of(
            self.server.core,
            self.epoch,
            self.role,
            self.endpoints()["http"],
            os.getpid(),
            term=self.fence.term,
            admin=self.admin_url or "",
            decisions=self.publisher.endpoint,
        )
        self.publisher.publish(TOPIC_ROUTER_HEARTBEAT, hb)

    def state_json(self) -> dict[str, Any]:
        """The ``ha`` section of ``GET /router/state``."""
        now = time.monotonic()
        hb = self.mirror.primary
        f = self.follower
        return {
            "role": self.role,
            "pid": os.getpid(),
            "router_epoch": f"{self.epoch:x}",
            "term": self.fence.term,
            "highest_term_seen": self.fence.highest.term if self.fence.highest else None,
            "fenced_by": None
            if self.fence.fenced_by is None
            else {"http": self.fence.fenced_by.http, "term": self.fence.fenced_by.term},
            "stalls": self.fence.stalls,
            "peers": list(self.peers.endpoints) if self.peers else [],
            "decisions": self.publisher.endpoint if self.publisher else None,
            "admin": self.admin_url,
            "following": self.cfg.primary_decisions if self.cfg.role == "standby" else None,
            "primary_connected": bool(
                f and self.cfg.primary_decisions and f.connected(self.cfg.primary_decisions)
            ),
            "primary_heartbeat_age": None
            if self.mirror.heartbeat_at is None
            else now - self.mirror.heartbeat_at,
            "primary_http": hb.http if hb else None,
            "mirrored_open": self.mirror.open_tickets,
            "mirror": vars(self.mirror.stats).copy(),
            "takeovers": self.takeovers,
            "promoted_at": self.promoted_at,
            "primary_lost_at": self.primary_lost_at,
            "bind_attempts": self.bind_attempts,
            "lease": None
            if self.lease is None
            else {
                "key": self.lease.key.decode(),
                "held": self.lease.held(),
                "epoch": self.lease.epoch,
                "lost": self.lease.lost_reason or None,
                "holder_seen": vars(self.lease.holder) if self.lease.holder else None,
            },
            "published": dict(self.publisher.published) if self.publisher else {},
        }


class HACollector(Collector):
    """The router's HA metrics, read at scrape time."""

    def __init__(self, node: HAState) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        n = self._node
        role = GaugeMetricFamily("router_role", "1 for this router's current role", labels=["role"])
        for r in ("primary", "standby", "fenced", "active"):
            role.add_metric([r], 1.0 if n.role == r else 0.0)
        yield role
        yield GaugeMetricFamily("router_epoch", "This router's fencing epoch (term)", value=n.fence.term)
        yield CounterMetricFamily(
            "router_fenced",
            "Times this router stopped serving for a primary with a higher epoch",
            value=1 if n.role == "fenced" else 0,
        )
        yield CounterMetricFamily(
            "router_takeovers", "Times this router took the port over", value=n.takeovers
        )
        pub = CounterMetricFamily(
            "router_decision_frames_published", "Decision-stream frames published, by type", labels=["type"]
        )
        if n.publisher is not None:
            for t, c in sorted(n.publisher.published.items()):
                pub.add_metric([t], c)
        yield pub
        ms = n.mirror.stats
        mir = CounterMetricFamily(
            "router_mirrored_decisions",
            "Primary's decisions applied by this standby, by outcome",
            labels=["kind"],
        )
        for kind in ("routed", "finished", "unknown_finished", "reconciled", "released"):
            mir.add_metric([kind], getattr(ms, kind))
        yield mir
        gaps = CounterMetricFamily(
            "router_decision_stream_lost_frames", "Frames of the followed decision stream never received"
        )
        gaps.add_metric([], n.follower.stats.lost_frames if n.follower else 0)
        yield gaps
        age = n.mirror.heartbeat_at
        yield GaugeMetricFamily(
            "router_primary_heartbeat_age_seconds",
            "Seconds since the followed primary's last heartbeat (-1: none yet or not a standby)",
            value=-1.0 if age is None or n.role != "standby" else time.monotonic() - age,
        )
