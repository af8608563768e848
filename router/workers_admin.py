"""The supervisor's admin port for ``python -m router --workers N`` (:mod:`router.workers`): one
``/metrics`` for every worker, ``/health`` and ``/router/state`` for the group.

Metrics: each worker serves its own ``/metrics`` on a loopback port of its own (never on the shared HTTP
port, where the kernel would pick a worker at random). At scrape time the supervisor reads every live
worker's text (:func:`scrape`), adds a ``worker`` label (``"0"`` .. ``"N-1"``) to every sample and serves
the union, plus its own ``router_worker*`` metrics (its ``router_auth_rejected_total``, a metric the
workers have too, merged in with ``worker="supervisor"``): sum over ``worker`` for the group's totals
(``sum without (worker) (rate(router_requests_total[1m]))``). Why not prometheus_client's multiprocess
mode: most router metrics are read at scrape time from the worker's in-memory state (the index, the
instances' load, admission, breakers, peers; :mod:`router.metrics`), which that mode cannot see, and it
would have to pick a sum/max/min for each gauge across workers; a per-worker label keeps every metric as
it is with one process. A worker that does not answer within :data:`SCRAPE_TIMEOUT` is left out of that
scrape and counted in ``router_worker_scrape_failures_total``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Final, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from router import auth
from router.config import RouterConfig


class WorkerView(Protocol):
    """What the admin port reads of a worker (:class:`router.workers.Worker`)."""

    @property
    def index(self) -> int: ...
    @property
    def alive(self) -> bool: ...
    @property
    def ready(self) -> object | None: ...
    def url(self, name: str) -> str | None: ...


class Group(Protocol):
    """What the admin port reads of the supervisor (:class:`router.workers.Group`)."""

    @property
    def workers(self) -> Sequence[WorkerView]: ...
    def state_json(self) -> dict[str, Any]: ...


__all__ = ["SCRAPE_TIMEOUT", "Group", "WorkerView", "WorkersAdmin", "label_families"]

log = logging.getLogger("router.workers")

SCRAPE_TIMEOUT: Final = 2.0
"""Seconds a worker has to answer the supervisor's scrape."""


def label_families(texts: Sequence[tuple[str, str]]) -> list[Metric]:
    """Merge ``(worker, exposition text)`` pairs into metric families whose every sample carries a
    ``worker`` label. Families of the same name are merged (the first worker's help and type win)."""
    merged: dict[str, Metric] = {}
    for worker, text in texts:
        for fam in text_string_to_metric_families(text):
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples.extend(s._replace(labels={**s.labels, "worker": worker}) for s in fam.samples)
    return list(merged.values())


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _first_key(*rings: tuple[str, ...]) -> str | None:
    specs = next((r for r in rings if r), ())
    return auth.read_keys(specs[0])[0] if specs else None


class WorkersAdmin:
    """The admin (and ``--metrics-port``) sites of a supervisor. Raises ``OSError`` from :meth:`start`
    for a port that cannot be bound, :class:`~router.auth.AuthConfigError` from the constructor."""

    def __init__(self, sup: Group, cfg: RouterConfig) -> None:
        self.sup = sup
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self._access_registry = CollectorRegistry()  # its counter is the workers' too: merged, labelled
        self.access = auth.Access(cfg, self._access_registry)
        self.ssl = auth.server_ssl(cfg)
        self.restarts = Counter(
            "router_worker_restarts",
            "Worker processes of --workers N restarted after they exited, by worker",
            ["worker"],
            registry=self.registry,
        )
        self.scrape_failures = Counter(
            "router_worker_scrape_failures",
            "Scrapes of a worker's /metrics that failed or timed out (that worker left out), by worker",
            ["worker"],
            registry=self.registry,
        )
        self.registry.register(_AliveCollector(sup))
        self._metrics_key = _first_key(cfg.metrics_keys, cfg.admin_keys, cfg.api_keys)
        self._runners: list[web.AppRunner] = []
        self.admin_url: str | None = None
        self.metrics_url: str | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Serve the admin port (``--admin-port``, OS-assigned when not given) and ``--metrics-port``
        if given; with ``--metrics-port`` the admin port has no ``/metrics``."""
        cfg = self.cfg
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT))
        admin = web.Application(middlewares=[self.access.middleware])
        admin.router.add_get("/health", self._health)
        admin.router.add_get("/router/state", self._state)
        if cfg.metrics_port is None:
            admin.router.add_get("/metrics", self._metrics)
        self.admin_url = await self._site(admin, cfg.admin_host or cfg.host, cfg.admin_port or 0)
        if cfg.metrics_port is not None:
            m = web.Application(middlewares=[self.access.middleware])
            m.router.add_get("/metrics", self._metrics)
            m.router.add_get("/health", self._health)
            self.metrics_url = await self._site(m, cfg.metrics_host or cfg.host, cfg.metrics_port)

    async def _site(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port, ssl_context=self.ssl).start()
        return f"{auth.scheme(self.cfg)}://{host}:{int(runner.addresses[0][1])}"

    async def stop(self) -> None:
        """Close the sites and the scrape session. Idempotent."""
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -------------------------------------------------------------------------------------- handlers

    async def scrape(self) -> bytes:
        """The exposition text of every live worker, labelled, then the supervisor's own metrics."""
        urls = [(str(w.index), w.url("metrics")) for w in self.sup.workers if w.alive]
        texts = await asyncio.gather(*(self._fetch(i, u) for i, u in urls if u))
        own = ("supervisor", generate_latest(self._access_registry).decode())
        reg = CollectorRegistry()
        reg.register(_Families(label_families([*(t for t in texts if t is not None), own])))
        return generate_latest(reg) + generate_latest(self.registry)

    async def _fetch(self, worker: str, url: str) -> tuple[str, str] | None:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self._metrics_key}"} if self._metrics_key else {}
        try:
            async with self._session.get(url + "/metrics", headers=headers, ssl=False) as r:
                if r.status == 200:
                    return worker, await r.text()
                log.warning("worker %s: /metrics answered %d", worker, r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("worker %s: /metrics failed: %r", worker, exc)
        self.scrape_failures.labels(worker).inc()
        return None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        ready = sum(1 for w in self.sup.workers if w.alive and w.ready is not None)
        body = {"status": "ok" if ready else "unavailable", "workers": len(self.sup.workers), "ready": ready}
        return web.json_response(body, status=200 if ready else 503)

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.sup.state_json())


class _AliveCollector(Collector):
    def __init__(self, sup: Group) -> None:
        self._sup = sup

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "router_workers", "Worker processes of --workers N", value=len(self._sup.workers)
        )
        yield GaugeMetricFamily(
            "router_workers_ready",
            "Worker processes running and ready (READY line seen since their last start)",
            value=sum(1 for w in self._sup.workers if w.alive and w.ready is not None),
        )
