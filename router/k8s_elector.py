"""A Kubernetes Lease elector for a router pair: a sidecar that promotes its pod's router when it wins.

Theory of operation
-------------------
Each router pod runs its router with ``--role standby --takeover external --exit-when-fenced`` and this
elector beside it. The electors campaign for one ``coordination.k8s.io/v1`` Lease through the official
client's leader election (``kubernetes.leaderelection`` with its ``LeaseLock``: the API server's
optimistic concurrency on the Lease object is the consensus; nothing here votes). The one that acquires
the Lease:

1. calls ``POST /router/promote`` on its router's admin port until it answers 200 (the router binds the
   HTTP port in the pod, takes the fencing epoch ``1 +`` the highest it has seen, and serves);
2. answers its own readiness probe (``GET /healthz`` on ``--status-port``) with 200.

A pod is Ready only when *all* its containers are, so the clients' Service selects a pod only while its
router serves the HTTP port **and** its elector holds the Lease. An elector that cannot renew within the
renew deadline stops leading: its probe fails at once (the Service drops the pod within a probe period)
and the process exits 1 so that the container restarts as a candidate. Its router keeps the port until
the new leader's router, promoted with a higher epoch, is seen on the decision stream: then it steps
down (:mod:`router.fence`) and exits (``--exit-when-fenced``), and the pod restarts it as a standby.

Limits of the Python client (kubernetes 37): ``retry_period`` and ``renew_deadline`` must be at least
1 s and ``lease_duration > renew_deadline > 1.2 x retry_period``, so the fastest legal settings give a
takeover of about ``lease_duration`` + a retry period + a readiness period (seconds, not the 2 s lease /
0.2 s retry client-go allows). The Lease's ``leaseTransitions`` is not incremented by this client, so the
router's own epoch (not a Lease field) fences.

``kubernetes`` (the ``k8s`` extra) is imported only in :func:`run`, so the pure parts (flags, the
promotion call, the status server) load and are tested without it and without a cluster.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ElectorConfig", "Leadership", "main", "parse_args", "promote", "run", "serve_status"]

log = logging.getLogger("router.k8s_elector")


@dataclass(frozen=True)
class ElectorConfig:
    """The elector's settings. Times in seconds (the official client's rules: ``retry_period >= 1``,
    ``lease_duration > renew_deadline > 1.2 x retry_period``). ``admin_key`` is a key *spec* as the
    router takes it (``env:NAME``, ``file:PATH`` or the key), sent as a Bearer token."""

    lease: str = "router-leader"
    namespace: str = "default"
    identity: str = ""
    promote_url: str = "http://127.0.0.1:30080/router/promote"
    lease_duration: float = 3.0
    renew_deadline: float = 2.0
    retry_period: float = 1.0
    status_host: str = "127.0.0.1"
    status_port: int = 30081
    promote_timeout: float = 30.0
    admin_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("the elector needs an --identity (the pod's name)")
        if self.retry_period < 1 or not self.lease_duration > self.renew_deadline > 1.2 * self.retry_period:
            raise ValueError(
                "need retry_period >= 1 and lease_duration > renew_deadline > 1.2 x retry_period "
                f"(kubernetes.leaderelection's rules), got {self.lease_duration}/{self.renew_deadline}/"
                f"{self.retry_period}"
            )


class Leadership:
    """Whether this elector leads and its router was promoted (what the readiness probe says). Thread
    safe: the election runs in threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leading = False
        self.promoted_at: float | None = None

    def set(self, leading: bool) -> None:
        with self._lock:
            self._leading = leading
            if leading:
                self.promoted_at = time.time()

    def leading(self) -> bool:
        with self._lock:
            return self._leading


def _key(spec: str | None) -> str | None:
    if not spec:
        return None
    if spec.startswith("env:"):
        return os.environ.get(spec[4:], "").split(",")[0].strip() or None
    if spec.startswith("file:"):
        with open(spec[5:]) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        return lines[0] if lines else None
    return spec


def promote(
    url: str, timeout: float, key: str | None = None, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """``POST url`` (the router's ``/router/promote``) until it answers 200, for at most ``timeout``
    seconds; returns the router's JSON answer (``role``, ``url``). Raises ``TimeoutError`` with the last
    answer or error when it never did (the router is down, or its port stays in use: 409)."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    last = ""
    delay = 0.05
    while True:
        req = urllib.request.Request(url, data=b"{}", method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=2.0) as r:
                out: dict[str, Any] = json.loads(r.read() or b"{}")
                return out
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200].decode(errors='replace')}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() + delay > deadline:
            raise TimeoutError(f"the router did not take over within {timeout:g} s: {last}")
        sleep(delay)
        delay = min(delay * 2, 1.0)


def serve_status(host: str, port: int, leadership: Leadership) -> ThreadingHTTPServer:
    """Start (in a daemon thread) ``GET /healthz``: 200 ``leader`` while leading and promoted, else 503.
    Returns the server (``server_address`` has the bound port; ``shutdown()`` stops it). Raises
    ``OSError`` if the port cannot be bound."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self.send_error(404)
                return
            ok = leadership.leading()
            body = b"leader\n" if ok else b"candidate\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    srv = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=srv.serve_forever, name="elector-status", daemon=True).start()
    return srv


def run(cfg: ElectorConfig, leadership: Leadership, lock: Any = None) -> None:
    """Campaign for the Lease and lead until it is lost (returns then). ``lock``: a lock object with
    ``kubernetes.leaderelection``'s lock interface (default: the official ``LeaseLock`` on the in-cluster
    or kubeconfig credentials). Raises ``ImportError`` without the ``kubernetes`` package."""
    # Imported as plain modules (typed Any): the client ships no type hints, and mypy runs both with and
    # without it installed.
    electionconfig: Any = importlib.import_module("kubernetes.leaderelection.electionconfig")
    leaderelection: Any = importlib.import_module("kubernetes.leaderelection.leaderelection")
    if lock is None:
        kconfig: Any = importlib.import_module("kubernetes.config")
        leaselock: Any = importlib.import_module("kubernetes.leaderelection.resourcelock.leaselock")
        try:
            kconfig.load_incluster_config()
        except kconfig.ConfigException:
            kconfig.load_kube_config()
        lock = leaselock.LeaseLock(cfg.lease, cfg.namespace, cfg.identity)
    key = _key(cfg.admin_key)

    def started() -> None:
        answer = promote(cfg.promote_url, cfg.promote_timeout, key)  # raising stops leading
        leadership.set(True)
        log.warning(
            "%s leads Lease %s/%s: router promoted: %s", cfg.identity, cfg.namespace, cfg.lease, answer
        )

    def stopped() -> None:
        leadership.set(False)
        log.error("%s lost Lease %s/%s: no longer Ready; exiting", cfg.identity, cfg.namespace, cfg.lease)

    ec = electionconfig.Config(
        lock, cfg.lease_duration, cfg.renew_deadline, cfg.retry_period, started, stopped
    )
    leaderelection.LeaderElection(ec).run()
    leadership.set(False)


def parse_args(argv: Sequence[str] | None = None) -> ElectorConfig:
    """``python -m router.k8s_elector``'s flags as an :class:`ElectorConfig` (exits 2 on a bad value)."""
    d = ElectorConfig(identity="-")
    p = argparse.ArgumentParser(
        prog="python -m router.k8s_elector",
        description="Kubernetes Lease elector for a router pair: the pod that holds the Lease has its "
        "router promoted (POST /router/promote) and reports Ready on --status-port (docs/ha.md).",
    )
    p.add_argument("--lease", default=d.lease, help="the Lease's name (one per router pair)")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", d.namespace), help="its namespace")
    p.add_argument(
        "--identity", default=os.environ.get("POD_NAME", ""), help="this candidate (the pod's name)"
    )
    p.add_argument("--promote-url", default=d.promote_url, help="the router's POST /router/promote URL")
    p.add_argument(
        "--admin-key", default=None, metavar="KEY", help="the router's admin key (env:NAME, file:PATH)"
    )
    p.add_argument(
        "--lease-duration", type=float, default=d.lease_duration, metavar="S", help="Lease duration"
    )
    p.add_argument(
        "--renew-deadline", type=float, default=d.renew_deadline, metavar="S", help="renew deadline"
    )
    p.add_argument("--retry-period", type=float, default=d.retry_period, metavar="S", help="retry period")
    p.add_argument(
        "--status-host",
        default=d.status_host,
        help="address of the readiness endpoint (the pod IP in the manifests: the kubelet probes it)",
    )
    p.add_argument("--status-port", type=int, default=d.status_port, help="GET /healthz: 200 while leading")
    p.add_argument(
        "--promote-timeout", type=float, default=d.promote_timeout, metavar="S",
        help="give up leading if the router is not promoted within this long",
    )  # fmt: skip
    ns = p.parse_args(argv)
    try:
        return ElectorConfig(
            lease=ns.lease,
            namespace=ns.namespace,
            identity=ns.identity,
            promote_url=ns.promote_url,
            lease_duration=ns.lease_duration,
            renew_deadline=ns.renew_deadline,
            retry_period=ns.retry_period,
            status_host=ns.status_host,
            status_port=ns.status_port,
            promote_timeout=ns.promote_timeout,
            admin_key=ns.admin_key,
        )
    except ValueError as exc:
        p.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the elector; returns 1 once the Lease is lost (the container restarts as a candidate)."""
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    leadership = Leadership()
    srv = serve_status(cfg.status_host, cfg.status_port, leadership)
    try:
        run(cfg, leadership)
    finally:
        srv.shutdown()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
