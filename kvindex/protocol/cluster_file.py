"""The launcher's cluster file (``cluster.json``): one typed reader and writer for every tool. Pure.

``python -m launch cluster`` rewrites the file (atomically) whenever a process changes state and removes
it on a clean shutdown. Its JSON::

    {"router": URL | null, "metrics": URL | null, "updated_at": unix seconds, "routers": [URL, ...],
     "processes": [{"role", "instance", "pid", "endpoints": {name: endpoint}, "log", "status"}]}

Roles: ``engine``, ``agent``, ``router-primary``, ``router-standby``, ``router-active``, ``router-failed``,
``metrics``. ``router`` is the URL to send requests to (the primary, or the first of several active
routers); ``routers`` every serving router's URL (several with ``launch cluster --routers K``; absent from
files written before it existed, read as ``[router]``).
Status: ``starting``, ``running``, ``exited``. Endpoint names: an engine's ``http``; an agent's ``pub``
(its stream) and ``snapshot``; a router's ``http``, ``decisions`` (its decision stream) and ``admin``.
``router`` is set once the whole cluster is ready. Readers: ``launch tail``, the metrics daemon, the
fidelity and failover benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ClusterFile", "ClusterFileError", "ProcessEntry", "parse_cluster_file", "read_cluster_file"]


class ClusterFileError(ValueError):
    """The cluster file is not valid JSON of the shape above (the message says what is wrong)."""


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    """One process of the cluster (``pid`` None before it started). ``endpoints`` maps an endpoint name to ``tcp://...`` or ``http://...``."""

    role: str
    instance: str | None
    pid: int | None
    endpoints: Mapping[str, str] = field(default_factory=dict)
    log: str = ""
    status: str = "running"

    @property
    def exited(self) -> bool:
        """Whether the launcher saw it exit."""
        return self.status == "exited"

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this entry."""
        return {
            "role": self.role,
            "instance": self.instance,
            "pid": self.pid,
            "endpoints": dict(self.endpoints),
            "log": self.log,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class ClusterFile:
    """A cluster file's content. ``updated_at`` in Unix seconds."""

    router: str | None
    metrics: str | None
    processes: tuple[ProcessEntry, ...]
    updated_at: float = 0.0
    routers: tuple[str, ...] = ()
    """Every serving router's URL (``launch cluster --routers K``: K of them; else the primary's)."""

    def endpoints(self, role: str, name: str, *, running_only: bool = False) -> list[str]:
        """The ``name`` endpoints of the processes whose role is ``role`` (or starts with it, for a role
        ending in ``-``, e.g. ``router-``), in file order; exited ones left out if ``running_only``."""
        return [
            p.endpoints[name]
            for p in self.processes
            if (p.role == role or (role.endswith("-") and p.role.startswith(role)))
            and name in p.endpoints
            and not (running_only and p.exited)
        ]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the file."""
        return {
            "router": self.router,
            "metrics": self.metrics,
            "updated_at": self.updated_at,
            "routers": list(self.routers),
            "processes": [p.to_json() for p in self.processes],
        }


def _entry(obj: Any, k: int) -> ProcessEntry:
    if not isinstance(obj, dict):
        raise ClusterFileError(f"processes[{k}] is not an object")
    eps = obj.get("endpoints") or {}
    if not isinstance(eps, dict) or not all(isinstance(v, str) for v in eps.values()):
        raise ClusterFileError(f"processes[{k}].endpoints is not a map of strings")
    role, pid, inst = obj.get("role"), obj.get("pid"), obj.get("instance")
    if not isinstance(role, str) or not isinstance(pid, int | None) or not isinstance(inst, str | None):
        raise ClusterFileError(
            f"processes[{k}] needs a string role; pid and instance, if given, an integer and a string"
        )
    return ProcessEntry(
        role,
        inst,
        pid,
        {str(a): b for a, b in eps.items()},
        str(obj.get("log", "")),
        str(obj.get("status", "running")),
    )


def parse_cluster_file(text: str) -> ClusterFile:
    """Parse a cluster file's ``text``.

    Raises:
        ClusterFileError: not JSON, or not of the documented shape.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClusterFileError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("processes", []), list):
        raise ClusterFileError("not an object with a processes list")
    router, metrics = obj.get("router"), obj.get("metrics")
    if not isinstance(router, str | None) or not isinstance(metrics, str | None):
        raise ClusterFileError("router and metrics must be URLs or null")
    updated = obj.get("updated_at", 0.0)
    procs = tuple(_entry(p, k) for k, p in enumerate(obj.get("processes", [])))
    routers = obj.get("routers", [router] if router else [])
    if not isinstance(routers, list) or not all(isinstance(u, str) for u in routers):
        raise ClusterFileError("routers must be a list of URLs")
    when = float(updated) if isinstance(updated, int | float) else 0.0
    return ClusterFile(router, metrics, procs, when, tuple(routers))


def read_cluster_file(path: Path) -> ClusterFile:
    """Read and parse the cluster file at ``path``.

    Raises:
        OSError: it cannot be read (e.g. it does not exist yet).
        ClusterFileError: as :func:`parse_cluster_file`.
    """
    return parse_cluster_file(path.read_text())
