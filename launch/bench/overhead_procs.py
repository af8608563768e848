"""The processes of ``python -m launch overhead-bench``: children pinned to the system-under-test CPUs, their
READY lines, the engines and agents every target shares (:class:`Rig`), each target's router, and their
CPU time and RSS read from ``/proc``."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvindex.protocol.ready import parse_ready
from launch.compare_live import _http, free_port, sglang_router_cmd, wait_routing

__all__ = ["Proc", "Rig", "cpu_seconds", "ready_endpoints", "rss_bytes", "spawn", "start_router"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants (all threads), in seconds; 0 if gone."""
    total = 0
    for p in (pid, *_descendants(pid)):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*/children") if Path(f"/proc/{p}").exists() else ():
            with contextlib.suppress(OSError, ValueError):
                kids = [int(x) for x in task.read_text().split()]
                out += kids
                todo += kids
    return out


def rss_bytes(pid: int) -> int:
    total = 0
    for p in (pid, *_descendants(pid)):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
    return total


@dataclass
class Proc:
    """One child of the benchmark, pinned to ``cpus``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def spawn(
    name: str, cmd: Sequence[str], cpus: set[int], log: Path, env: dict[str, str] | None = None
) -> Proc:
    def pin() -> None:  # in the child, before exec: every thread it starts inherits the CPU set
        os.sched_setaffinity(0, cpus)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # die with the benchmark

    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
            preexec_fn=pin,
        )
    return Proc(name, popen, log)


def ready_endpoints(proc: Proc, timeout: float) -> dict[str, str]:
    """The endpoints of ``proc``'s READY line (read from its log). Raises RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log.read_text(errors="replace").splitlines():
            r = parse_ready(line.strip())
            if r is not None:
                return r.endpoints
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} (log: {proc.log})")
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f} s (log: {proc.log})")


@dataclass
class Rig:
    """The engines (and, for ``ours``, agents) shared by every target."""

    sut: set[int]
    logs: Path
    timeout: float
    engines: list[Proc] = field(default_factory=list)
    engine_urls: list[str] = field(default_factory=list)
    agents: list[Proc] = field(default_factory=list)
    agent_pubs: list[str] = field(default_factory=list)

    def start_engines(self, n: int = 2) -> None:
        for i in range(n):
            cmd = [sys.executable, "-m", "agents.engine.server", "--port", "0", "--time-scale", "0",
                   "--log-level", "WARNING", "--max-total-tokens", "2000000"]  # fmt: skip
            p = spawn(f"engine{i}", cmd, self.sut, self.logs / f"engine{i}.log")
            self.engines.append(p)
            self.engine_urls.append(ready_endpoints(p, self.timeout)["http"])

    def start_agents(self) -> None:
        if self.agents:
            return
        for i, url in enumerate(self.engine_urls):
            cmd = [sys.executable, "-m", "agents.agent", "--engine-url", url, "--instance-id", f"e{i}",
                   "--log-level", "WARNING"]  # fmt: skip
            p = spawn(f"agent{i}", cmd, self.sut, self.logs / f"agent{i}.log")
            self.agents.append(p)
            self.agent_pubs.append(ready_endpoints(p, self.timeout)["pub"])

    def stop_agents(self) -> None:
        for p in self.agents:
            p.stop()
        self.agents, self.agent_pubs = [], []

    def stop(self) -> None:
        self.stop_agents()
        for p in self.engines:
            p.stop()

    def others_cpu(self) -> float:
        return sum(cpu_seconds(p.popen.pid) for p in (*self.engines, *self.agents))


def start_router(args: argparse.Namespace, target: str, rig: Rig, tok_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    env: dict[str, str] = {}
    if target == "sglang-router":
        cmd, env = sglang_router_cmd(args.sglang_venv, tok_dir, port, rig.engine_urls)
    else:
        cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
               "--policy", args.policy, "--decisions-port", "off", "--log-level", "WARNING",
               *args.router_arg]  # fmt: skip
        if target == "ours":
            cmd += [x for ep in rig.agent_pubs for x in ("--agent", ep)]
        else:
            cmd += ["--worker-urls", *rig.engine_urls]
        env = dict(kv.split("=", 1) for kv in args.router_env)
    proc = spawn(target, cmd, rig.sut, rig.logs / f"router-{target}.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_routing(url, args.ready_timeout, proc.popen)
        if target == "ours":
            wait_settled(url, args.ready_timeout)
    except RuntimeError:
        proc.stop()
        raise
    return proc, url


def wait_settled(url: str, timeout: float, polls: int = 4) -> None:
    """Until every instance is routable and the index's block count has not changed for ``polls``
    polls 0.5 s apart: the agents' snapshots of engines whose caches earlier cells filled are ingested
    before a cell is measured (the first cell's figures included seconds of snapshot ingest otherwise).
    Gives up quietly after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last, same = None, 0
    while time.monotonic() < deadline and same < polls:
        status, text = _http("GET", url + "/router/state")
        try:
            state = json.loads(text) if status == 200 else {}
        except ValueError:
            state = {}
        instances = state.get("instances", [])
        blocks = state.get("index", {}).get("total_blocks")
        ok = bool(instances) and all(i.get("routable") for i in instances)
        same = same + 1 if ok and blocks == last else 0
        last = blocks
        time.sleep(0.5)
