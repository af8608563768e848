"""``--takeover etcd``: a real etcd decides which of two routers on two "machines" serves.

The test starts Debian's ``etcd`` (3.4, the gRPC v3 API) on free ports in a temporary directory, one
emulated engine with its agent, and two real router processes with ``--takeover etcd``: A on 127.0.0.2
and B on 127.0.0.3, the same HTTP port on each, each router's admin port and decision stream on its own
address (two loopback addresses standing in for two hosts: neither port bind can fence the other).
Scenarios: kill -9 the primary (B takes over once A's lease expires, with a higher epoch, and serves
requests; the takeover time, kill to the first 200 from B, is printed); SIGSTOP the primary past the
lease's TTL, then SIGCONT it (B took over; A answers none of the requests queued while frozen and steps
down, through its lease deadline or B's higher epoch, whichever it sees first: never two primaries); a
clean SIGTERM (A revokes its lease: B takes over well inside the TTL); a second primary, or one that
cannot reach etcd, refuses to start. The pure parts (the holder's lease deadline, endpoint parsing, the
flags) run without etcd.

Skipped, with the reason, when the ``etcd`` binary (``apt-get install etcd-server``) or the ``aetcd``
client (``pip install -e '.[etcd]'``) is missing. Waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvindex.protocol.ready import parse_ready
from router.cli import parse_args
from router.etcd_lease import Holder, LeaseClock, parse_endpoints
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
A_HOST, B_HOST = "127.0.0.2", "127.0.0.3"
TTL = 2
ETCD = shutil.which("etcd")
HAVE_AETCD = importlib.util.find_spec("aetcd") is not None

needs_etcd = pytest.mark.skipif(
    ETCD is None or not HAVE_AETCD,
    reason="needs the etcd server binary (apt-get install etcd-server) and the aetcd client "
    "(pip install -e '.[etcd]')"
    + f"; missing: {', '.join(n for n, ok in (('etcd', ETCD), ('aetcd', HAVE_AETCD)) if not ok)}",
)

# ------------------------------------------------------------------------------------------ pure


def test_lease_clock_deadline_is_send_time_plus_ttl_and_only_grows() -> None:
    now = [10.0]
    c = LeaseClock(clock=lambda: now[0])
    assert not c.held() and c.left() == float("-inf")
    c.renewed(sent_at=9.5, ttl=2)
    assert c.held() and c.left() == pytest.approx(1.5)
    c.renewed(sent_at=9.0, ttl=2)  # a late answer to an older keep-alive never shortens it
    assert c.deadline == 11.5
    now[0] = 11.5
    assert not c.held()  # the deadline itself is past: etcd may expire it any moment
    c.clear()
    assert c.deadline is None


def test_endpoints_holder_and_flags() -> None:
    assert parse_endpoints("10.0.0.1:2379, etcd-1:2379,[::1]:2379") == (
        ("10.0.0.1", 2379),
        ("etcd-1", 2379),
        ("::1", 2379),
    )
    for bad in ("", "host", "host:0", "host:x", ":2379"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    h = Holder.decode(7, b'{"router_epoch": "ab", "http": "http://a:1", "decisions": "tcp://a:2", "pid": 3}')
    assert h == Holder(7, "ab", "http://a:1", "tcp://a:2", 3)
    assert Holder.decode(9, b"not json") == Holder(9, "", "", "", 0)
    cfg = parse_args(["--takeover", "etcd", "--etcd-endpoints", "e1:2379,e2:2379", "--etcd-lease-ttl", "3"])
    assert cfg.takeover == "etcd" and cfg.etcd_endpoints == ("e1:2379", "e2:2379")
    assert cfg.etcd_lease_ttl == 3 and cfg.etcd_prefix == "/lmetric-router/"
    with pytest.raises(SystemExit):
        parse_args(["--takeover", "etcd", "--etcd-lease-ttl", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--takeover", "etcd", "--etcd-endpoints", "etcd-without-port"])


# ------------------------------------------------------------------------------------- processes


@dataclass
class Etcd:
    proc: subprocess.Popen[bytes]
    endpoint: str  # host:port


def _wait_ready(proc: subprocess.Popen[str], log: Path, what: str, timeout: float = 30) -> dict[str, str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        ready = parse_ready(line)
        if ready is not None:
            return dict(ready.endpoints)
    proc.kill()
    raise AssertionError(f"{what} did not start: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    if ETCD is None or not HAVE_AETCD:
        pytest.skip("needs etcd and aetcd")
    d = tmp_path_factory.mktemp("etcd")
    client, peer = free_port(), free_port()
    cmd = [ETCD, "--name", "t", "--data-dir", str(d / "data")]
    cmd += ["--listen-client-urls", f"http://127.0.0.1:{client}"]
    cmd += ["--advertise-client-urls", f"http://127.0.0.1:{client}"]
    cmd += ["--listen-peer-urls", f"http://127.0.0.1:{peer}"]
    cmd += ["--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}"]
    cmd += ["--initial-cluster", f"t=http://127.0.0.1:{peer}"]
    log = (d / "etcd.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "ready to serve client requests" not in (d / "etcd.log").read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"etcd did not start: {(d / 'etcd.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield Etcd(proc, f"127.0.0.1:{client}")
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One emulated engine (time scale 0.01) and its agent; yields the agent's PUB endpoint."""
    d = tmp_path_factory.mktemp("backend")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    try:
        elog = d / "engine.log"
        eng = subprocess.Popen(
            [sys.executable, "-m", "agents.engine.server", "--time-scale", "0.01"],
            stdout=subprocess.PIPE, stderr=elog.open("w"), text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        procs.append(eng)
        e = _wait_ready(eng, elog, "engine")
        alog = d / "agent.log"
        ag = subprocess.Popen(
            [sys.executable, "-m", "agents.agent", "--engine-url", e["http"], "--heartbeat-interval", "0.05"],
            stdout=subprocess.PIPE, stderr=alog.open("w"), text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        procs.append(ag)
        yield _wait_ready(ag, alog, "agent")["pub"]
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def start_router(
    log: Path, host: str, port: int, etcd: Etcd, prefix: str, agent: str, *args: str
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "router", "--agent", agent, "--warmup-timeout", "2", "--log-level", "INFO"]
    cmd += ["--host", host, "--port", str(port), "--admin-port", "0", "--decisions-port", "0"]
    cmd += ["--takeover", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix]
    cmd += ["--etcd-lease-ttl", str(TTL), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    return proc, _wait_ready(proc, log, f"router on {host}")


@dataclass
class Pair:
    port: int
    a: subprocess.Popen[str]
    a_eps: dict[str, str]
    b: subprocess.Popen[str]
    b_eps: dict[str, str]

    def url(self, host: str, path: str = "/health") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self) -> None:
        for p in (self.a, self.b):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait(10)


def pair(tmp_path: Path, etcd: Etcd, agent: str) -> Pair:
    port = free_port()
    prefix = f"/test-{tmp_path.name}/"
    a, a_eps = start_router(tmp_path / "a.log", A_HOST, port, etcd, prefix, agent, "--role", "primary")
    b, b_eps = start_router(
        tmp_path / "b.log", B_HOST, port, etcd, prefix, agent,
        "--role", "standby", "--primary-decisions", a_eps["decisions"],
    )  # fmt: skip
    return Pair(port, a, a_eps, b, b_eps)


async def get(s: aiohttp.ClientSession, url: str, timeout: float = 3) -> tuple[int, str]:
    """(status, X-Router-Epoch) or (0, error name) when the connection failed."""
    try:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            await r.read()
            return r.status, r.headers.get("X-Router-Epoch", "")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return 0, type(exc).__name__


async def generate(s: aiohttp.ClientSession, url: str) -> int:
    body = {"text": "the etcd lease decides who serves " * 8, "sampling_params": {"max_new_tokens": 4}}
    try:
        async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0


async def ha(s: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with s.get(admin + "/router/state", timeout=aiohttp.ClientTimeout(total=3)) as r:
        out: dict[str, Any] = (await r.json())["ha"]
        return out


async def poll(pred: Callable[[], Any], what: str, timeout: float = 20.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


async def role_is(s: aiohttp.ClientSession, admin: str, role: str) -> bool:
    try:
        return (await ha(s, admin))["role"] == role
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def first_200_after(s: aiohttp.ClientSession, url: str, t0: float, timeout: float) -> float:
    """Probe ``url`` every 10 ms; seconds from ``t0`` (monotonic) to the send time of the first probe
    answered 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = time.monotonic()
        if (await get(s, url, timeout=1))[0] == 200:
            return sent - t0
        await asyncio.sleep(0.01)
    raise AssertionError(f"no 200 from {url} within {timeout} s")


@needs_etcd
@pytest.mark.timeout(90)
async def test_kill_9_primary_the_standby_takes_the_etcd_key_with_a_higher_epoch(
    tmp_path: Path, etcd: Etcd, agent: str
) -> None:
    p = pair(tmp_path, etcd, agent)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            a0 = await ha(s, p.a_eps["admin"])
            assert a0["role"] == "primary" and a0["lease"]["held"] and a0["term"] == a0["lease"]["epoch"]
            assert (await ha(s, p.b_eps["admin"]))["role"] == "standby"
            assert await generate(s, p.url(A_HOST, "/generate")) == 200
            assert (await get(s, p.url(B_HOST)))[0] == 0  # B does not serve while A holds the key
            t0 = time.monotonic()
            p.a.kill()
            took = await first_200_after(s, p.url(B_HOST), t0, timeout=TTL + 10)
            b1 = await ha(s, p.b_eps["admin"])
            statuses = [await generate(s, p.url(B_HOST, "/generate")) for _ in range(5)]
            status, who = await get(s, p.url(B_HOST, "/v1/models"))
        print(
            f"etcd takeover (kill -9 -> first 200 from the new primary, TTL {TTL} s): {took:.3f} s; "
            f"epochs {a0['term']} -> {b1['term']}"
        )
        assert b1["role"] == "primary" and b1["takeovers"] == 1 and b1["lease"]["held"]
        assert b1["term"] == b1["lease"]["epoch"] > a0["term"]
        assert statuses == [200] * 5 and status == 200 and who.startswith(f"{b1['term']}:")
        assert took < TTL + 5  # the lease's TTL, etcd's expiry check, a watch event, one txn
    finally:
        p.stop()


@needs_etcd
@pytest.mark.timeout(90)
async def test_sigstop_past_the_ttl_the_frozen_primary_steps_down_on_sigcont(
    tmp_path: Path, etcd: Etcd, agent: str
) -> None:
    p = pair(tmp_path, etcd, agent)
    a_url, b_url = p.url(A_HOST, "/v1/models"), p.url(B_HOST, "/v1/models")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            a0 = await ha(s, p.a_eps["admin"])
            assert (await get(s, a_url))[0] == 200
            os.kill(p.a.pid, signal.SIGSTOP)
            await poll(lambda: role_is(s, p.b_eps["admin"], "primary"), "B took the key", timeout=TTL + 10)
            queued = [asyncio.create_task(get(s, a_url, timeout=10)) for _ in range(5)]  # in A's backlog
            await asyncio.sleep(0.3)
            b_answers = [await get(s, b_url) for _ in range(3)]
            os.kill(p.a.pid, signal.SIGCONT)
            results = await asyncio.gather(*queued)
            await poll(lambda: role_is(s, p.a_eps["admin"], "fenced"), "A stepped down")
            after = [await get(s, a_url) for _ in range(3)]
            # A steps down through whichever it notices first: its lease deadline passed (the keep-alive
            # loop) or B's higher epoch on B's decision stream; the lease is reported lost either way
            await poll(lambda: _lease_lost(s, p.a_eps["admin"]), "A reports its lease lost")
            a1, b1 = await ha(s, p.a_eps["admin"]), await ha(s, p.b_eps["admin"])
            async with s.get(p.a_eps["admin"] + "/metrics") as r:
                metrics = await r.text()
        print("queued at A:", results, "B:", b_answers, "A after:", after)
        assert all(st != 200 for st, _ in results), results  # nothing A found on resuming was answered
        assert all(st == 200 and who.startswith(f"{b1['term']}:") for st, who in b_answers), b_answers
        assert all(st == 0 for st, _ in after), after  # A's port is closed
        assert b1["role"] == "primary" and b1["term"] > a0["term"]
        assert a1["role"] == "fenced" and a1["lease"]["lost"]
        assert "router_lease_lost_total 1.0" in metrics and "router_fenced_total 1.0" in metrics
        assert "FENCED: " in (tmp_path / "a.log").read_text()
    finally:
        p.stop()


async def _lease_lost(s: aiohttp.ClientSession, admin: str) -> bool:
    try:
        return bool((await ha(s, admin))["lease"]["lost"])
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


@needs_etcd
@pytest.mark.timeout(60)
async def test_sigterm_resigns_the_key_so_the_standby_takes_over_inside_the_ttl(
    tmp_path: Path, etcd: Etcd, agent: str
) -> None:
    p = pair(tmp_path, etcd, agent)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            t0 = time.monotonic()
            p.a.send_signal(signal.SIGTERM)
            took = await first_200_after(s, p.url(B_HOST), t0, timeout=TTL + 10)
            assert p.a.wait(10) == 0
        print(f"etcd takeover after SIGTERM (the primary revoked its lease): {took:.3f} s")
        assert took < TTL
        assert "resigned the etcd key" in (tmp_path / "a.log").read_text()
    finally:
        p.stop()


@needs_etcd
@pytest.mark.timeout(60)
async def test_a_second_primary_does_not_start_while_the_key_is_held(
    tmp_path: Path, etcd: Etcd, agent: str
) -> None:
    port = free_port()
    prefix = f"/test-{tmp_path.name}/"
    a, _ = start_router(tmp_path / "a.log", A_HOST, port, etcd, prefix, agent, "--role", "primary")
    try:
        cmd = [sys.executable, "-m", "router", "--host", B_HOST, "--port", str(port), "--warmup-timeout", "0"]
        cmd += ["--takeover", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix]
        cmd += ["--etcd-lease-ttl", str(TTL)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 1, r.stderr[-2000:]
        assert "is held by router" in r.stderr and "--role standby --primary-decisions tcp://" in r.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            a.kill()
        a.wait(10)


@pytest.mark.skipif(not HAVE_AETCD, reason="needs the aetcd client (pip install -e '.[etcd]')")
@pytest.mark.timeout(60)
def test_a_primary_that_cannot_reach_etcd_does_not_serve() -> None:
    nobody = free_port()  # nothing listens there
    cmd = [sys.executable, "-m", "router", "--host", A_HOST, "--port", str(free_port()), "--warmup-timeout"]
    cmd += ["0", "--takeover", "etcd", "--etcd-endpoints", f"127.0.0.1:{nobody}", "--etcd-lease-ttl", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=40, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "is etcd reachable" in r.stderr
