"""A worker of ``python -m router --workers N`` (:mod:`router.workers`) and its supervisor: the worker
stops when the supervisor is gone, however it went (``kill -9`` included), so that no worker keeps
serving the port unsupervised.

Two mechanisms, the first enough on Linux: ``PR_SET_PDEATHSIG`` (the kernel sends the worker SIGTERM
when its parent dies, which the worker's own SIGTERM handler turns into a clean stop), and a poll of the
parent pid every :data:`POLL` seconds (other systems, and the window before the prctl took effect)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from typing import Final

from kvindex.process import Stop

__all__ = ["POLL", "watch_parent"]

log = logging.getLogger(__name__)

POLL: Final = 0.5
"""Seconds between two checks of the parent pid."""

_PR_SET_PDEATHSIG: Final = 1


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent exits (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning(
                "prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the supervisor only", ctypes.get_errno()
            )


def watch_parent(parent: int, stop: Stop) -> asyncio.Task[None]:
    """Stop (``stop.set()``) once ``parent`` is no longer this process's parent. Returns the polling
    task (cancel it on shutdown). Call in a running loop."""
    _die_with_parent()

    async def poll() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(POLL)
        log.error("the supervisor (pid %d) is gone; this worker stops", parent)
        stop.set()

    return asyncio.get_running_loop().create_task(poll(), name="watch-supervisor")
