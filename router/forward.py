"""Forwarding one request to an engine and passing its answer through, streamed or not.

The router sends the client's JSON body unchanged to ``engine_url + path``. Outcomes:

* the connection fails before any response byte: :class:`ConnectFailed` (the caller may retry elsewhere);
* no answer within the request timeout: 504; the body breaks off mid-way (not streamed): 502;
* a streamed request answered 200 (and not as JSON): a ``text/event-stream`` response, every upstream chunk written to the
  client as it arrives (nothing buffered); if the engine fails mid-stream, a final
  ``data: {"error": {...}}`` event is written and the stream ends;
* anything else (non-streamed, or an engine 4xx/5xx): the same status, body and content type.

If the client goes away (aiohttp cancels the handler, or a write fails) the upstream response is closed,
not returned to the pool, so the engine sees the disconnect and can abort the request. A client that
goes away *after* the stream's last event (``data: [DONE]``) was written got its whole answer: that is a
success (label ``"200"``, latencies observed), whether the router's final chunk or its wait for the
engine's end of stream is what notices the disconnect.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from kvindex.protocol.http import error_body

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_FORWARDED_HEADERS = ("Authorization", "X-Request-Id")


class ConnectFailed(Exception):
    """Connecting to the engine failed before any response byte (refused, reset, closed, unreachable)."""


@dataclass
class Outcome:
    """What happened to one forwarded request.

    ``label``: the status for ``router_requests_total`` (``"200"``, ``"502"``, ``"stream_error"``,
    ``"client_closed"``...). ``ttft``/``tpot``/``e2e`` in seconds, None when not measured.
    """

    response: web.StreamResponse
    label: str
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None


class SseEventCounter:
    """Counts SSE ``data:`` events (``[DONE]`` excluded) in a byte stream cut at arbitrary points.

    ``done`` turns True once a complete ``data: [DONE]`` line was fed. Keeps only the first bytes of the
    current line, so memory stays bounded whatever the line length.
    """

    _KEEP = 16

    def __init__(self) -> None:
        self.events = 0
        self.done = False
        self.last_event_at: float | None = None
        self._head = b""

    def feed(self, chunk: bytes, now: float) -> None:
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            if len(self._head) < self._KEEP:
                self._head += part[: self._KEEP - len(self._head)]
            if i < len(parts) - 1:  # the line ended
                head = self._head.rstrip(b"\r")
                if head.startswith(b"data:"):
                    if head[5:].strip() == b"[DONE]":
                        self.done = True
                    else:
                        self.events += 1
                        self.last_event_at = now
                self._head = b""


def _error_event(message: str) -> bytes:
    body = error_body(502, message, type_="server_error")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response(error_body(status, message), status=status)


def _uncancel() -> None:
    """Withdraw the current task's pending cancellation (Python 3.11+; a no-op before) once handled."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


async def forward(
    session: aiohttp.ClientSession,
    request: web.Request,
    url: str,
    raw_body: bytes,
    stream: bool,
    arrived: float,
    headers: Mapping[str, str] | None = None,
) -> Outcome:
    """POST ``raw_body`` to ``url`` and answer ``request`` with the engine's response (module doc).

    ``arrived`` is the request's arrival time (``time.monotonic()``), for the latencies.

    Raises:
        ConnectFailed: the engine could not be reached (nothing was sent to the client).
        asyncio.CancelledError: the client went away (the upstream response is closed first).
    """
    out_headers = {"Content-Type": "application/json"}
    for h in _FORWARDED_HEADERS:
        if h in request.headers:
            out_headers[h] = request.headers[h]
    if headers:
        out_headers.update(headers)
    try:
        upstream = await session.post(url, data=raw_body, headers=out_headers)
    except aiohttp.ClientConnectionError as exc:
        raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
    except asyncio.TimeoutError:
        return Outcome(_json_error(504, f"engine at {url} did not answer in time"), "504")
    clean = False
    try:
        ctype = upstream.headers.get("Content-Type", "")
        if stream and upstream.status == 200 and not ctype.startswith("application/json"):
            out = await _pass_stream(upstream, request, arrived)
        else:
            out = await _pass_whole(upstream, url, arrived)
        clean = out.label not in ("client_closed", "stream_error", "502")
        return out
    finally:
        if clean:
            upstream.release()
        else:
            upstream.close()


async def _pass_whole(upstream: aiohttp.ClientResponse, url: str, arrived: float) -> Outcome:
    try:
        data = await upstream.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Outcome(_json_error(502, f"engine at {url} failed mid-response: {exc}"), "502")
    ctype = upstream.headers.get("Content-Type", "application/json")
    resp = web.Response(status=upstream.status, body=data, headers={"Content-Type": ctype})
    return Outcome(resp, str(upstream.status), e2e=time.monotonic() - arrived)


async def _pass_stream(upstream: aiohttp.ClientResponse, request: web.Request, arrived: float) -> Outcome:
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    try:
        await resp.prepare(request)
    except ConnectionResetError:
        return Outcome(resp, "client_closed")
    counter = SseEventCounter()
    first_at: float | None = None
    first_event_at: float | None = None
    label = "200"
    delivered = False  # the client was sent the final ``data: [DONE]`` event
    try:
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if delivered:  # the engine broke off after its last event: nothing was lost
                    break
                label = "stream_error"
                try:
                    await resp.write(_error_event(f"engine failed mid-stream: {type(exc).__name__}: {exc}"))
                except ConnectionResetError:
                    label = "client_closed"
                break
            if not chunk:
                break
            now = time.monotonic()
            if first_at is None:
                first_at = now
            before = counter.events
            counter.feed(chunk, now)
            if before == 0 and counter.events > 0:
                first_event_at = now
            try:
                await resp.write(chunk)
            except ConnectionResetError:  # aiohttp's ClientConnectionResetError: the client went away
                label = "client_closed"
                break
            delivered = counter.done
        if label != "client_closed":
            try:
                await resp.write_eof()
            except ConnectionResetError:
                # Every byte of the answer was written; only the chunked-encoding terminator was not.
                if label != "200":
                    label = "client_closed"
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client disconnects. After the last event was written the
        # answer is complete, so this is a success, not a cancelled request.
        if not delivered:
            raise
        _uncancel()
    end = time.monotonic()
    tpot = None
    if counter.events >= 2 and first_event_at is not None and counter.last_event_at is not None:
        tpot = (counter.last_event_at - first_event_at) / (counter.events - 1)
    return Outcome(
        resp,
        label,
        ttft=None if first_at is None else first_at - arrived,
        tpot=tpot,
        e2e=end - arrived if label == "200" else None,
    )
