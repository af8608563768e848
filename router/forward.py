"""Forwarding one attempt of a request to an engine and passing its answer through, streamed or not.

The router sends the client's JSON body (with the router's ``rid`` added if it had none) to
``engine_url + path``. Every wait is bounded (:class:`Timeouts`): the TCP connect, the response headers
of a streamed request, each gap between stream chunks (the first included) and the whole request.

An attempt either answers the client (an :class:`Outcome`) or fails *before any byte reached the
client* (:class:`AttemptFailed`), which the caller may retry on another instance:

* the connection fails or times out; a streamed request's headers do not come in time;
* the engine answers 429 or 5xx (the engine's own response is kept as the fallback answer);
* a non-streamed body, or a stream before its first chunk, breaks off or goes idle;
* the instance was declared down meanwhile (:attr:`Attempt.killed`, set by the router's tick).

Every answer from an engine, and every error about one, carries ``X-Router-Instance: <instance>``.
The client's response is prepared only when the stream's first chunk has arrived, so that everything
before it can be retried. After it, chunks are written as they arrive (nothing buffered: ``write``
waits for the client, so a slow client slows the engine's reading, never the router's memory); a
failure then ends the stream with a final ``data: {"error": {...}}`` event (label ``stream_error``).

If the client goes away (aiohttp cancels the handler, or a write fails) the upstream response is closed
and ``asyncio.CancelledError`` propagates (the caller then aborts the request on the engine). A client
that goes away *after* the stream's last event (``data: [DONE]``) got its whole answer: a success.
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
INSTANCE_HEADER = "X-Router-Instance"
"""Response header naming the instance that answered (or whose failure is being reported)."""
ERROR_BODY_LIMIT = 65536
"""Bytes of an engine's error body kept (the rest is dropped)."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``headers`` applies to streamed requests only; ``idle`` between stream chunks."""

    connect: float = 3.0
    headers: float = 30.0
    idle: float = 120.0
    total: float = 3600.0


class AttemptFailed(Exception):
    """The attempt failed before any byte reached the client.

    ``kind``: ``connect``, ``timeout_connect``, ``timeout_headers``, ``timeout_idle``, ``timeout_total``,
    ``status_429``, ``status_5xx``, ``broken`` or ``instance_down``. ``fallback``: the answer to give if
    no retry follows. ``retriable``: False when the whole request's time is spent. ``accepted``: the
    engine may hold the request (so the caller should abort it there).
    """

    def __init__(
        self, kind: str, fallback: Outcome, *, retriable: bool = True, accepted: bool = True
    ) -> None:
        super().__init__(kind)
        self.kind = kind
        self.fallback = fallback
        self.retriable = retriable
        self.accepted = accepted


@dataclass
class Outcome:
    """What happened to one forwarded request.

    ``label``: the status for ``router_requests_total`` (``"200"``, ``"502"``, ``"stream_error"``,
    ``"client_closed"``...). ``ttft``/``tpot``/``e2e`` in seconds, None when not measured. ``failure``:
    for a stream that broke after its first byte, the kind of failure (as :class:`AttemptFailed`).
    """

    response: web.StreamResponse
    label: str
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    failure: str | None = None


@dataclass(eq=False)
class Attempt:
    """One attempt in flight on ``instance``, as the router's tick sees it: setting ``killed`` and
    cancelling ``task`` ends it (the instance went down)."""

    instance: str
    task: asyncio.Task[object] | None
    killed: str | None = None


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


def with_rid(raw: bytes, rid: str) -> bytes:
    """``raw`` (a JSON object's bytes, without a ``rid`` field) with ``"rid": rid`` as its first field.

    Splices bytes instead of re-encoding the body (a long prompt's body is megabytes)."""
    i = raw.index(b"{") + 1
    field = b'"rid":' + json.dumps(rid).encode()
    empty = raw[i:].lstrip().startswith(b"}")
    return raw[:i] + field + (b"" if empty else b",") + raw[i:]


class RequestBody:
    """A request body's bytes, shared by its attempts and dropped once a stream has started.

    A stream's first chunk commits the request to its instance (nothing after it is retried), so from
    then on the body (a long prompt's token ids are hundreds of KB of JSON) is dead weight held for the
    whole decode: :func:`forward` sets :attr:`data` to None at that point, and the caller keeps no other
    reference. Under overload that is most of the requests in flight.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data


def _fail(kind: str, status: int, message: str, **kw: bool) -> AttemptFailed:
    label = "504" if status == 504 else "502"
    return AttemptFailed(kind, Outcome(_json_error(status, message), label), **kw)


async def forward(
    session: aiohttp.ClientSession,
    request: web.Request,
    url: str,
    body: RequestBody,
    stream: bool,
    arrived: float,
    timeouts: Timeouts,
    attempt: Attempt,
    headers: Mapping[str, str] | None = None,
) -> Outcome:
    """POST ``body`` to ``url`` and answer ``request`` with the engine's response (module doc); a stream
    that reached the client drops ``body.data`` (:class:`RequestBody`).

    ``arrived`` is the request's arrival time (``time.monotonic()``), for the latencies and the total
    timeout.

    Raises:
        AttemptFailed: nothing was sent to the client (the caller may retry elsewhere).
        asyncio.CancelledError: the client went away (the upstream response is closed first).
    """
    out_headers = {"Content-Type": "application/json"}
    for h in _FORWARDED_HEADERS:
        if h in request.headers:
            out_headers[h] = request.headers[h]
    if headers:
        out_headers.update(headers)
    left = arrived + timeouts.total - time.monotonic()
    if left <= 0:
        raise _fail("timeout_total", 504, "request timed out", retriable=False, accepted=False)
    # sock_read bounds every gap between reads of a stream (the headers included, but the explicit
    # headers wait below is shorter); a non-streamed answer comes whole at the end: only the total.
    per_request = aiohttp.ClientTimeout(
        total=left, sock_connect=timeouts.connect, sock_read=timeouts.idle if stream else None
    )
    assert body.data is not None, "a request whose stream started is never forwarded again"
    try:
        post = session.post(url, data=body.data, headers=out_headers, timeout=per_request)
        if stream and timeouts.headers < left:
            upstream = await asyncio.wait_for(post, timeouts.headers)
        else:
            upstream = await post
    except aiohttp.ConnectionTimeoutError as exc:
        raise _fail("timeout_connect", 502, f"engine at {url} unreachable: {exc!r}", accepted=False) from exc
    except asyncio.TimeoutError as exc:  # before ClientConnectionError: aiohttp's read timeouts are both
        total = time.monotonic() >= arrived + timeouts.total - 0.001
        kind = "timeout_total" if total else "timeout_headers"
        raise _fail(kind, 504, f"engine at {url} did not answer in time", retriable=not total) from exc
    except aiohttp.ClientConnectionError as exc:
        accepted = not isinstance(exc, aiohttp.ClientConnectorError)
        msg = f"engine at {url} unreachable: {type(exc).__name__}: {exc}"
        raise _fail("connect", 502, msg, accepted=accepted) from exc
    except asyncio.CancelledError:
        if attempt.killed is None:
            raise
        _uncancel()
        raise _fail("instance_down", 502, f"instance {attempt.instance} went down") from None
    clean = False
    try:
        if upstream.status == 429 or upstream.status >= 500:
            out = await _pass_whole(upstream, url, arrived, attempt)
            kind = "status_429" if upstream.status == 429 else "status_5xx"
            raise AttemptFailed(kind, out)
        ctype = upstream.headers.get("Content-Type", "")
        if stream and upstream.status == 200 and not ctype.startswith("application/json"):
            out = await _pass_stream(upstream, request, arrived, attempt, timeouts, body)
        else:
            out = await _pass_whole(upstream, url, arrived, attempt)
        clean = out.label not in ("client_closed", "stream_error", "502", "504")
        return out
    finally:
        if clean:
            upstream.release()
        else:
            upstream.close()


async def _pass_whole(
    upstream: aiohttp.ClientResponse, url: str, arrived: float, attempt: Attempt
) -> Outcome:
    try:
        if upstream.status == 429 or upstream.status >= 500:
            data = await upstream.content.read(ERROR_BODY_LIMIT)
        else:
            data = await upstream.read()
    except asyncio.TimeoutError as exc:
        raise _fail("timeout_total", 504, f"engine at {url} did not answer in time", retriable=False) from exc
    except aiohttp.ClientError as exc:
        raise _fail("broken", 502, f"engine at {url} failed mid-response: {exc!r}") from exc
    except asyncio.CancelledError:
        if attempt.killed is None:
            raise
        _uncancel()
        raise _fail("instance_down", 502, f"instance {attempt.instance} went down") from None
    ctype = upstream.headers.get("Content-Type", "application/json")
    resp = web.Response(
        status=upstream.status, body=data, headers={"Content-Type": ctype, INSTANCE_HEADER: attempt.instance}
    )
    if upstream.status == 429 and "Retry-After" in upstream.headers:
        resp.headers["Retry-After"] = upstream.headers["Retry-After"]
    return Outcome(resp, str(upstream.status), e2e=time.monotonic() - arrived)


def _read_failure(exc: BaseException, arrived: float, timeouts: Timeouts) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout_total" if time.monotonic() >= arrived + timeouts.total - 0.001 else "timeout_idle"
    return "broken"


async def _pass_stream(
    upstream: aiohttp.ClientResponse,
    request: web.Request,
    arrived: float,
    attempt: Attempt,
    timeouts: Timeouts,
    body: RequestBody,
) -> Outcome:
    # The first chunk before anything goes to the client: until then the attempt can be retried.
    try:
        first = await upstream.content.readany()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        kind = _read_failure(exc, arrived, timeouts)
        status = 504 if kind.startswith("timeout") else 502
        raise _fail(
            kind, status, f"engine failed before its first chunk: {exc!r}", retriable=kind != "timeout_total"
        ) from exc
    except asyncio.CancelledError:
        if attempt.killed is None:
            raise
        _uncancel()
        raise _fail("instance_down", 502, f"instance {attempt.instance} went down") from None
    if not first:
        raise _fail("broken", 502, "engine ended the stream before its first chunk")
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, INSTANCE_HEADER: attempt.instance})
    body.data = None  # committed to this instance: no retry will need the body
    try:
        await resp.prepare(request)
    except ConnectionResetError:
        return Outcome(resp, "client_closed")
    counter = SseEventCounter()
    first_at = time.monotonic()
    first_event_at: float | None = None
    label = "200"
    failure: str | None = None
    delivered = False  # the client was sent the final ``data: [DONE]`` event
    chunk = first
    try:
        while True:
            now = time.monotonic()
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
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if delivered:  # the engine broke off after its last event: nothing was lost
                    break
                label, failure = "stream_error", _read_failure(exc, arrived, timeouts)
                msg = f"engine failed mid-stream ({failure}): {type(exc).__name__}: {exc}"
                try:
                    await resp.write(_error_event(msg))
                except ConnectionResetError:
                    label = "client_closed"
                break
            except asyncio.CancelledError:
                if attempt.killed is None:
                    raise
                _uncancel()
                label, failure = "stream_error", "instance_down"
                try:
                    await resp.write(_error_event(f"instance {attempt.instance} went down mid-stream"))
                except ConnectionResetError:
                    label = "client_closed"
                break
            if not chunk:
                break
        if label != "client_closed":
            try:
                await resp.write_eof()
            except ConnectionResetError:
                # Every byte of the answer was written; only the chunked-encoding terminator was not.
                if label != "200":
                    label = "client_closed"
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client disconnects. After the last event was written the
        # answer is complete, so this is a success, not a cancelled request. The router's tick cancels
        # an attempt whose instance went down (``attempt.killed``): the stream ends here.
        if attempt.killed is not None and not delivered:
            label, failure = "stream_error", attempt.killed
        elif not delivered:
            raise
        _uncancel()
    end = time.monotonic()
    tpot = None
    if counter.events >= 2 and first_event_at is not None and counter.last_event_at is not None:
        tpot = (counter.last_event_at - first_event_at) / (counter.events - 1)
    return Outcome(
        resp,
        label,
        ttft=first_at - arrived,
        tpot=tpot,
        e2e=end - arrived if label == "200" else None,
        failure=failure,
    )
