"""A router without agents (``python -m router --worker-urls URL ...``, sglang-router's command line).

Each worker URL becomes a static instance of the routing model (:meth:`RoutingModel.add_static`), named
by its URL. Its page size, served model and KV capacity are read from the engine's ``GET /server_info``
(``page_size``, ``served_model_name``, ``max_total_num_tokens``; ``/get_model_info`` for the model if
that fails), retried until ``worker_startup_timeout``; a worker that never answers is declared with the
others' values and starts suspect. The index of a static instance is what the router routed there, in a
bounded LRU (:class:`router.model.routed.RoutedBlocks`) whose capacity is ``--routed-cache-tokens`` or
the engine's reported KV capacity.

Block size: the index needs no agreement with the engine's pages here (no engine event is ever matched
against it), so it is ``--block-size`` if given, else the first worker's page size, but at least
:data:`MIN_BLOCK_SIZE` tokens (SGLang's default page size is 1: a block per token would cost a hash and
an index entry per token for nothing).

Health: a worker whose connection failed is suspect (not routed to); no heartbeat ever clears that for a
static instance, so :class:`WorkerProber` polls each suspect worker's ``/health`` every
``suspect_cooldown`` seconds (at least 0.2) and clears it on a 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from router.model.model import RoutingModel

__all__ = ["MIN_BLOCK_SIZE", "WorkerInfo", "WorkerProber", "declare_workers", "discover_worker"]

log = logging.getLogger(__name__)

MIN_BLOCK_SIZE = 16
DEFAULT_CAPACITY_TOKENS = 1 << 20
"""KV capacity assumed for a worker that does not report one (tokens)."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker said about itself (``None``: it did not say, or never answered)."""

    url: str
    page_size: int | None = None
    model: str = ""
    max_total_tokens: int | None = None
    answered: bool = False


def _pos_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status == 200:
                body = await r.json(content_type=None)
                return body if isinstance(body, dict) else None
    return None


async def discover_worker(session: aiohttp.ClientSession, url: str, timeout: float) -> WorkerInfo:
    """Ask ``url`` for ``/server_info`` (then ``/get_model_info``) until it answers or ``timeout``
    seconds pass. Never raises: a silent worker gives ``WorkerInfo(url)``."""
    deadline = time.monotonic() + timeout
    while True:
        info = await _get_json(session, url + "/server_info")
        if info is not None:
            model = info.get("served_model_name") or info.get("model_path") or ""
            return WorkerInfo(
                url,
                _pos_int(info.get("page_size")),
                model if isinstance(model, str) else "",
                _pos_int(info.get("max_total_num_tokens")),
                True,
            )
        mi = await _get_json(session, url + "/get_model_info")
        if mi is not None:
            model = mi.get("model_path") or ""
            return WorkerInfo(url, model=model if isinstance(model, str) else "", answered=True)
        if time.monotonic() >= deadline:
            return WorkerInfo(url)
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


async def declare_workers(
    core: RoutingModel,
    session: aiohttp.ClientSession,
    urls: tuple[str, ...],
    *,
    block_size: int | None,
    capacity_tokens: int | None,
    startup_timeout: float,
) -> list[WorkerInfo]:
    """Discover every worker (concurrently) and declare it a static instance of ``core`` with a routed
    LRU (module docstring). Mutates ``core``; returns what each worker said."""
    clean = tuple(dict.fromkeys(u.rstrip("/") for u in urls))
    infos = await asyncio.gather(*(discover_worker(session, u, startup_timeout) for u in clean))
    bs = block_size or next((i.page_size for i in infos if i.page_size), None) or MIN_BLOCK_SIZE
    if block_size is None and bs < MIN_BLOCK_SIZE:
        bs = MIN_BLOCK_SIZE
    for info in infos:
        cap_tokens = capacity_tokens or info.max_total_tokens or DEFAULT_CAPACITY_TOKENS
        core.add_static(
            info.url, bs, info.url, model=info.model, routed_capacity_blocks=max(1, cap_tokens // bs)
        )
        if not info.answered:
            log.warning(
                "worker %s did not answer in %g s: declared, not routed to until healthy",
                info.url,
                startup_timeout,
            )
            core.mark_suspect(info.url)
        else:
            log.info(
                "worker %s: model %r, page size %s, KV capacity %s tokens (index: %d-token blocks, LRU of %d)",
                info.url, info.model, info.page_size, info.max_total_tokens, bs, cap_tokens // bs,
            )  # fmt: skip
    return list(infos)


class WorkerProber:
    """Polls the ``/health`` of suspect static instances and clears them on a 200 (module docstring)."""

    def __init__(self, core: RoutingModel, session: aiohttp.ClientSession, period: float) -> None:
        self.core = core
        self.session = session
        self.period = max(0.2, period)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="worker-prober")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            for name in self.core.suspect_static():
                st = self.core.table.get(name)
                url = st.engine_url if st is not None else ""
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                        if r.status == 200:
                            self.core.clear_suspect(name)
                            log.info("worker %s healthy again", name)
