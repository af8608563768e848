"""A closed-loop HTTP load generator (aiohttp) for ``launch overhead-bench``.

``concurrency`` workers each send one request, read the whole answer (every SSE chunk when streamed),
and send the next at once. A cell runs ``warmup`` seconds unmeasured, then ``seconds`` measured; a request
counts in the window if it *ended* inside it. At the window's edges :func:`run_cell` calls ``on_edge``
(the caller samples the processes' CPU time there), then stops the workers after their current request
(bounded by ``drain`` seconds), so no request is cut off mid-way and the system under test logs no
client disconnects.

Bodies are built from bytes, not ``json.dumps``, so the generator's own CPU per request stays small
beside the system's: a shared prefix (the same bytes for every request) and a unique random suffix.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

__all__ = ["CellResult", "PromptMaker", "run_cell"]

_WORDS = (
    b"the router keeps an approximate index of which engine holds which prefix and scores every "
    b"instance by its queued prefill tokens times its batch size before it forwards the request "
)


class PromptMaker:
    """``/generate`` bodies with ``chars``-character prompts: ``shared`` of them the same for every body,
    the rest unique (hex digits). ``stream`` and ``max_new_tokens`` are fixed per maker."""

    def __init__(self, chars: int, stream: bool, max_new_tokens: int = 16, shared: float = 0.9) -> None:
        n_shared = int(chars * shared)
        self.suffix = max(1, chars - n_shared)
        prefix = (_WORDS * (n_shared // len(_WORDS) + 1))[:n_shared]
        tail = json.dumps(
            {"sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True}, "stream": stream}
        ).encode()
        self._head = b'{"text": "' + prefix
        self._tail = b'", ' + tail[1:]

    def body(self) -> bytes:
        """One request body (a fresh random suffix). About 1 us plus the copy of ``chars`` bytes."""
        return self._head + os.urandom((self.suffix + 1) // 2).hex()[: self.suffix].encode() + self._tail


@dataclass
class CellResult:
    """What one cell measured. Latencies in seconds; ``errors`` maps an HTTP status or exception name to
    a count (requests that ended in the window)."""

    requests: int = 0
    window_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(q * len(s)))]


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> str:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if stream:
            async for _chunk in r.content.iter_any():
                pass
        else:
            await r.read()
        return "200" if r.status == 200 else str(r.status)


async def run_cell(
    urls: Sequence[str],
    maker: PromptMaker,
    stream: bool,
    concurrency: int,
    seconds: float,
    warmup: float,
    on_edge: Callable[[], None] = lambda: None,
    drain: float = 30.0,
    timeout: float = 60.0,
) -> CellResult:
    """Run one closed-loop cell against ``urls`` (worker ``k`` uses ``urls[k % len(urls)]``; several
    URLs spread the load over engines for the direct-to-engine rows). ``on_edge`` is called at the start
    and the end of the measured window. Returns the window's :class:`CellResult`."""
    res = CellResult()
    state = {"t0": float("inf"), "t1": float("inf"), "stop": False}
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:

        async def worker(k: int) -> None:
            url = urls[k % len(urls)]
            while not state["stop"]:
                body = maker.body()
                start = time.perf_counter()
                try:
                    label = await _one(s, url, body, stream)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    label = type(exc).__name__
                end = time.perf_counter()
                if state["t0"] <= end <= state["t1"]:
                    res.requests += 1
                    if label == "200":
                        res.latencies.append(end - start)
                    else:
                        res.errors[label] = res.errors.get(label, 0) + 1

        tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        try:
            await asyncio.sleep(warmup)
            on_edge()
            state["t0"] = time.perf_counter()
            await asyncio.sleep(seconds)
            on_edge()
            state["t1"] = time.perf_counter()
            state["stop"] = True
            await asyncio.wait(tasks, timeout=drain)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    res.window_s = state["t1"] - state["t0"]
    return res
