"""The router process: a :class:`~router.server.RouterServer` inside its high-availability node.

``python -m router`` runs :func:`main`; :func:`serve` is the embeddable coroutine (tests run it in a loop
of their own). Composition lives here so that the HTTP shell (:mod:`router.server`) and the HA node
(:mod:`router.ha`) do not import each other both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import zmq

from kvindex.curve import CurveError
from kvindex.protocol.ready import announce_ready
from kvindex.protocol.tokenizer import TokenizerError
from kvindex.transport import Stop, run_process, stop_signals
from router.active import ActiveCollector, ActivePeers
from router.auth import AuthConfigError
from router.cli import parse_args
from router.config import RouterConfig
from router.etcd_lease import LeaseError
from router.ha import HANode
from router.model.slots import DecisionSlots
from router.server import RouterServer
from router.worker_link import watch_parent

__all__ = ["main", "serve"]

log = logging.getLogger("router")

SIBLINGS_TIMEOUT = 15.0
"""Seconds (at least) a worker of ``--workers N`` waits for its siblings' heartbeats before READY."""


async def serve(
    cfg: RouterConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[RouterServer], None] | None = None,
) -> None:
    """Run a router until SIGINT/SIGTERM or ``stop`` is set, then shut down cleanly.

    Once the HTTP port is bound (a standby: once it follows its primary) and every agent's instance is
    routable (or ``cfg.warmup_timeout`` passed), calls ``on_ready(server)``, or by default prints the
    launcher's READY line (role ``router-primary``, ``router-standby`` or ``router-active``, endpoints ``http``,
    ``decisions`` and ``admin`` when on). Roles and takeover: :mod:`router.ha`. Signal handlers are
    installed only where the loop allows it (the main thread). Raises what :class:`RouterServer` and
    its ``start`` raise.
    """
    async with stop_signals(Stop(stop) if stop is not None else None) as stopped:
        await _run(cfg, stopped, on_ready)


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _reload_keys(server: RouterServer) -> None:
    try:
        server.access.reload()
    except AuthConfigError as exc:
        log.error("SIGHUP: keys not reloaded, the old ones stay: %s", exc)


async def _run(cfg: RouterConfig, stop: Stop, on_ready: Callable[[RouterServer], None] | None) -> None:
    server = RouterServer(cfg)
    node = HANode(server)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, _reload_keys, server)
    peers: ActivePeers | None = None
    orphaned = watch_parent(cfg.worker_of, stop) if cfg.worker_of is not None else None
    try:
        await node.start()
        if cfg.role == "active":
            peers = _follow_peers(server, node)
        if cfg.warmup_timeout > 0 and not await server.warm_up(cfg.warmup_timeout):
            log.warning(
                "only %d of %d agents' instances routable after %g s; serving anyway",
                server.core.routable_count(),
                len(set(cfg.agents)),
                cfg.warmup_timeout,
            )
        if peers is not None and cfg.worker_index is not None:
            siblings = cfg.peer_routers[len(cfg.peer_routers) - (cfg.workers - 1) :]  # the supervisor's, last
            await _hear_siblings(peers, siblings, max(cfg.warmup_timeout, SIBLINGS_TIMEOUT))
        if not await node.wait_for_primary(max(cfg.warmup_timeout, 1.0)):
            log.warning("no heartbeat from the primary at %s yet; standing by anyway", cfg.primary_decisions)
        if on_ready is not None:
            on_ready(server)
        else:
            announce_ready(f"router-{cfg.role}", node.endpoints())
        waits = [stop.wait()] + ([node.fenced.wait()] if cfg.exit_when_fenced else [])
        await _first(*waits)
        log.info("router shutting down%s", " (fenced)" if node.fenced.is_set() else "")
    finally:
        if orphaned is not None:
            orphaned.cancel()
        if peers is not None:
            await peers.close()
        await node.stop()


async def _hear_siblings(peers: ActivePeers, siblings: Sequence[str], timeout: float) -> None:
    """A worker of ``--workers N``: wait until a heartbeat came on each sibling's decision stream, so
    that no decision of theirs made after the group's READY is lost to a subscription not yet made."""
    deadline = time.monotonic() + timeout

    def heard() -> int:
        return sum(1 for ep in siblings if ep in peers.mirrors and peers.mirrors[ep].primary is not None)

    while heard() < len(siblings):
        if time.monotonic() >= deadline:
            log.warning(
                "heard %d of %d sibling workers after %g s; serving anyway", heard(), len(siblings), timeout
            )
            return
        await asyncio.sleep(0.02)


def _follow_peers(server: RouterServer, node: HANode) -> ActivePeers:
    """An active router: follow the other active routers' decision streams into the core, with their
    metrics and an ``active`` part in ``GET /router/state``'s ``ha`` section (:mod:`router.active`)."""
    peers = ActivePeers(server.core, server.cfg.peer_routers, ctx=server.subscriber.ctx, own_epoch=node.epoch)
    peers.start()
    cfg = server.cfg
    slots = None
    if cfg.decision_slot > 0:
        slots = DecisionSlots(cfg.slot_index, 1 + len(cfg.peer_routers), cfg.decision_slot)
        server.dispatcher.slots = slots
    server.metrics.registry.register(ActiveCollector(peers))
    ha_state = node.state_json
    slot_state = None if slots is None else {"index": slots.index, "count": slots.count, "slot": slots.slot}
    server.extra_state = lambda: {
        **ha_state(),
        "active": {**peers.state_json(), "decision_slots": slot_state},
    }
    return peers


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m router``: parse flags, run until SIGINT/SIGTERM. Returns the exit status (1: the
    router could not start: a port in use, a tokenizer that does not load, an etcd leader key held by another;
    with ``--workers N``, also: a worker that never became ready)."""
    cfg = parse_args(argv)
    if cfg.workers > 1 and cfg.worker_index is None:
        from router.workers import supervise  # only a supervisor needs it

        args = list(sys.argv[1:] if argv is None else argv)
        return run_process(
            lambda: supervise(cfg, args),
            what="the router workers",
            log_level=cfg.log_level,
            fatal=(OSError, AuthConfigError),
        )
    return run_process(
        lambda: serve(cfg),
        what="the router",
        log_level=cfg.log_level,
        fatal=(OSError, zmq.ZMQError, TokenizerError, AuthConfigError, CurveError, LeaseError),
    )
