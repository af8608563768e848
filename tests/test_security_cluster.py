"""Keys across the cluster (docs/security.md): ``launch cluster --api-key/--admin-key/--metrics-key``,
the metrics daemon's key, ``launch replay --api-key``.

The pure layer checks how :mod:`launch.keys` hands keys to children (never on a command line); the
daemon runs in-process on an OS-assigned port; the cluster test runs the real launcher with one emulated
engine, each key from a different source (file, variable, flag), and a takeover after the primary is
killed (the launcher checks it on the standby's admin port, with the admin key).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from launch.keys import KEY_ENV, ClusterAuth, client_api_key
from router.auth import AuthConfigError
from router.metricsd import MetricsDaemon, MetricsdConfig, parse_args
from tests.launched import launched_cluster

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

API, ADMIN, METRICS = "api-sekrit-1", "admin-sekrit-2", "metrics-sekrit-3"


async def call(
    s: aiohttp.ClientSession, method: str, url: str, key: str | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with s.request(method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=10), **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


# ------------------------------------------------------------------------------------------ pure


def test_children_get_key_files_by_path_and_keys_by_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyfile = tmp_path / "api-keys"
    keyfile.write_text(API + "\n")
    monkeypatch.setenv("MY_ADMIN", ADMIN)
    auth = ClusterAuth(api=(f"file:{keyfile}",), admin=("env:MY_ADMIN",), metrics=(METRICS,))
    auth.check()
    r = auth.for_router()
    assert r.args == (
        "--api-key", f"file:{keyfile}", "--admin-key", "env:MY_ADMIN", "--metrics-key", f"env:{KEY_ENV['metrics']}",
    )  # fmt: skip
    assert r.env == {KEY_ENV["metrics"]: METRICS}
    assert auth.for_metrics().args == ("--metrics-key", f"env:{KEY_ENV['metrics']}")
    # another machine (--ray) shares neither files nor variables: every key by value
    remote = auth.for_router(by_value=True)
    assert remote.env == {KEY_ENV["api"]: API, KEY_ENV["admin"]: ADMIN, KEY_ENV["metrics"]: METRICS}
    assert not any(k in " ".join(remote.args) for k in (API, ADMIN, METRICS))
    assert "sekrit" not in repr(auth) + repr(remote)
    # fallbacks as the router's: the daemon takes the admin ring, then the API ring
    assert ClusterAuth(api=(API,)).for_metrics().env == {KEY_ENV["metrics"]: API}
    assert ClusterAuth(api=(API,)).client_key("admin") == API
    assert ClusterAuth().client_key("admin") is None and not ClusterAuth().for_router().args
    with pytest.raises(AuthConfigError):
        ClusterAuth(admin=("env:UNSET_VARIABLE_Y",)).check()


def test_replay_key_from_flag_else_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV["api"], raising=False)
    assert client_api_key(None) is None
    monkeypatch.setenv(KEY_ENV["api"], f"{API},other")
    assert client_api_key(None) == API
    assert client_api_key("given") == "given"
    with pytest.raises(AuthConfigError):
        client_api_key("file:/nonexistent/key")


# ------------------------------------------------------------------------------- metrics daemon


async def test_metrics_daemon_key_guards_metrics_not_health() -> None:
    assert parse_args([]).host == "127.0.0.1" and parse_args([]).metrics_keys == ()
    cfg = parse_args(["--port", "0", "--metrics-key", METRICS, "--metrics-key", "second"])
    assert "sekrit" not in repr(cfg)
    daemon = MetricsDaemon(cfg)
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as s:
            st, body = await call(s, "GET", daemon.url + "/metrics")
            assert (
                st == 401
                and body["error"]["code"] == 401
                and "missing metrics key" in body["error"]["message"]
            )
            st, body = await call(s, "GET", daemon.url + "/metrics", "wrong")
            assert st == 401 and "invalid metrics key" in body["error"]["message"]
            for key in (METRICS, "second"):
                st, text = await call(s, "GET", daemon.url + "/metrics", key)
                assert st == 200 and "lmetric_primaries" in text
            assert (await call(s, "GET", daemon.url + "/health"))[0] == 200
    finally:
        await daemon.stop()


async def test_metrics_daemon_without_key_is_open() -> None:
    daemon = MetricsDaemon(MetricsdConfig(port=0))
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as s:
            assert (await call(s, "GET", daemon.url + "/metrics"))[0] == 200
    finally:
        await daemon.stop()


# ------------------------------------------------------------------------------------ the cluster


class KeyedCluster:
    def __init__(self, proc: subprocess.Popen[str], cfile: Path, logs: Path, lines: list[str]) -> None:
        self.proc, self.cfile, self.logs, self.lines = proc, cfile, logs, lines

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cfile.read_text())
        return data

    def role(self, role: str) -> dict[str, Any]:
        return next(p for p in self.info()["processes"] if p["role"] == role and p["status"] == "running")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedCluster]:
    tmp = tmp_path_factory.mktemp("keyed")
    cfile, logs, keyfile = tmp / "cluster.json", tmp / "logs", tmp / "api-keys"
    keyfile.write_text(f"# the API keys\n{API}\n")
    keyfile.chmod(0o600)
    args = [
        "--instances", "1", "--port", "0",
        "--cluster-file", str(cfile), "--log-dir", str(logs), "--time-scale", "0.05",
        "--api-key", f"file:{keyfile}", "--admin-key", "env:TEST_ADMIN_KEY", "--metrics-key", METRICS,
    ]  # fmt: skip
    env = dict(os.environ, TEST_ADMIN_KEY=ADMIN)
    env.pop(KEY_ENV["api"], None)
    with launched_cluster(args, logs, env=env) as (proc, lines):
        yield KeyedCluster(proc, cfile, logs, lines)


async def _routable(s: aiohttp.ClientSession, url: str) -> None:
    for _ in range(100):
        st, body = await call(s, "GET", url + "/health")  # open: no key
        if st == 200 and body["instances_routable"] >= 1:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never had a routable instance")


async def test_keyed_cluster_rejects_without_key_and_serves_with_it(keyed: KeyedCluster) -> None:
    url = keyed.info()["router"]
    gen = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}
    async with aiohttp.ClientSession() as s:
        await _routable(s, url)
        st, body = await call(s, "POST", url + "/generate", json=gen)
        assert st == 401 and body["error"] == {
            "message": "missing API key: send 'Authorization: Bearer <key>'",
            "type": "invalid_request_error",
            "param": None,
            "code": 401,
        }
        assert (await call(s, "POST", url + "/generate", ADMIN, json=gen))[0] == 401
        st, body = await call(s, "POST", url + "/generate", API, json=gen)
        assert st == 200, body
        # both routers hold the admin key: /router/* on the standby's admin port
        admin = keyed.role("router-standby")["endpoints"]["admin"]
        assert (await call(s, "GET", admin + "/router/state", API))[0] == 401
        st, state = await call(s, "GET", admin + "/router/state", ADMIN)
        assert st == 200 and state["ha"]["role"] == "standby"
        # the daemon's /metrics takes the metrics key only
        murl = keyed.info()["metrics"]
        assert (await call(s, "GET", murl + "/metrics"))[0] == 401
        assert (await call(s, "GET", murl + "/metrics", ADMIN))[0] == 401
        assert (await call(s, "GET", murl + "/metrics", METRICS))[0] == 200
        assert (await call(s, "GET", murl + "/health"))[0] == 200
    # no key on any child's command line, in the launcher's output or in a log
    for p in keyed.info()["processes"]:
        if p.get("pid") and p["status"] == "running":
            argv = Path(f"/proc/{p['pid']}/cmdline").read_bytes().decode(errors="replace")
            assert "sekrit" not in argv, (p["role"], argv)
    assert "sekrit" not in "".join(keyed.lines)
    assert not [f.name for f in keyed.logs.glob("*.log") if "sekrit" in f.read_text(errors="replace")]
    assert any(ln.startswith("keys: api, admin, metrics set") for ln in keyed.lines)


def test_keyed_cluster_replay_with_api_key(keyed: KeyedCluster, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 50 * i, "input_length": 64, "output_length": 2, "hash_ids": [0, 1 + i]}
        for i in range(3)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    base = [sys.executable, "-m", "launch", "replay", "--trace", str(trace), "--url", keyed.info()["router"]]
    base += ["--summary-json", str(summary), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV["api"]}
    r = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and json.loads(summary.read_text())["failed"] == 3  # no key: every request 401
    r = subprocess.run([*base, "--api-key", "env:REPLAY_KEY"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=dict(env, REPLAY_KEY=API))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        base, cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(env, **{KEY_ENV["api"]: API})
    )
    assert r.returncode == 0 and json.loads(summary.read_text())["failed"] == 0, r.stdout + r.stderr


async def test_keyed_cluster_takeover_is_seen_with_the_admin_key(keyed: KeyedCluster) -> None:
    """Kill the primary: the launcher confirms the takeover on the standby's admin port (keyed) and
    starts a new standby; the new primary serves with the same keys. Runs last (it changes the pair)."""
    standby = keyed.role("router-standby")
    os.kill(keyed.role("router-primary")["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        roles = {p["pid"]: p["role"] for p in keyed.info()["processes"] if p["status"] == "running"}
        if roles.get(standby["pid"]) == "router-primary" and "router-standby" in roles.values():
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"no takeover recorded: {keyed.info()['processes']}")
    url = keyed.info()["router"]
    async with aiohttp.ClientSession() as s:
        await _routable(s, url)
        gen = {"text": "again", "sampling_params": {"max_new_tokens": 2}}
        assert (await call(s, "POST", url + "/generate", json=gen))[0] == 401
        assert (await call(s, "POST", url + "/generate", API, json=gen))[0] == 200
        admin = keyed.role("router-standby")["endpoints"]["admin"]
        assert (await call(s, "GET", admin + "/router/state", ADMIN))[0] == 200
