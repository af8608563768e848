"""Keys, TLS, bind hosts and CURVE (docs/security.md).

In-process routers over loopback: API keys on the generation endpoints (401 with an OpenAI body), the
admin key on ``/router/*``, ``/health`` open, metrics on their own port and key, key files and variables,
the client's key not passed to engines; HTTPS with a certificate made at test time (``openssl``); the
VIP recipe (HTTP on an address this machine does not hold, admin and decisions on the host's); CURVE on
a decision stream (an authorized client reads it, an unknown one reads nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from kvindex import curve
from kvindex.transport import Publisher, make_socket
from router.auth import AuthConfigError, KeyRing, read_keys
from router.cli import parse_args
from router.config import RouterConfig
from router.ha import HANode
from router.server import RouterServer
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)


def test_key_specs_from_flag_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "keys"
    f.write_text("# rotation: old and new\nold-key\n\nnew-key\n")
    monkeypatch.setenv("ROUTER_KEYS", "k1, k2")
    assert read_keys(f"file:{f}") == ["old-key", "new-key"]
    assert read_keys("env:ROUTER_KEYS") == ["k1", "k2"]
    ring = KeyRing([f"file:{f}", "env:ROUTER_KEYS", "lit"], "API")
    assert all(ring.accepts(f"Bearer {k}") for k in ("old-key", "new-key", "k1", "k2", "lit"))
    assert not any(ring.accepts(h) for h in (None, "", "Bearer", "Bearer nope", "Basic old-key", "old-key"))
    for bad in ("env:UNSET_VARIABLE_X", f"file:{tmp_path / 'missing'}", " "):
        with pytest.raises(AuthConfigError):
            read_keys(bad)


def test_keys_never_appear_in_the_config_repr() -> None:
    cfg = parse_args(
        ["--api-key", "sekrit-api", "--admin-key", "sekrit-admin", "--engine-api-key", "sekrit-e"]
    )
    assert cfg.api_keys == ("sekrit-api",) and "sekrit" not in repr(cfg)


async def start(cfg: RouterConfig) -> HANode:
    node = HANode(RouterServer(cfg))
    await node.start()
    return node


async def call(
    s: aiohttp.ClientSession, method: str, url: str, key: str | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.request(method, url, headers=headers, **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def test_api_admin_and_metrics_keys_guard_their_endpoints() -> None:
    cfg = RouterConfig(
        port=0,
        warmup_timeout=0,
        admin_port=0,
        metrics_port=0,
        api_keys=("api-1", "api-2"),
        admin_keys=("adm",),
        metrics_keys=("met",),
    )
    node = await start(cfg)
    base, admin, metrics = node.server.url, node.admin_url, node.metrics_url
    assert admin and metrics
    try:
        async with aiohttp.ClientSession() as s:
            st, body = await call(s, "POST", base + "/v1/completions", json={"model": "m", "prompt": "hi"})
            assert (
                st == 401 and body["error"]["code"] == 401 and "missing API key" in body["error"]["message"]
            )
            st, body = await call(s, "POST", base + "/generate", "wrong", json={"text": "hi"})
            assert st == 401 and "invalid API key" in body["error"]["message"]
            for key in ("api-1", "api-2"):  # both keys of a rotation work; no engine: 503 past the check
                assert (await call(s, "POST", base + "/generate", key, json={"text": "hi"}))[0] == 503
            assert (await call(s, "GET", base + "/v1/models", "api-1"))[0] == 200
            assert (await call(s, "GET", base + "/health"))[0] == 503  # open (no engine: 503, not 401)
            assert (await call(s, "GET", admin + "/health"))[0] == 200
            assert (await call(s, "GET", base + "/router/state", "api-1"))[0] == 401
            assert (await call(s, "GET", base + "/router/state", "adm"))[0] == 200
            assert (await call(s, "POST", admin + "/router/promote"))[0] == 401
            assert (await call(s, "POST", admin + "/router/promote", "api-1"))[0] == 401
            assert (await call(s, "POST", admin + "/router/promote", "adm"))[0] == 200
            assert (await call(s, "GET", base + "/metrics", "met"))[0] == 404  # moved to its own port
            assert (await call(s, "GET", metrics + "/metrics", "adm"))[0] == 401
            st, text = await call(s, "GET", metrics + "/metrics", "met")
            assert st == 200 and 'router_auth_rejected_total{ring="API"}' in text
    finally:
        await node.stop()


async def test_without_keys_everything_is_open_as_before() -> None:
    node = await start(RouterConfig(port=0, warmup_timeout=0))
    try:
        async with aiohttp.ClientSession() as s:
            assert (await call(s, "GET", node.server.url + "/router/state"))[0] == 200
            assert (await call(s, "GET", node.server.url + "/metrics"))[0] == 200
    finally:
        await node.stop()


async def test_client_key_is_dropped_before_the_engine_unless_asked() -> None:
    seen: list[str | None] = []

    async def engine(request: Any) -> Any:
        seen.append(request.headers.get("Authorization"))
        return aiohttp.web.json_response({"text": "x"})

    from router.auth import Access

    for cfg, want in (
        (RouterConfig(api_keys=("k",)), None),
        (RouterConfig(api_keys=("k",), forward_client_key=True), "Bearer k"),
        (RouterConfig(api_keys=("k",), engine_api_key="eng"), "Bearer eng"),
        (RouterConfig(), "Bearer k"),  # the router checks no key: passed through as before
    ):
        access = Access(cfg)
        app = aiohttp.web.Application(middlewares=[access.middleware])
        app.router.add_post("/generate", engine)
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s:
            assert (await call(s, "POST", f"http://127.0.0.1:{port}/generate", "k", json={}))[0] == 200
        await runner.cleanup()
        assert seen.pop() == want


# ------------------------------------------------------------------------------------------------- TLS


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 made now (``openssl``; the ``cryptography`` package is not needed)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_router_serves_https_and_verifies_https_engines(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    cfg = RouterConfig(port=0, warmup_timeout=0, admin_port=0, ssl_certfile=str(cert), ssl_keyfile=str(key))
    node = await start(cfg)
    try:
        assert node.server.url.startswith("https://") and (node.admin_url or "").startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as s:
            assert (await call(s, "GET", node.admin_url + "/health", ssl=trusted))[0] == 200  # type: ignore[operator]
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await call(s, "GET", node.server.url + "/v1/models")  # the system CAs do not know it
            with pytest.raises(aiohttp.ClientError):
                await call(s, "GET", node.server.url.replace("https", "http") + "/v1/models")
        # the router's own client side: trusts the engine CA given, refuses without it
        from router.auth import client_ssl

        with_ca = client_ssl(RouterConfig(engine_ca_file=str(cert)))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=with_ca)) as s:
            assert (await call(s, "GET", node.admin_url + "/health"))[0] == 200  # type: ignore[operator]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(RouterConfig()))) as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await call(s, "GET", node.admin_url + "/health")  # type: ignore[operator]
    finally:
        await node.stop()


# ------------------------------------------------------------------------------------ the VIP recipe


async def test_vip_recipe_standby_starts_with_admin_and_decisions_on_the_host_address() -> None:
    """The standby's --host is a virtual IP this machine does not hold (TEST-NET-1): its HTTP port
    cannot be bound until the VIP moves here, but its admin port and decision stream on the host's own
    address start, and a takeover attempt is refused by the address, not by a crash."""
    vip, port = "192.0.2.10", free_port()
    primary = await start(RouterConfig(host="127.0.0.2", port=port, warmup_timeout=0, admin_port=0))
    assert primary.publisher is not None
    sb_cfg = RouterConfig(
        host=vip,
        port=port,
        warmup_timeout=0,
        role="standby",
        primary_decisions=primary.publisher.endpoint,
        admin_port=0,
        admin_host="127.0.0.1",
        decisions_host="127.0.0.1",
        takeover="external",
    )
    standby = await start(sb_cfg)
    try:
        assert standby.publisher is not None and standby.publisher.endpoint.startswith("tcp://127.0.0.1:")
        assert await standby.wait_for_primary(10)
        async with aiohttp.ClientSession() as s:
            st, body = await call(s, "POST", standby.admin_url + "/router/promote")  # type: ignore[operator]
        assert st == 409 and body["role"] == "standby"  # EADDRNOTAVAIL: the VIP is not here
    finally:
        await standby.stop()
        await primary.stop()
    with pytest.raises(zmq.ZMQError):  # before: the decision stream bound --host, the VIP
        await start(RouterConfig(host=vip, port=port, warmup_timeout=0, role="standby",
                                 primary_decisions="tcp://127.0.0.1:1"))  # fmt: skip


# ----------------------------------------------------------------------------------------------- CURVE


def test_generated_keys_are_private_files(tmp_path: Path) -> None:
    keys = curve.generate_cluster_keys(tmp_path / "curve", ["router-0", "agent-0"])
    for p in (keys.server_secret, keys.secret_of("router-0"), keys.secret_of("agent-0")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "curve" / "secret").stat().st_mode) == 0o700
    assert sorted(p.name for p in keys.authorized.iterdir()) == ["agent-0.key", "router-0.key"]
    env = keys.env("router-0", server=True)
    cfg = curve.CurveConfig.from_env(env)
    assert cfg is not None and cfg.server_secret and cfg.secret and cfg.authorized == keys.authorized
    os.chmod(keys.secret_of("agent-0"), 0o644)
    with pytest.raises(curve.CurveError, match="readable by others"):
        curve.CurveConfig.from_env(keys.env("agent-0", server=False))


async def test_curve_admits_authorized_clients_only(tmp_path: Path) -> None:
    keys = curve.generate_cluster_keys(tmp_path / "curve", ["good"])
    intruder = curve.generate_cluster_keys(tmp_path / "other", ["bad"])
    good = curve.CurveConfig.from_env(keys.env("good", server=True))
    bad_env = keys.env(None, server=False) | {curve.ENV_SECRET: str(intruder.secret_of("bad"))}
    bad = curve.CurveConfig.from_env(bad_env)
    ctx = zmq.asyncio.Context()
    try:
        curve.set_current(good)
        pub = Publisher(ctx, "127.0.0.1", 0)
        subs = {}
        for name, cfg in (("good", good), ("bad", bad)):
            curve.set_current(cfg)
            sock = make_socket(ctx, zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(pub.endpoint)
            subs[name] = sock
        curve.set_current(None)
        plain = make_socket(ctx, zmq.SUB)  # no CURVE at all
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(pub.endpoint)
        subs["plain"] = plain
        got: dict[str, int] = {n: 0 for n in subs}
        for _ in range(40):
            pub.publish(b"t", b"secret prompt tokens")
            for n, sock in subs.items():
                while await sock.poll(5):
                    await sock.recv_multipart()
                    got[n] += 1
        assert got["good"] > 0 and got["bad"] == 0 and got["plain"] == 0, got
        for sock in subs.values():
            sock.close(0)
        pub.close()
    finally:
        curve.set_current(None)
        curve.release(ctx)
        ctx.destroy(0)


async def test_every_receiving_socket_has_a_maximum_message_size() -> None:
    ctx = zmq.asyncio.Context()
    try:
        for kind in (zmq.SUB, zmq.ROUTER, zmq.DEALER):
            sock = make_socket(ctx, kind, curve=False)
            assert sock.getsockopt(zmq.MAXMSGSIZE) > 0
            sock.close(0)
    finally:
        ctx.destroy(0)
    await asyncio.sleep(0)


async def test_launch_cluster_with_curve_routes_over_encrypted_streams(tmp_path: Path) -> None:
    """``launch cluster --curve``: every process gets its own key file (0600), the router and the
    standby still see the agents (so the streams work under CURVE) and a request is served."""
    import signal
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    cfile, logs = tmp_path / "cluster.json", tmp_path / "logs"
    cmd = [sys.executable, "-m", "launch", "cluster", "--instances", "1", "--port", "0", "--curve",
           "--cluster-file", str(cfile), "--log-dir", str(logs), "--time-scale", "0.05"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        deadline, out = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            out.append(line)
            if not line or line.startswith("router: "):
                break
        assert out[-1].startswith("router: "), "".join(out)
        assert any("CURVE keys:" in ln for ln in out)
        url = out[-1].split("router: ", 1)[1].strip()
        secret = logs / "curve" / "secret"
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secret.iterdir())
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                st, body = await call(s, "GET", url + "/health")
                if st == 200 and body["instances_routable"] >= 1:  # the agent's stream came through CURVE
                    break
                await asyncio.sleep(0.1)
            st, body = await call(
                s, "POST", url + "/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 2}}
            )
            assert st == 200, body
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
