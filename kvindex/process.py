"""The start-up and shutdown every process shares: :func:`run_process` (logging, uvloop, start-up errors,
exit status) and :func:`stop_signals` (SIGINT/SIGTERM set a :class:`Stop`, remembering which). The READY
line is :func:`kvindex.protocol.ready.announce_ready`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import zmq

__all__ = ["Stop", "run_process", "stop_signals"]


@dataclass
class Stop:
    """Set when the process is asked to stop; ``by`` says by which signal (None: by code)."""

    event: asyncio.Event
    by: signal.Signals | None = None

    def set(self, sig: signal.Signals | None = None) -> None:
        """Ask to stop (the first signal is remembered)."""
        if self.by is None:
            self.by = sig
        self.event.set()

    async def wait(self) -> None:
        """Until asked to stop."""
        await self.event.wait()


@contextlib.asynccontextmanager
async def stop_signals(stop: Stop | None = None, *, install: bool = True) -> AsyncIterator[Stop]:
    """SIGINT and SIGTERM set the yielded :class:`Stop` while inside. Handlers are installed only where
    the loop allows (the main thread) and when ``install``; they are removed on exit."""
    stop = stop if stop is not None else Stop(asyncio.Event())
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if install and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_process(
    main: Callable[[], Coroutine[Any, Any, Any]],
    *,
    what: str,
    log_level: str = "INFO",
    fatal: tuple[type[BaseException], ...] = (OSError, zmq.ZMQError),
) -> int:
    """Run one process's ``main()`` coroutine under uvloop (asyncio's loop where uvloop is missing).

    Configures logging at ``log_level``. An exception of a ``fatal`` type (a port that cannot be bound,
    an engine that never came up) is logged as ``cannot start WHAT: ...`` and gives exit status 1; a
    second Ctrl-C during shutdown gives 0. Returns the exit status.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, Any]], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        runner = asyncio.run
    try:
        runner(main())
    except fatal as exc:
        logging.getLogger(what).error("cannot start %s: %s", what, exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
