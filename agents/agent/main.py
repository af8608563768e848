"""The agent process's entry points: :func:`serve` (embeddable) and :func:`main` (``python -m agents.agent``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import zmq

from agents.agent.config import AgentConfig, parse_args
from agents.agent.engine_link import EngineDiscoveryError, EngineUnavailableError
from agents.agent.process import Agent
from kvindex.process import Stop, run_process, stop_signals
from kvindex.protocol.ready import announce_ready

__all__ = ["main", "serve"]


async def serve(
    cfg: AgentConfig,
    on_ready: Callable[[Agent], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run an agent until cancelled or sent SIGINT/SIGTERM; then close everything and return normally.

    Prints the READY line (role ``agent``, endpoints ``pub``/``snapshot``/``engine``) once serving, then
    calls ``on_ready(agent)`` if given (tests use it to reach the endpoints and counters).

    Raises:
        EngineUnavailableError, EngineDiscoveryError, zmq.ZMQError: see :meth:`Agent.start`.
    """
    async with stop_signals(install=handle_signals) as stop:
        await _run(cfg, stop, on_ready)


async def _run(cfg: AgentConfig, stop: Stop, on_ready: Callable[[Agent], None] | None) -> None:
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()

    async def run() -> None:
        await agent.start()
        announce_ready("agent", agent.endpoints(), instance=agent.instance)
        if on_ready is not None:
            on_ready(agent)
        await agent.wait()

    # Startup runs in the same task as the main loop, so a signal also interrupts the wait for the engine.
    runner = loop.create_task(run(), name="agent-serve")
    stopper = loop.create_task(stop.wait(), name="agent-stop")
    try:
        try:
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            runner.cancel()
            await asyncio.gather(runner, stopper, return_exceptions=True)
            await agent.close()
    except asyncio.CancelledError:
        return  # asked to stop: everything is closed
    failure = None if runner.cancelled() else runner.exception()
    if failure is not None:
        raise failure


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.agent``: parse flags, serve until a signal. Returns the exit status (1: the
    engine never came up or could not be discovered, or a port could not be bound)."""
    cfg = parse_args(argv)
    return run_process(
        lambda: serve(cfg),
        what="the agent",
        log_level=cfg.log_level,
        fatal=(EngineUnavailableError, EngineDiscoveryError, OSError, zmq.ZMQError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
