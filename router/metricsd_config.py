"""The metrics daemon's configuration (:mod:`router.metricsd`): the frozen :class:`MetricsdConfig` and
``parse_args``, the only place argparse is used."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MetricsdConfig:
    """The daemon's configuration. Times in seconds.

    An instance is ``up`` while its last heartbeat is healthy and younger than ``heartbeat_timeout``; a
    router likewise with ``router_timeout``. Routers silent for ``forget_after`` drop out of the gauges.
    """

    host: str = "127.0.0.1"
    port: int = 9400
    agents: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ()
    cluster_file: Path | None = None
    heartbeat_timeout: float = 1.0
    router_timeout: float = 0.5
    forget_after: float = 300.0
    log_level: str = "INFO"
    metrics_keys: tuple[str, ...] = field(default=(), repr=False)
    """Key specs (``file:PATH``, ``env:NAME`` or the key; router/auth.py) for ``/metrics``; none: open."""


def parse_args(argv: Sequence[str] | None = None) -> MetricsdConfig:
    """Parse the command line into a :class:`MetricsdConfig` (argparse only here)."""
    p = argparse.ArgumentParser(
        prog="python -m router.metricsd",
        description="Prometheus metrics of an SGLang cluster from its agents' streams and its routers' "
        "decision streams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to bind")
    p.add_argument("--port", type=int, default=9400, help="HTTP port for /metrics (0 = OS-assigned)")
    p.add_argument("--agent", dest="agents", action="append", default=[], metavar="ENDPOINT",
                   help="an agent's PUB endpoint; repeat per agent")  # fmt: skip
    p.add_argument("--decisions", action="append", default=[], metavar="ENDPOINT",
                   help="a router's decision stream (its --decisions-port); repeat per router")  # fmt: skip
    p.add_argument(
        "--cluster-file",
        type=Path,
        default=None,
        help="launch cluster's cluster.json: follow every agent and router it lists, as they change",
    )
    p.add_argument("--heartbeat-timeout", type=float, default=1.0, help="instance down after this silence")
    p.add_argument("--router-timeout", type=float, default=0.5, help="router down after this silence")
    p.add_argument("--forget-after", type=float, default=300.0, help="drop a silent router's gauges")
    p.add_argument("--log-level", default="INFO", type=str.upper, help="log level")
    p.add_argument(
        "--metrics-key",
        dest="metrics_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="scrapers send 'Authorization: Bearer KEY' for /metrics (/health stays open); KEY is "
        "file:PATH (one key a line), env:NAME (comma-separated) or the key itself (visible in ps: avoid); "
        "repeat to accept several; SIGHUP re-reads files (default: no key, /metrics open)",
    )
    ns = p.parse_args(argv)
    if not 0 <= ns.port <= 65535:
        p.error(f"--port out of range: {ns.port}")
    return MetricsdConfig(
        host=ns.host,
        port=ns.port,
        agents=tuple(ns.agents),
        decisions=tuple(ns.decisions),
        cluster_file=ns.cluster_file,
        heartbeat_timeout=ns.heartbeat_timeout,
        router_timeout=ns.router_timeout,
        forget_after=ns.forget_after,
        log_level=ns.log_level,
        metrics_keys=tuple(ns.metrics_keys),
    )
