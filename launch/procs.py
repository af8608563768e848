"""Child processes of the launcher: start, wait for their READY line, log their output, stop them all.

Each child runs ``python -m MODULE ARGS`` in its own process group (so a terminal's Ctrl-C reaches only
the launcher, which then stops children in dependency order), with ``PR_SET_PDEATHSIG`` on Linux so that
a launcher killed with SIGKILL still takes its children with it. stdout and stderr go to one log file
per child; the launcher scans stdout for the ``READY`` line (:mod:`kvindex.protocol.ready`).

:func:`start_cluster` is the other direction: a whole ``launch cluster`` as one child, for the
benchmarks (failover, chaos, overload) that start and kill clusters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kvindex.protocol.ready import Ready, parse_ready

log = logging.getLogger("launch")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildFailed(RuntimeError):
    """A child exited, or did not say READY in time. The message names it and points at its log."""


@dataclass
class Child:
    """One started child process. ``ready`` is set once its READY line was read."""

    role: str
    instance: str | None
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    ready: Ready | None = None
    _log: IO[str] | None = field(default=None, repr=False)
    _pump: asyncio.Task[None] | None = field(default=None, repr=False)
    _ready_evt: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def name(self) -> str:
        return self.role if self.instance is None else f"{self.role}[{self.instance}]"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Spawn the child (``sys.executable -m ...``) and start copying its output to its log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a", buffering=1)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._pump = asyncio.create_task(self._read_stdout(), name=f"pump-{self.name}")

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an over-long line: skip it, keep reading
            if not raw:
                break
            line = raw.decode(errors="replace")
            if self.ready is None and (r := parse_ready(line.strip())) is not None:
                self.ready = r
                self._ready_evt.set()
            if self._log:
                self._log.write(line)
        self._ready_evt.set()  # wake a waiter: the child is gone

    async def wait_ready(self, timeout: float) -> Ready:
        """Wait for the READY line.

        Raises:
            ChildFailed: the child exited first, or ``timeout`` seconds passed.
        """
        try:
            await asyncio.wait_for(self._ready_evt.wait(), timeout)
        except asyncio.TimeoutError:
            raise ChildFailed(
                f"{self.name} did not become ready within {timeout:.0f} s (log: {self.log_path})"
            ) from None
        if self.ready is None:
            if self.proc is not None:
                await self.proc.wait()
            code = self.proc.returncode if self.proc else None
            raise ChildFailed(
                f"{self.name} exited with code {code} before it was ready (log: {self.log_path})"
            )
        return self.ready

    async def wait_http_ready(self, health_url: str, endpoints: dict[str, str], timeout: float) -> Ready:
        """For children that print no READY line (a real SGLang server): poll ``health_url`` until 200.

        The returned (and recorded) :class:`Ready` carries ``endpoints`` as given.

        Raises:
            ChildFailed: the child exited first, or ``timeout`` seconds passed.
        """
        import aiohttp  # local: only this path needs an HTTP client

        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                if not self.alive:
                    code = self.proc.returncode if self.proc else None
                    raise ChildFailed(
                        f"{self.name} exited with code {code} before it was healthy (log: {self.log_path})"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(health_url) as r:
                        if r.status == 200:
                            break
                if asyncio.get_running_loop().time() > deadline:
                    raise ChildFailed(
                        f"{self.name} not healthy at {health_url} within {timeout:.0f} s (log: {self.log_path})"
                    )
                await asyncio.sleep(1.0)
        self.ready = Ready(self.role, self.instance, self.pid or 0, dict(endpoints))
        self._ready_evt.set()
        return self.ready

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout`` seconds. Idempotent."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._pump, 2.0)
        if self._log is not None:
            self._log.close()
            self._log = None


async def stop_all(children: list[Child], timeout: float = 5.0) -> None:
    """Stop children in reverse start order (routers before agents before engines)."""
    for c in reversed(children):
        await c.stop(timeout)


CLUSTER_READY_TIMEOUT = 180.0
"""Seconds a benchmark waits for its ``launch cluster`` child to be ready."""


async def start_cluster(
    args: argparse.Namespace, port: int, workdir: Path, extra: Sequence[str] = ()
) -> tuple[asyncio.subprocess.Process, Path]:
    """``python -m launch cluster`` for a benchmark: ``args.instances`` engines at ``args.time_scale`` on
    HTTP ``port`` (plus ``extra`` flags), cluster file and logs under ``workdir``, in a child process.
    Returns it and its cluster file once the launcher printed ``router: URL``.

    Raises:
        RuntimeError: the launcher exited, or was not ready within :data:`CLUSTER_CLUSTER_READY_TIMEOUT` s (it is
            stopped first).
    """
    cfile = workdir / "cluster.json"
    cmd = [
        sys.executable, "-m", "launch", "cluster", "--instances", str(args.instances), "--port", str(port),
        "--cluster-file", str(cfile), "--log-dir", str(workdir / "logs"), "--time-scale", str(args.time_scale),
        *extra,
    ]  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    errlog = (workdir / "launch.log").open("a")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=errlog, stdin=asyncio.subprocess.DEVNULL
    )
    errlog.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + CLUSTER_READY_TIMEOUT
    while True:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), max(deadline - time.monotonic(), 0.01))
        except asyncio.TimeoutError:
            line = b""
        if not line:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            await proc.wait()
            raise RuntimeError(f"launch cluster did not become ready (logs in {workdir})")
        if line.startswith(b"router: "):
            return proc, cfile
