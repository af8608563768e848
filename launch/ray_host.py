"""The Ray side of ``launch cluster --ray``: :class:`NodeHost`, the actor that runs children on its node, and
:class:`RemoteChild`, the launcher's handle on a child living in one; plus the few calls into Ray itself
(``ray`` is imported at run time only, being optional). :mod:`launch.ray_cluster` places and supervises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvindex.protocol.ready import Ready
from launch.placement import RayNode
from launch.procs import Child, ChildFailed

__all__ = ["NodeHost", "RemoteChild", "as_future", "first_line", "list_nodes", "ray_module"]


class NodeHost:
    """A Ray actor (made remote at run time, Ray being optional) that runs children on its node.

    Every method is a coroutine of the actor's event loop; children are keyed by a name the launcher
    gives. ``start`` raises :class:`ChildFailed` as the local launcher would.
    """

    def __init__(self) -> None:
        self.children: dict[str, Child] = {}

    async def where(self) -> dict[str, str]:
        """This node's Ray id and address (what endpoints advertise). Does not mutate."""
        ray = ray_module()
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    async def free_ports(self, n: int, host: str) -> list[int]:
        """``n`` ports free on this node (for a real SGLang server's four sockets)."""
        from launch.sglang_engines import free_ports

        return free_ports(n, host)

    async def start(self, key: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Start child ``key`` (``spec``: role, instance, args, log, env, timeout, and for a server that
        prints no READY line ``health``, the URL to poll, with ``endpoints``) and wait until it is ready.
        Returns its READY content. Mutates the host's children.

        Raises:
            ChildFailed: it exited or timed out first.
        """
        old = self.children.pop(key, None)
        if old is not None:
            await old.stop()
        c = Child(spec["role"], spec["instance"], list(spec["args"]), Path(spec["log"]), dict(spec["env"]))
        self.children[key] = c
        await c.start()
        if spec.get("health"):
            r = await c.wait_http_ready(spec["health"], spec["endpoints"], spec["timeout"])
        else:
            r = await c.wait_ready(spec["timeout"])
        return {"role": r.role, "instance": r.instance, "pid": c.pid or r.pid, "endpoints": r.endpoints}

    async def poll(self) -> dict[str, int | None]:
        """Each child's exit code, None while it runs. Does not mutate."""
        return {k: (c.proc.returncode if c.proc else None) for k, c in self.children.items()}

    async def stop(self, key: str, timeout: float = 5.0) -> None:
        """Stop child ``key`` (SIGTERM, then SIGKILL); no error if it is unknown or gone."""
        c = self.children.pop(key, None)
        if c is not None:
            await c.stop(timeout)


@dataclass
class RemoteChild(Child):
    """A :class:`Child` whose process runs on a Ray node, started by ``host`` (a NodeHost actor handle).

    ``pid`` is the process id on that node; ``alive`` is what the supervisor's last poll said.
    """

    host: Any = None
    key: str = ""
    node: RayNode | None = None
    exit_code: int | None = None
    health: str | None = None  # a real SGLang server: poll this URL instead of waiting for READY
    endpoints_hint: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0
    _ref: Any = field(default=None, repr=False)
    _started: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self.ready.pid if self.ready else None

    @property
    def alive(self) -> bool:
        return self._started and self.exit_code is None

    async def start(self) -> None:
        spec = {
            "role": self.role, "instance": self.instance, "args": self.args, "log": str(self.log_path),
            "env": self.env, "timeout": self.timeout, "health": self.health, "endpoints": self.endpoints_hint,
        }  # fmt: skip
        self._ref = self.host.start.remote(self.key, spec)
        self._started = True

    async def wait_ready(self, timeout: float) -> Ready:
        try:
            r = await asyncio.wait_for(as_future(self._ref), timeout + 5.0)
        except asyncio.TimeoutError:
            self.exit_code = -1
            raise ChildFailed(
                f"{self.name} on {self._where} did not become ready within {timeout:.0f} s"
            ) from None
        except Exception as exc:  # a RayTaskError wrapping ChildFailed, or the actor died
            self.exit_code = -1
            raise ChildFailed(f"{self.name} on {self._where}: {first_line(exc)}") from None
        eps = dict(r["endpoints"])
        if self.node is not None:
            eps["node"], eps["ray_node_id"] = self.node.ip, self.node.node_id
        self.ready = Ready(r["role"], r["instance"], int(r["pid"]), eps)
        return self.ready

    async def stop(self, timeout: float = 5.0) -> None:
        if self._started and self.host is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(as_future(self.host.stop.remote(self.key, timeout)), timeout + 5.0)
        self.exit_code = self.exit_code if self.exit_code is not None else 0

    @property
    def _where(self) -> str:
        return f"node {self.node.ip}" if self.node else "a Ray node"


def ray_module() -> Any:
    """The ``ray`` module, untyped (an optional dependency: imported only when ``--ray`` is used)."""
    return importlib.import_module("ray")


def as_future(ref: Any) -> asyncio.Future[Any]:
    """An asyncio future of a Ray ObjectRef (whatever the event loop)."""
    return asyncio.wrap_future(ref.future())


def first_line(exc: BaseException) -> str:
    """The line of a (Ray-wrapped) exception worth showing: the ChildFailed one, else the last."""
    lines = [x for x in str(exc).splitlines() if x.strip()]
    return next((x for x in reversed(lines) if "ChildFailed" in x), lines[-1] if lines else repr(exc))


def list_nodes() -> list[RayNode]:
    """The Ray cluster's nodes, as the plan sees them (needs ``ray.init`` first)."""
    return [
        RayNode(n["NodeID"], n["NodeManagerAddress"], dict(n.get("Resources") or {}), bool(n["Alive"]))
        for n in ray_module().nodes()
    ]
