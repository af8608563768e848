"""HTTPS between the engine, its agent and the router (docs/security.md), as SGLang 0.5.23 serves it.

SGLang's ``--ssl-certfile``/``--ssl-keyfile`` (``srt/arg_groups/fields/serving.py``) make the emulated
engine serve HTTPS; the agent trusts it with ``--engine-ca-file`` and the router with its
``engine_ca_file``. Real processes on OS-assigned loopback ports; the certificate is made at test time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from agents.engine.config import parse_args as engine_args
from kvindex.protocol.ready import Ready, parse_ready
from router.config import RouterConfig
from router.ha import HANode
from router.server import RouterServer
from tests.test_security import self_signed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(90)


async def _spawn(*args: str) -> tuple[asyncio.subprocess.Process, Ready | None]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    while line := await asyncio.wait_for(proc.stdout.readline(), 30):
        ready = parse_ready(line.decode())
        if ready is not None:
            return proc, ready
    return proc, None


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except asyncio.TimeoutError:
        proc.kill()


def test_engine_tls_flags_as_sglang(tmp_path: Path) -> None:
    cfg = engine_args(["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-keyfile-password", "pw"])
    assert (cfg.ssl_certfile, cfg.ssl_keyfile) == ("c.pem", "k.pem") and "pw" not in repr(cfg)
    for bad in (["--ssl-certfile", "c.pem"], ["--ssl-keyfile", "k.pem"], ["--ssl-keyfile-password", "pw"]):
        with pytest.raises(SystemExit):
            engine_args(bad)


async def test_https_engine_agent_and_router(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    engine, ready = await _spawn(
        "-m", "agents.engine.server", "--port", "0", "--time-scale", "0.05",
        "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
    )  # fmt: skip
    procs = [engine]
    try:
        assert ready is not None and ready.endpoints["http"].startswith("https://127.0.0.1:")
        url = ready.endpoints["http"]
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health", ssl=trusted) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.get(url + "/health")  # the system CAs do not know it
            with pytest.raises(aiohttp.ClientError):
                await s.get(url.replace("https", "http") + "/health")  # plain HTTP is not served

        # an agent without the CA never sees the engine healthy; with it, it follows the engine
        res = subprocess.run(
            [sys.executable, "-m", "agents.agent", "--engine-url", url, "--engine-wait", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 1 and "not healthy" in res.stderr
        agent, aready = await _spawn(
            "-m", "agents.agent", "--engine-url", url, "--engine-ca-file", str(cert), "--instance-id", "tls0"
        )
        procs.append(agent)
        assert aready is not None and aready.role == "agent"

        # the router reaches the HTTPS engine (the URL the agent reports) trusting the same CA
        node = HANode(
            RouterServer(
                RouterConfig(
                    port=0, warmup_timeout=10, agents=(aready.endpoints["pub"],), engine_ca_file=str(cert)
                )
            )
        )
        await node.start()
        try:
            await node.server.warm_up(10)
            body = {"text": "hello over TLS", "sampling_params": {"max_new_tokens": 3}}
            async with aiohttp.ClientSession() as s, s.post(node.server.url + "/generate", json=body) as r:
                assert r.status == 200, await r.text()
                assert r.headers.get("X-Router-Instance") == "tls0"
        finally:
            await node.stop()
    finally:
        for p in reversed(procs):
            await _stop(p)


async def test_launch_cluster_attaches_https_engines_with_their_ca(tmp_path: Path) -> None:
    """``launch cluster --attach https://... --engine-ca-file PEM``: agent and router trust the engine."""
    cert, key = self_signed(tmp_path)
    engine, ready = await _spawn(
        "-m", "agents.engine.server", "--port", "0", "--time-scale", "0.05",
        "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
    )  # fmt: skip
    cluster: asyncio.subprocess.Process | None = None
    try:
        assert ready is not None
        cluster = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "launch", "cluster", "--attach", ready.endpoints["http"],
            "--engine-ca-file", str(cert), "--port", "0", "--no-standby", "--no-metrics",
            "--cluster-file", str(tmp_path / "cluster.json"), "--log-dir", str(tmp_path / "logs"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert cluster.stdout is not None
        url = ""
        while line := (await asyncio.wait_for(cluster.stdout.readline(), 60)).decode():
            if line.startswith("router: "):
                url = line.split("router: ", 1)[1].strip()
                break
        assert url, "launch cluster did not become ready"
        body = {"text": "attached over TLS", "sampling_params": {"max_new_tokens": 2}}
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            async with s.post(url + "/generate", json=body) as r:
                assert r.status == 200, await r.text()
    finally:
        if cluster is not None:
            with contextlib.suppress(ProcessLookupError):
                cluster.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(cluster.wait(), 30)
            except asyncio.TimeoutError:
                cluster.kill()
        await _stop(engine)
