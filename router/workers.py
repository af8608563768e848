"""``python -m router --workers N``: one supervisor process, N worker routers on one HTTP port.

Theory of operation
-------------------
One router process decides and serves HTTP on one core, and the HTTP server, the client side and the
socket writes are most of its CPU a request (docs/overhead.md); the index walk is the smaller part. So
the request path scales by running it N times: N full routers, each on its own core, behind one port.

The supervisor (this module) reserves the HTTP port, starts N workers (``python -m router`` with the
same flags plus internal ones), waits for every worker's READY line, prints its own, and serves the
group's admin port (:mod:`router.workers_admin`: one ``/metrics`` with a ``worker`` label, ``/health``,
``/router/state``). Each worker:

- binds the HTTP port with ``SO_REUSEPORT``, so the kernel spreads new connections over the workers
  (by a hash of the connection's addresses: a keep-alive connection stays on one worker);
- is an *active* router (:mod:`router.active`): it subscribes to every agent, publishes its decisions on
  its own stream (a loopback port fixed for the supervisor's lifetime: ``--decisions-port D`` gives
  D, D + 1, ...; else free ports picked at start), and follows every other worker's stream, so each
  worker counts the others' dispatches as pending and their prompts as speculatively cached. Decisions
  are therefore consistent up to the decision stream's loopback delay (well under a millisecond; two
  workers may pick the same idle instance for requests that close together; docs/scale.md quantifies
  what that costs with ``launch simulate --routers K --router-delay S``). ``--decision-slot`` makes the
  workers take turns;
- serves its ``/metrics`` on a loopback port of its own and its admin port on loopback (both listed by
  the supervisor's ``/router/state``), and stops when the supervisor is gone (:mod:`router.worker_link`).

Lifecycle. SIGHUP to the supervisor reloads its keys and is passed on to every worker (key rotation,
docs/security.md). SIGINT/SIGTERM to the supervisor: SIGTERM to every worker, each drains and stops as a single
router does, one still running after :data:`STOP_GRACE` seconds is killed; then the supervisor exits 0.
A worker that exits on its own is restarted on the same ports (a warning and
``router_worker_restarts_total{worker}``; its peers reconnect to its stream and release its dispatches
meanwhile), after a back-off that grows while it keeps dying young. A worker that never becomes ready at
start makes the supervisor exit 1. The supervisor killed with SIGKILL: the workers stop by themselves.

High availability. The supervisor keeps a socket bound on the HTTP port (``SO_REUSEPORT`` without
``SO_REUSEADDR``, never listening: it takes no connections) for its whole life, so a standby
(``--role standby``, one process; ``--workers`` is refused for it) that follows the first worker's
decision stream (the READY line's ``decisions``) can bind the port only once the supervisor and every
worker are gone: takeover happens when the whole group is, not when one worker restarts. The standby
mirrors the first worker's dispatches only; the others' are covered by the agents' next load reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final

from kvindex.process import Stop, stop_signals
from kvindex.protocol.ready import Ready, announce_ready, parse_ready
from router import auth
from router.config import RouterConfig
from router.workers_admin import WorkersAdmin

__all__ = ["STOP_GRACE", "Supervisor", "WorkerFailed", "supervise"]

log = logging.getLogger("router.workers")

STOP_GRACE: Final = 10.0
"""Seconds a worker has to stop after SIGTERM before it is killed."""
RESTART_BACKOFF_MAX: Final = 10.0
"""Longest wait before restarting a worker that keeps dying young."""
YOUNG: Final = 10.0
"""A worker that exits within this many seconds of its start counts as dying young (back-off grows)."""


class WorkerFailed(OSError):
    """A worker exited or timed out before its READY line (an ``OSError``: a start failure)."""


@dataclass
class Worker:
    """One worker process and what the supervisor knows of it."""

    index: int
    decisions_port: int
    proc: asyncio.subprocess.Process | None = None
    ready: Ready | None = None
    started_at: float = 0.0
    restarts: int = 0
    young_deaths: int = 0
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def url(self, name: str) -> str | None:
        """The endpoint ``name`` of its READY line, None before it."""
        return None if self.ready is None else self.ready.endpoints.get(name)

    def state_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.proc.pid if self.proc is not None else None,
            "alive": self.alive,
            "ready": self.ready is not None,
            "restarts": self.restarts,
            "endpoints": dict(self.ready.endpoints) if self.ready is not None else {},
        }


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "*", "::") else host


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (never listening) on ``host:port`` with ``SO_REUSEPORT``, so the workers can bind
    it too and a router without ``SO_REUSEPORT`` cannot. Falls back to ``SO_REUSEADDR`` as well when a
    connection in TIME_WAIT holds the port. Raises ``OSError`` (the port is in use by another router)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for reuse_addr in (False, True):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if reuse_addr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            return sock
        except OSError:
            sock.close()
            if reuse_addr:
                raise
    raise AssertionError("unreachable")


def _free_ports(host: str, n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class Supervisor:
    """N worker routers and the group's admin port. Lifecycle: :meth:`start`, :meth:`run`, :meth:`stop`.

    ``argv``: the supervisor's own command line; each worker gets it plus overriding flags."""

    def __init__(self, cfg: RouterConfig, argv: list[str]) -> None:
        self.cfg = cfg
        self.argv = argv
        self.port = 0
        self.workers: list[Worker] = []
        self.admin = WorkersAdmin(self, cfg)
        self._reserved: socket.socket | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        """Readers of the workers' stdout."""
        self._keepers: list[asyncio.Task[None]] = []
        """One per worker: restarts it when it exits."""

    @property
    def url(self) -> str:
        return f"{auth.scheme(self.cfg)}://{self.cfg.host}:{self.port}"

    def worker_args(self, i: int) -> list[str]:
        """Worker ``i``'s command line: the supervisor's, then flags that override it (argparse keeps
        the last value of a flag; ``--peer-routers`` adds to the given ones)."""
        cfg = self.cfg
        host = _loopback(cfg.decisions_host or cfg.host)
        args = [*self.argv, "--workers", str(cfg.workers), "--role", "active", "--port", str(self.port)]
        args += ["--decisions-port", str(self.workers[i].decisions_port)]
        args += ["--admin-port", "0", "--admin-host", "127.0.0.1"]
        args += ["--metrics-port", "0", "--metrics-host", "127.0.0.1"]
        args += ["--worker-index", str(i), "--worker-of", str(os.getpid())]
        for w in self.workers:
            if w.index != i:
                args += ["--peer-routers", f"tcp://{host}:{w.decisions_port}"]
        if cfg.decision_slot > 0:
            args += ["--slot-index", str(i)]
        return args

    async def start(self, ready_timeout: float) -> None:
        """Reserve the port, start every worker and wait for their READY lines, then serve the admin
        port. Raises ``OSError`` (the port, the admin port) or :class:`WorkerFailed`."""
        cfg = self.cfg
        self._reserved = reserve_port(cfg.host, cfg.port)
        self.port = int(self._reserved.getsockname()[1])
        dhost = cfg.decisions_host or cfg.host
        if cfg.decisions_port:
            dports = [cfg.decisions_port + i for i in range(cfg.workers)]
        else:  # 0 or off: the workers need their streams to see each other's decisions
            dports = _free_ports(dhost, cfg.workers)
        self.workers = [Worker(i, d) for i, d in enumerate(dports)]
        for w in self.workers:
            await self._spawn(w)
        for w in self.workers:
            if not await self._wait_ready(w, ready_timeout):
                raise WorkerFailed(
                    f"worker {w.index} did not start (exit code {w.proc and w.proc.returncode})"
                )
        await self.admin.start()
        self._keepers = [
            asyncio.create_task(self._keep(w), name=f"keep-worker-{w.index}") for w in self.workers
        ]

    def endpoints(self) -> dict[str, str]:
        """The supervisor's READY endpoints: ``http``, ``decisions`` (the first worker's stream, what a
        standby follows), ``decisions_all`` (every worker's, comma-separated), ``admin``, ``metrics``."""
        eps = {"http": self.url}
        streams = [w.url("decisions") or "" for w in self.workers]
        eps["decisions"] = streams[0]
        eps["decisions_all"] = ",".join(streams)
        if self.admin.admin_url:
            eps["admin"] = self.admin.admin_url
        if self.admin.metrics_url:
            eps["metrics"] = self.admin.metrics_url
        return eps

    def state_json(self) -> dict[str, Any]:
        """``GET /router/state`` on the supervisor's admin port."""
        return {
            "supervisor": {"pid": os.getpid(), "http": self.url, "role": self.cfg.role},
            "workers": [w.state_json() for w in self.workers],
        }

    async def _spawn(self, w: Worker) -> None:
        w.ready = None
        w.ready_event = asyncio.Event()
        w.started_at = time.monotonic()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            *self.worker_args(w.index),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._read(w, w.proc), name=f"read-worker-{w.index}"))

    async def _read(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        """Worker stdout: its READY line is taken, everything else passed on to ours."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace")
            ready = parse_ready(text)
            if ready is not None and w.proc is proc:
                w.ready = ready
                w.ready_event.set()
            else:
                sys.stdout.write(text)
                sys.stdout.flush()

    async def _wait_ready(self, w: Worker, timeout: float) -> bool:
        assert w.proc is not None
        waits = [asyncio.ensure_future(w.ready_event.wait()), asyncio.ensure_future(w.proc.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        return w.ready is not None and w.alive

    async def _keep(self, w: Worker) -> None:
        """Restart ``w`` whenever it exits, until the supervisor stops."""
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping:
                return
            young = time.monotonic() - w.started_at < YOUNG
            w.young_deaths = w.young_deaths + 1 if young else 0
            delay = min(RESTART_BACKOFF_MAX, 0.1 * 2**w.young_deaths) if young else 0.0
            if code == 0:  # it was asked to stop: a Ctrl-C or a killpg reaches the supervisor too
                delay = max(delay, 0.5)
            log.warning(
                "worker %d (pid %d) exited with code %s; restarting it in %.1f s",
                w.index,
                w.proc.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            w.restarts += 1
            self.admin.restarts.labels(str(w.index)).inc()
            await self._spawn(w)
            if await self._wait_ready(w, max(60.0, self.cfg.warmup_timeout + 30.0)):
                log.warning("worker %d restarted (pid %d, restart %d)", w.index, w.proc.pid, w.restarts)
            elif w.alive:
                w.proc.kill()  # not ready in time: the next round restarts it

    def reload_keys(self) -> None:
        """SIGHUP: re-read the supervisor's keys (on error the old ones stay) and pass SIGHUP on to every
        worker, which reloads its own. Never raises."""
        try:
            self.admin.access.reload()
        except auth.AuthConfigError as exc:
            log.error("SIGHUP: keys not reloaded, the old ones stay: %s", exc)
        for w in self.workers:
            if w.proc is not None and w.alive:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        """SIGTERM every worker, kill those still running after :data:`STOP_GRACE`, close the admin
        port and the reserved socket. Idempotent."""
        self._stopping = True
        for t in self._keepers:  # no restart from here on
            t.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        self._keepers.clear()
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_GRACE)
            for p in procs:
                if p.returncode is None:
                    log.error("worker pid %d did not stop in %g s; killing it", p.pid, STOP_GRACE)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.admin.stop()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None


async def supervise(cfg: RouterConfig, argv: list[str], *, stop: asyncio.Event | None = None) -> None:
    """Run ``cfg.workers`` workers until SIGINT/SIGTERM (or ``stop``), then stop them all. Prints the
    READY line (role ``router-primary`` or ``router-active``) once every worker is ready. Raises
    ``OSError`` (:class:`WorkerFailed` included) when the group cannot start."""
    sup = Supervisor(cfg, argv)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, sup.reload_keys)
    async with stop_signals(Stop(stop) if stop is not None else None) as stopped:
        starting = asyncio.ensure_future(sup.start(ready_timeout=max(60.0, cfg.warmup_timeout + 30.0)))
        asked = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({starting, asked}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # raises what the start raised
                log.info("%d router workers serve %s (admin %s)", cfg.workers, sup.url, sup.admin.admin_url)
                announce_ready(f"router-{cfg.role}", sup.endpoints())
                await asked
            log.info("stopping %d router workers", cfg.workers)
        finally:
            for t in (starting, asked):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            await sup.stop()
