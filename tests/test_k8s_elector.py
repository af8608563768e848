"""The Kubernetes Lease elector (router/k8s_elector.py), without a Kubernetes API server.

No cluster is reachable from the test machines, so the official client's ``LeaseLock`` (which talks to
the API server) is not exercised here. What is: the flags and the client's timing rules; the promotion
call against a stub admin port (409 while the port is in use, then 200); the readiness endpoint; and the
official ``kubernetes.leaderelection.LeaderElection`` loop itself, run by two electors in threads over an
in-memory lock with the ``LeaseLock`` interface and the API server's optimistic concurrency (an update
based on a stale read fails): one leads and promotes its router; when its renewals fail it stops leading
(Ready goes 503) and the other takes the Lease over and promotes its own.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from router.k8s_elector import ElectorConfig, Leadership, parse_args, promote, run, serve_status

pytestmark = pytest.mark.timeout(60)


def test_flags_and_the_clients_timing_rules() -> None:
    cfg = parse_args(["--identity", "router-0", "--namespace", "lm", "--lease", "pair-a"])
    assert cfg == ElectorConfig(lease="pair-a", namespace="lm", identity="router-0")
    with pytest.raises(SystemExit):  # the Python client needs retry_period >= 1
        parse_args(["--identity", "r", "--retry-period", "0.2"])
    with pytest.raises(SystemExit):
        parse_args(["--identity", "r", "--lease-duration", "2", "--renew-deadline", "2"])
    with pytest.raises(ValueError):
        ElectorConfig(identity="")


class StubAdmin:
    """A router's admin port: ``/router/promote`` answers 409 ``busy`` times, then 200."""

    def __init__(self, busy: int = 0) -> None:
        self.busy = busy
        self.calls = 0
        stub = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stub.calls += 1
                ok = stub.calls > stub.busy
                body = json.dumps({"role": "primary" if ok else "standby"}).encode()
                self.send_response(200 if ok else 409)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/router/promote"

    def close(self) -> None:
        self.srv.shutdown()


def test_promote_retries_until_the_router_answers_200_and_gives_up_at_the_timeout() -> None:
    admin = StubAdmin(busy=2)
    try:
        assert promote(admin.url, timeout=5)["role"] == "primary" and admin.calls == 3
        admin.calls, admin.busy = 0, 10**6
        with pytest.raises(TimeoutError, match="409"):
            promote(admin.url, timeout=0.3)
    finally:
        admin.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_readiness_follows_leadership() -> None:
    lead = Leadership()
    srv = serve_status("127.0.0.1", 0, lead)
    url = f"http://127.0.0.1:{srv.server_address[1]}/healthz"
    try:
        assert _status(url) == 503
        lead.set(True)
        assert _status(url) == 200 and lead.promoted_at is not None
        lead.set(False)
        assert _status(url) == 503
    finally:
        srv.shutdown()


class Store:
    """One Lease object: a record and a resource version, as the API server keeps it."""

    def __init__(self) -> None:
        self.mu = threading.Lock()
        self.record: Any = None
        self.version = 0


class MemoryLock:
    """``LeaseLock``'s interface (get / create / update, name, namespace, identity) over a :class:`Store`;
    an update based on a stale read fails (409), as ``replace_namespaced_lease`` does. ``cut`` makes every
    call fail, as an unreachable API server does."""

    def __init__(self, store: Store, identity: str) -> None:
        self.store, self.identity = store, identity
        self.name, self.namespace = "router-leader", "lmetric"
        self.read_version = -1
        self.cut = False

    def get(self, name: str, namespace: str) -> tuple[bool, Any]:
        if self.cut:
            return False, SimpleNamespace(body=json.dumps({"code": 503}), reason="unreachable")
        with self.store.mu:
            if self.store.record is None:
                return False, SimpleNamespace(body=json.dumps({"code": 404}), reason="NotFound")
            self.read_version = self.store.version
            return True, copy.copy(self.store.record)

    def create(self, name: str, namespace: str, election_record: Any) -> bool:
        with self.store.mu:
            if self.cut or self.store.record is not None:
                return False
            self.store.record = copy.copy(election_record)
            self.store.version += 1
            self.read_version = self.store.version
            return True

    def update(self, name: str, namespace: str, updated_record: Any) -> bool:
        with self.store.mu:
            if self.cut or self.read_version != self.store.version:
                return False
            self.store.record = copy.copy(updated_record)
            self.store.version += 1
            self.read_version = self.store.version
            return True


def _wait(pred: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_official_leader_election_promotes_one_router_and_fails_over_when_renewals_stop() -> None:
    pytest.importorskip("kubernetes.leaderelection", reason="the k8s extra (pip install -e '.[k8s]')")
    store = Store()
    admins = {n: StubAdmin() for n in ("router-0", "router-1")}
    locks = {n: MemoryLock(store, n) for n in admins}
    leads = {n: Leadership() for n in admins}
    cfgs = {
        n: ElectorConfig(identity=n, promote_url=admins[n].url, lease_duration=2, renew_deadline=1.5)
        for n in admins
    }
    threads = {
        n: threading.Thread(target=run, args=(cfgs[n], leads[n], locks[n]), daemon=True) for n in admins
    }
    try:
        threads["router-0"].start()
        _wait(lambda: leads["router-0"].leading(), "router-0 leads")
        threads["router-1"].start()
        time.sleep(2.5)  # router-1 campaigns for longer than a lease: the holder keeps renewing
        assert not leads["router-1"].leading() and admins["router-1"].calls == 0
        assert admins["router-0"].calls == 1
        t0 = time.monotonic()
        locks["router-0"].cut = True  # router-0's API server connection is gone
        _wait(lambda: not leads["router-0"].leading(), "router-0 stops leading")
        threads["router-0"].join(10)
        assert not threads["router-0"].is_alive()  # run() returned: main() exits 1
        _wait(lambda: leads["router-1"].leading(), "router-1 takes over")
        print(f"Lease failover with the in-memory lock: {time.monotonic() - t0:.2f} s")
        assert admins["router-1"].calls == 1 and store.record.holder_identity == "router-1"
    finally:
        for lk in locks.values():
            lk.cut = True
        for t in threads.values():
            if t.is_alive():
                t.join(10)
        for a in admins.values():
            a.close()
