"""Slow clients at a live router (docs/robustness.md, docs/security.md): a body that stops arriving gets
408 and a closed connection after ``--client-body-timeout``; a request head that never ends, or an idle
connection, is closed after ``--client-idle-timeout``; meanwhile the router answers everyone else.

In-process router over loopback with raw sockets (the clients misbehave on purpose).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from router.cli import parse_args
from router.config import RouterConfig
from router.ha import HANode
from router.server import RouterServer

pytestmark = pytest.mark.timeout(60)


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything until the server closes the connection (raises ``asyncio.TimeoutError`` if it does not)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def _health(url: str) -> bytes:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return await _read_all(reader, 5)
    finally:
        writer.close()


def test_flags() -> None:
    cfg = parse_args(["--client-body-timeout", "5", "--client-idle-timeout", "9"])
    assert (cfg.client_body_timeout, cfg.client_idle_timeout) == (5.0, 9.0)
    assert (RouterConfig().client_body_timeout, RouterConfig().client_idle_timeout) == (60.0, 75.0)
    with pytest.raises(ValueError):
        RouterConfig(client_body_timeout=0)


async def test_slow_senders_get_408_and_a_closed_connection_while_others_are_served() -> None:
    node = HANode(
        RouterServer(RouterConfig(port=0, warmup_timeout=0, client_body_timeout=0.5, client_idle_timeout=1.0))
    )
    await node.start()
    url = node.server.url
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conns = []
    try:
        t0 = time.monotonic()
        for _ in range(20):  # heads complete, bodies stalled after one byte
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            conns.append((reader, writer))
        head_only = await asyncio.open_connection(host, int(port))
        head_only[1].write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Le")  # a head that never ends
        idle = await asyncio.open_connection(host, int(port))  # says nothing at all
        assert (await _health(url)).startswith(b"HTTP/1.1 503")  # served meanwhile (no engine: 503)

        for reader, _ in conns:
            answer = await _read_all(reader, 5)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] == 408 and body["error"]["type"] == "request_timeout"
            assert "--client-body-timeout" in body["error"]["message"]
        assert time.monotonic() - t0 < 5
        for reader, _ in (head_only, idle):
            assert await _read_all(reader, 5) == b""  # closed without an answer
        text = node.server.metrics.render().decode()
        assert 'router_rejected_total{reason="body_timeout"} 20.0' in text
    finally:
        for _, writer in [*conns, head_only, idle]:
            writer.close()
        await node.stop()


async def test_a_body_that_keeps_coming_is_read_whole() -> None:
    """The timeout is between two reads, not for the whole body: a slow but steady sender is served."""
    node = HANode(RouterServer(RouterConfig(port=0, warmup_timeout=0, client_body_timeout=0.5)))
    await node.start()
    host, port = node.server.url.split("//", 1)[1].rsplit(":", 1)
    try:
        body = json.dumps({"text": "x" * 40}).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        for i in range(0, len(body), 10):  # 1 s in all, 0.2 s between pieces
            writer.write(body[i : i + 10])
            await asyncio.sleep(0.2)
        answer = await _read_all(reader, 5)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]  # read, decoded; no engine to route to
        writer.close()
    finally:
        await node.stop()
