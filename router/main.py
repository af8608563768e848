"""The router process: a :class:`~router.server.RouterServer` inside its high-availability node.

``python -m router`` runs :func:`main`; :func:`serve` is the embeddable coroutine (tests run it in a loop
of their own). Composition lives here so that the HTTP shell (:mod:`router.server`) and the HA node
(:mod:`router.ha`) do not import each other both ways.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import zmq

from kvindex.protocol.ready import announce_ready
from kvindex.protocol.tokenizer import TokenizerError
from router.config import RouterConfig, parse_args
from router.ha import HANode
from router.server import RouterServer

__all__ = ["main", "serve"]

log = logging.getLogger("router")


async def serve(
    cfg: RouterConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[RouterServer], None] | None = None,
) -> None:
    """Run a router until SIGINT/SIGTERM or ``stop`` is set, then shut down cleanly.

    Once the HTTP port is bound (a standby: once it follows its primary) and every agent's instance is
    routable (or ``cfg.warmup_timeout`` passed), calls ``on_ready(server)``, or by default prints the
    launcher's READY line (role ``router-primary`` or ``router-standby``, endpoints ``http``,
    ``decisions`` and ``admin`` when on). Roles and takeover: :mod:`router.ha`. Signal handlers are
    installed only where the loop allows it (the main thread). Raises what :class:`RouterServer` and
    its ``start`` raise.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    server = RouterServer(cfg)
    node = HANode(server)
    try:
        await node.start()
        if cfg.warmup_timeout > 0 and not await server.warm_up(cfg.warmup_timeout):
            log.warning(
                "only %d of %d agents' instances routable after %g s; serving anyway",
                server.core.routable_count(),
                len(set(cfg.agents)),
                cfg.warmup_timeout,
            )
        if not await node.wait_for_primary(max(cfg.warmup_timeout, 1.0)):
            log.warning("no heartbeat from the primary at %s yet; standing by anyway", cfg.primary_decisions)
        if on_ready is not None:
            on_ready(server)
        else:
            announce_ready(f"router-{cfg.role}", node.endpoints())
        await stop.wait()
        log.info("router shutting down")
    finally:
        await node.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m router``: parse flags, run until SIGINT/SIGTERM. Returns the exit status."""
    cfg = parse_args(argv)
    logging.basicConfig(
        level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        import uvloop

        runner: Callable[..., None] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        runner = asyncio.run
    try:
        runner(serve(cfg))
    except TokenizerError as exc:
        log.error("cannot load the tokenizer: %s", exc)
        return 2
    except (OSError, zmq.ZMQError) as exc:
        log.error("cannot start the router: %s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    return 0
