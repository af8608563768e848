"""Fencing: two routers that both think they are primary never both keep serving.

The pair runs as on two machines, with two loopback addresses standing in for the two hosts' HTTP
addresses (127.0.0.2: A, 127.0.0.3: B) and 127.0.0.1 for the decision streams and admin ports (the VIP
recipe's host address). Scenarios: the primary SIGKILLed; SIGSTOPped until the standby took over, then
SIGCONTed (it must step down and answer none of the requests queued while it was frozen); a split
between the pair (a relay on each decision stream, cut and restored) healed after a takeover; and the
pure :class:`~router.fence.Fence` rules. Waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvindex.protocol import RouterHeartbeat
from kvindex.protocol.ready import parse_ready
from router.config import RouterConfig
from router.fence import Fence
from router.ha import HANode
from router.server import RouterServer
from tests.ports import free_port

pytestmark = pytest.mark.timeout(90)

A_HOST, B_HOST, HOST = "127.0.0.2", "127.0.0.3", "127.0.0.1"


def hb(epoch: int, term: int, role: str = "primary") -> RouterHeartbeat:
    return RouterHeartbeat(router_epoch=epoch, role=role, ts=0.0, http="", pid=1, term=term)


def test_fence_orders_primaries_by_term_then_epoch_and_promotes_above_all_seen() -> None:
    f = Fence(1, 50, 0.4, clock=lambda: 0.0)
    assert not f.observe(hb(50, 9))  # its own heartbeat
    assert not f.observe(hb(7, 9, role="standby"))
    assert not f.observe(hb(40, 1))  # same term, lower epoch
    assert f.observe(hb(60, 1))  # same term, higher epoch
    assert f.observe(hb(7, 3))
    assert f.promotion_term() == 4


def test_fence_gate_holds_after_a_stall_until_a_fresh_peer_heartbeat() -> None:
    now = [0.0]
    f = Fence(1, 50, 0.4, clock=lambda: now[0])
    f.beat()
    assert not f.suspect()
    now[0] = 5.0  # frozen for 5 s
    assert f.suspect()
    f.observe(hb(7, 0, role="standby"))  # queued while frozen: no news
    assert f.suspect()
    now[0] = 5.2
    f.observe(hb(7, 0, role="standby"))  # fresh: nobody took over
    assert not f.suspect() and f.stalls == 1
    now[0] = 9.0
    assert f.suspect()
    now[0] = 9.0 + f.silence  # the peer stays silent: it is gone, nobody took over
    assert not f.suspect()


# ----------------------------------------------------------------------------------- real processes


def start_router(log: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "router", "--warmup-timeout", "0", "--primary-timeout", "0.4", *args]
    cmd += ["--admin-host", HOST, "--admin-port", "0", "--decisions-host", HOST, "--decisions-port", "0"]
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, cwd=Path(__file__).parents[1])
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        ready = parse_ready(line)
        if ready is not None:
            return proc, dict(ready.endpoints)
    proc.kill()
    raise AssertionError(f"router did not start: {log.read_text()[-3000:]}")


async def get(s: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """(status, X-Router-Epoch) or (0, error) when the connection failed."""
    try:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
            await r.read()
            return r.status, r.headers.get("X-Router-Epoch", "")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return 0, type(exc).__name__


async def poll(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def state(s: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with s.get(admin + "/router/state", timeout=aiohttp.ClientTimeout(total=3)) as r:
        ha: dict[str, Any] = (await r.json())["ha"]
        return ha


def pair(
    tmp_path: Path,
) -> tuple[int, subprocess.Popen[str], dict[str, str], subprocess.Popen[str], dict[str, str]]:
    port = free_port()
    a, a_eps = start_router(tmp_path / "a.log", "--role", "primary", "--host", A_HOST, "--port", str(port))
    b, b_eps = start_router(
        tmp_path / "b.log",
        *("--role", "standby", "--host", B_HOST, "--port", str(port)),
        *("--primary-decisions", a_eps["decisions"]),
    )
    return port, a, a_eps, b, b_eps


def stop(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(10)


async def test_kill_9_primary_standby_takes_over_with_a_higher_epoch(tmp_path: Path) -> None:
    port, a, a_eps, b, b_eps = pair(tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await state(s, a_eps["admin"]))["term"] == 1
            a.kill()
            await poll(lambda: _role(s, b_eps["admin"], "primary"), "B primary")
            st = await state(s, b_eps["admin"])
            assert st["term"] == 2 and st["takeovers"] == 1
            status, who = await get(s, f"http://{B_HOST}:{port}/v1/models")
            assert status == 200 and who.startswith("2:")
    finally:
        stop(a, b)


async def _role(s: aiohttp.ClientSession, admin: str, role: str) -> bool:
    try:
        return (await state(s, admin))["role"] == role
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def test_sigstop_primary_is_replaced_and_steps_down_on_sigcont(tmp_path: Path) -> None:
    port, a, a_eps, b, b_eps = pair(tmp_path)
    a_url, b_url = f"http://{A_HOST}:{port}/v1/models", f"http://{B_HOST}:{port}/v1/models"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            # B registered its stream with A: A watches B
            await poll(
                lambda: _has_peer(s, a_eps["admin"], b_eps["decisions"]), "A watching B's decision stream"
            )
            assert (await get(s, a_url))[0] == 200
            os.kill(a.pid, signal.SIGSTOP)
            await poll(lambda: _role(s, b_eps["admin"], "primary"), "B took over")
            # requests to the frozen A queue in its listener's backlog
            queued = [asyncio.create_task(get(s, a_url)) for _ in range(5)]
            await asyncio.sleep(0.3)
            b_answers = [await get(s, b_url) for _ in range(3)]
            os.kill(a.pid, signal.SIGCONT)
            results = await asyncio.gather(*queued)
            await poll(lambda: _role(s, a_eps["admin"], "fenced"), "A stepped down")
            after = [await get(s, a_url) for _ in range(3)]
            a_state = await state(s, a_eps["admin"])
            async with s.get(a_eps["admin"] + "/metrics") as r:
                metrics = await r.text()
        print("queued at A:", results, "B:", b_answers, "A after:", after)
        # nothing A found queued on resuming was answered by it
        assert all(st != 200 for st, _ in results), results
        assert all(st == 200 and who.startswith("2:") for st, who in b_answers), b_answers
        assert all(st == 0 for st, _ in after), after  # A's port is closed: refused
        assert a_state["fenced_by"]["term"] == 2 and a_state["stalls"] >= 1
        assert "router_fenced_total 1.0" in metrics
        assert "FENCED" in (tmp_path / "a.log").read_text()
    finally:
        stop(a, b)


async def _has_peer(s: aiohttp.ClientSession, admin: str, endpoint: str) -> bool:
    try:
        return endpoint in (await state(s, admin))["peers"]
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


# --------------------------------------------------------------------------------------- a split


class Relay:
    """A TCP relay that can be cut (every connection closed, nothing accepted) and restored."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, self.port, reuse_address=True)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, uw}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))


async def test_split_healed_after_takeover_leaves_one_primary(tmp_path: Path) -> None:
    port, a_dec, b_dec = free_port(), free_port(), free_port()
    to_a, to_b = Relay(a_dec), Relay(b_dec)
    await to_a.start()
    await to_b.start()
    common = {"port": port, "warmup_timeout": 0, "admin_port": 0, "primary_timeout": 0.4}
    common |= {"admin_host": HOST, "decisions_host": HOST}
    a = HANode(
        RouterServer(
            RouterConfig(
                host=A_HOST, decisions_port=a_dec, peer_decisions=(f"tcp://{HOST}:{to_b.port}",), **common
            )
        )
    )
    b = HANode(
        RouterServer(
            RouterConfig(
                host=B_HOST,
                decisions_port=b_dec,
                role="standby",
                primary_decisions=f"tcp://{HOST}:{to_a.port}",
                **common,
            )
        )
    )
    b._register_with = lambda hb: None  # type: ignore[method-assign]  # only the relays connect the pair
    try:
        await a.start()
        await b.start()
        assert await b.wait_for_primary(10)
        await to_a.cut()
        await to_b.cut()
        await asyncio.wait_for(b.wait_promoted(), 10)
        assert a.role == "primary" and b.role == "primary" and b.fence.term == 2  # both, during the split
        await to_a.start()
        await to_b.start()
        await poll(lambda: a.role == "fenced", "A stepped down after the heal", timeout=15)
        await asyncio.sleep(0.5)
        assert b.role == "primary" and a.fence.fenced_by is not None and a.fence.fenced_by.term == 2
        async with aiohttp.ClientSession() as s:
            assert (await get(s, f"http://{A_HOST}:{port}/v1/models"))[0] == 0
            assert (await get(s, f"http://{B_HOST}:{port}/v1/models"))[0] == 200
    finally:
        await to_a.cut()
        await to_b.cut()
        await b.stop()
        await a.stop()


async def test_a_router_without_a_decision_stream_still_keeps_its_fence_clock() -> None:
    """The open ``launch fuzz`` finding: a router with a peer configured but its decision stream off had
    no heartbeat loop, so its fence saw one endless stall; every stall let one waiting request through per
    ``silence`` second (the others re-armed it), and /health behind 50 slow senders waited > 15 s."""
    cfg = RouterConfig(port=0, warmup_timeout=0, decisions_port=None, peer_decisions=("tcp://127.0.0.1:9",))
    node = HANode(RouterServer(cfg))
    await node.start()
    try:
        await asyncio.sleep(0.6)  # longer than stall_after (primary_timeout / 2) since start
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as s:

            async def health() -> int:
                async with s.get(node.server.url + "/health") as r:
                    return r.status

            statuses = await asyncio.wait_for(asyncio.gather(*(health() for _ in range(8))), 30)
        assert statuses == [503] * 8  # answered (no engine: 503)
        assert time.monotonic() - t0 < 1.0, "requests were held at the fence gate"
    finally:
        await node.stop()
