"""The agent's upstream link to one SGLang (or emulated) engine: HTTP discovery, health, replay.

Health follows SGLang 0.5.23's ``/health`` (``srt/entrypoints/http_server.py``, ``health_generate``; see
docs/sglang-contract.md): it answers 503 while the server starts or exits, and otherwise runs a 1-token
generation probe that answers 200 no sooner than one second (up to ``SGLANG_HEALTH_CHECK_TIMEOUT``, 20 s,
and then 503). :func:`check_health` tells the three outcomes apart (:class:`Health`), so the agent can
wait for a starting engine and count only real failures. SGLang's uvicorn closes an idle keep-alive
connection after 5 s (``SGLANG_TIMEOUT_KEEP_ALIVE``); a pooled connection found dead when reused is not a
failure of the engine: an idempotent GET is retried once on a fresh connection.

Discovery reads ``GET /server_info``. The ``kv_events`` block (this project's engine and the launcher
expose it) is ``{publisher, endpoint_host, endpoint_port_base, topic, block_size, dp_size,
replay_endpoint_port_base, load_endpoint_port_base, load_topic}``; a stock SGLang server instead carries
its ``--kv-events-config`` JSON string as ``kv_events_config`` (endpoint/replay_endpoint/topic) and its
page size as ``page_size``, which is read as a fallback. An ``endpoint_host`` of ``*``, ``0.0.0.0`` or
empty means "the host of the engine's URL". Command-line overrides win over both.

The replay client speaks SGLang's replay protocol (sglang 0.5.23, ``srt/disaggregation/kv_events.py``;
codec in :mod:`kvindex.protocol`): a DEALER sends ``[b"", start_seq]`` and reads replies until the end marker.
After a timeout (or cancellation) the DEALER is closed and a fresh one connected, so that late replies to
an abandoned request can never be mistaken for replies to the next one. A malformed reply is skipped (and
reported), not fatal: the others may still cover the range asked for, and the caller checks that they
do. Replies already waiting when a request is sent (a peer that answered twice) are dropped unread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import zmq
import zmq.asyncio

from agents.agent.health import Health
from kvindex import protocol as wire
from kvindex.transport import make_socket

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("", "*", "0.0.0.0")
_MAX_REPLAY_ITEMS = 1_000_000  # far above SGLang's buffer_steps; bounds a misbehaving peer


class EngineUnavailableError(RuntimeError):
    """The engine's ``/health`` did not answer 200 within the allowed wait."""


class EngineDiscoveryError(RuntimeError):
    """The engine's KV event endpoint could not be determined (no ``kv_events`` and no override)."""


class ReplayError(RuntimeError):
    """A replay request failed. ``reason`` is a short label: ``timeout``, ``too_long`` or a WireError reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the agent learned about its engine. Endpoints are ZeroMQ ``tcp://host:port`` URLs.

    ``replay_endpoint``/``load_endpoint`` are ``None`` when the engine has none. ``kv_topic`` empty means
    "subscribe to everything, accept any topic". ``block_size`` in tokens (SGLang's page size).
    """

    url: str
    kv_endpoint: str
    replay_endpoint: str | None
    load_endpoint: str | None
    kv_topic: bytes
    load_topic: bytes
    block_size: int
    dp_size: int
    model: str


def url_host(url: str) -> str:
    """Host part of an HTTP URL (``127.0.0.1`` for ``http://127.0.0.1:30001``); ``127.0.0.1`` if absent."""
    return urlsplit(url).hostname or "127.0.0.1"


def default_instance_id(url: str) -> str:
    """``host:port`` of the engine URL, e.g. ``127.0.0.1:30001`` (``host`` alone if the URL has no port)."""
    parts = urlsplit(url)
    host = parts.hostname or url
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


# Keep pooled connections to the engine for less than SGLang's 5 s keep-alive, so the client drops an
# idle connection before the server closes it (the retry below covers the race that remains).
CLIENT_KEEPALIVE = 4.0
# How long one /health call may take at start: more than the probe's one-second tick, so that a 1 s
# (or 2 s) answer is seen; the start-up wait loops on it until ``engine_wait`` runs out.
_START_PROBE_TIMEOUT = 5.0


def engine_ssl(ca_file: str | None = None, verify: bool = True) -> ssl.SSLContext | bool:
    """What the agent's connector gets for an ``https://`` engine (SGLang ``--ssl-certfile``): a context
    trusting ``ca_file`` only, False when ``verify`` is off (testing only), True (the system's CAs)
    otherwise. Raises ``OSError`` / ``ssl.SSLError`` for an unreadable or malformed CA file."""
    if not verify:
        return False
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return True


def engine_session(tls: ssl.SSLContext | bool = True) -> aiohttp.ClientSession:
    """An HTTP session for talking to an engine: pooled connections kept :data:`CLIENT_KEEPALIVE` s;
    ``tls`` verifies an HTTPS engine (:func:`engine_ssl`)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=CLIENT_KEEPALIVE, ssl=tls))


async def _health_once(session: aiohttp.ClientSession, url: str, timeout: float) -> Health:
    async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        await resp.read()
    if resp.status == 200:
        return Health.OK
    return Health.NOT_READY if resp.status == 503 else Health.FAILED


async def check_health(session: aiohttp.ClientSession, url: str, timeout: float) -> Health:
    """``GET {url}/health`` within ``timeout`` seconds, as a :class:`Health`. Never raises (but cancels).

    A connection that dies before the answer (``ServerDisconnectedError`` or a reset: typically a pooled
    keep-alive connection the engine closed while idle) is retried once on a fresh connection, within the
    time left. A refused connection (``Health.REFUSED``) or a timeout is not retried.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        try:
            return await _health_once(session, url, timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                refused = isinstance(exc.os_error, ConnectionRefusedError)
                return Health.REFUSED if refused else Health.FAILED
            if loop.time() >= deadline:
                return Health.FAILED
            log.debug("health check of %s: connection lost (%s); retrying on a fresh one", url, exc)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            return await _health_once(fresh, url, max(0.01, deadline - loop.time()))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return Health.FAILED


async def wait_until_healthy(
    session: aiohttp.ClientSession, url: str, wait: float, poll: float = 0.25
) -> None:
    """Poll ``/health`` until it answers 200; a 503 (the engine is starting) just means "not yet".

    Raises:
        EngineUnavailableError: not healthy after ``wait`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        left = deadline - loop.time()
        if await check_health(session, url, timeout=max(0.1, min(_START_PROBE_TIMEOUT, left))) is Health.OK:
            return
        if loop.time() + poll > deadline:
            raise EngineUnavailableError(f"engine {url} not healthy (GET /health != 200) after {wait:g} s")
        await asyncio.sleep(poll)


async def _get_json(session: aiohttp.ClientSession, url: str, timeout: float = 5.0) -> Any:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None


def _endpoint(host: Any, port: Any, engine_host: str) -> str | None:
    if isinstance(port, bool) or not isinstance(port, int | str):
        return None
    try:
        num = int(port)
    except ValueError:
        log.warning("ignoring non-numeric port %r in /server_info", port)
        return None
    h = host if isinstance(host, str) and host not in _WILDCARD_HOSTS else engine_host
    return f"tcp://{h}:{num}"


def _fix_wildcard(endpoint: Any, engine_host: str) -> str | None:
    """``tcp://*:5557`` from a bind address -> ``tcp://<engine host>:5557`` to connect to."""
    if not isinstance(endpoint, str) or not endpoint:
        return None
    head, sep, port = endpoint.rpartition(":")
    if not sep:
        return endpoint
    scheme, _, host = head.rpartition("//")
    if host in _WILDCARD_HOSTS:
        return f"{scheme}//{engine_host}:{port}"
    return endpoint


async def _model_name(session: aiohttp.ClientSession, url: str, info: dict[str, Any]) -> str:
    for key in ("served_model_name", "model_path"):
        val = info.get(key)
        if isinstance(val, str) and val:
            return val
    models = await _get_json(session, f"{url}/v1/models")
    if isinstance(models, dict):
        data = models.get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return str(data[0].get("id", ""))
    return ""


async def discover(
    session: aiohttp.ClientSession,
    url: str,
    kv_endpoint: str | None = None,
    replay_endpoint: str | None = None,
    load_endpoint: str | None = None,
) -> EngineInfo:
    """Read ``/server_info`` (and ``/v1/models`` if needed) into an :class:`EngineInfo`.

    The three endpoint arguments, when given, override what the engine says.

    Raises:
        EngineDiscoveryError: no KV endpoint known (neither in ``/server_info`` nor overridden).
    """
    host = url_host(url)
    raw = await _get_json(session, f"{url}/server_info")
    info: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kv = info.get("kv_events")
    kv_block: dict[str, Any] = kv if isinstance(kv, dict) else {}

    disc_kv = disc_replay = disc_load = None
    topic: Any = kv_block.get("topic", "")
    load_topic: Any = kv_block.get("load_topic", "load")
    block_size: Any = kv_block.get("block_size")
    if kv_block:
        eh = kv_block.get("endpoint_host")
        disc_kv = _endpoint(eh, kv_block.get("endpoint_port_base"), host)
        disc_replay = _endpoint(eh, kv_block.get("replay_endpoint_port_base"), host)
        disc_load = _endpoint(eh, kv_block.get("load_endpoint_port_base"), host)
    elif isinstance(info.get("kv_events_config"), str):  # stock SGLang: the raw --kv-events-config JSON
        try:
            conf = json.loads(info["kv_events_config"])
        except ValueError:
            conf = None
        if isinstance(conf, dict):
            disc_kv = _fix_wildcard(conf.get("endpoint"), host)
            disc_replay = _fix_wildcard(conf.get("replay_endpoint"), host)
            topic = conf.get("topic", "")
        disc_load = _fix_wildcard(info.get("load_publish_endpoint"), host)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        page = info.get("page_size")
        block_size = page if isinstance(page, int) and not isinstance(page, bool) and page > 0 else 1
    dp = kv_block.get("dp_size", info.get("dp_size", 1))
    dp_size = dp if isinstance(dp, int) and not isinstance(dp, bool) and dp > 0 else 1

    final_kv = kv_endpoint or disc_kv
    if not final_kv:
        raise EngineDiscoveryError(
            f"engine {url}: /server_info has no kv_events block (is the server started with "
            "--kv-events-config?); pass --kv-endpoint to set it by hand"
        )
    if dp_size > 1:
        log.warning("engine %s has dp_size=%d: only attention-DP rank 0's streams are followed", url, dp_size)
    return EngineInfo(
        url=url,
        kv_endpoint=final_kv,
        replay_endpoint=replay_endpoint or disc_replay,
        load_endpoint=load_endpoint or disc_load,
        kv_topic=str(topic or "").encode(),
        load_topic=str(load_topic or "").encode(),
        block_size=block_size,
        dp_size=dp_size,
        model=await _model_name(session, url, info),
    )


class ReplayClient:
    """A DEALER connected to an engine's replay ROUTER. Used by one task at a time (the agent's owner).

    ``on_skipped(reason)`` is called for every reply skipped: a :class:`kvindex.protocol.WireError` reason
    for a malformed one, ``stale_reply`` for one left over from an earlier request.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        timeout: float,
        on_skipped: Callable[[str], None] | None = None,
    ) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self._timeout_ms = max(1, int(timeout * 1000))
        self._sock: zmq.asyncio.Socket | None = None
        self._on_skipped = on_skipped

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            sock = make_socket(self._ctx, zmq.DEALER, curve=False)  # SGLang's replay: no CURVE
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _skipped(self, reason: str) -> None:
        if self._on_skipped is not None:
            self._on_skipped(reason)

    async def fetch(self, start: int) -> list[wire.ReplayItem]:
        """Every buffered batch with ``seq >= start``, in the order the engine sent them (end marker excluded).

        Malformed replies are skipped and reported through ``on_skipped`` (the result then lacks
        whatever they carried: callers check the seqs they need are all there).

        Raises:
            ReplayError: ``timeout`` (no reply for the configured timeout) or ``too_long`` (more than
            ``_MAX_REPLAY_ITEMS`` replies, skipped ones included). The socket is reset first.
        """
        sock = self._socket()
        items: list[wire.ReplayItem] = []
        try:
            while await sock.poll(0):  # a peer that answered an earlier request twice
                await sock.recv_multipart()
                self._skipped("stale_reply")
            await sock.send_multipart(wire.replay_request(start))
            replies = 0
            while True:
                if not await sock.poll(self._timeout_ms):
                    raise ReplayError("timeout", f"no reply from {self.endpoint} in {self._timeout_ms} ms")
                frames = await sock.recv_multipart()
                replies += 1
                if replies > _MAX_REPLAY_ITEMS:
                    raise ReplayError("too_long", f"more than {_MAX_REPLAY_ITEMS} replies")
                try:
                    item = wire.parse_replay_reply(frames)
                except wire.WireError as exc:
                    self._skipped(exc.reason)
                    continue
                if item.is_end:
                    return items
                items.append(item)
        except BaseException:  # timeout, too_long, cancellation: replies may still be in flight
            self.reset()
            raise

    def reset(self) -> None:
        """Drop the current DEALER (and anything queued on it); the next fetch connects a new one."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.reset()
