"""sglang-router's command line on ``python -m router``: its policy names and the flags of a router without
agents (``--worker-urls`` and the rest), named as sglang-router names them."""

from __future__ import annotations

import argparse
from typing import Any

from router.cli_flags import _non_negative_float, _optional_port, _positive_int

SGLANG_POLICY_ALIASES = {"cache_aware": "lmetric"}
"""sglang-router policy names that are not ours. ``cache_aware`` maps to LMetric, which is cache-aware
and load-aware without thresholds; ``--policy sglang_cache_aware`` is a replica of sglang-router's own
rule. ``round_robin``, ``random`` and ``power_of_two`` are the same names in both."""


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a router without agents, named as sglang-router names them, so that a user of
    ``python -m sglang_router.launch_router`` swaps the command and keeps the rest."""
    g = p.add_argument_group("without agents (sglang-router's flags; see router/static_workers.py)")
    g.add_argument(
        "--worker-urls",
        nargs="+",
        default=[],
        metavar="URL",
        help="engines' HTTP base URLs: route to them with no agents; the index is what this router routed "
        "to each (a bounded LRU per engine), as sglang-router keeps it",
    )
    g.add_argument(
        "--routed-cache-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens each worker's routed LRU holds; default: the engine's max_total_num_tokens from "
        "/server_info (1M if it reports none)",
    )
    g.add_argument(
        "--worker-startup-timeout-secs",
        dest="worker_startup_timeout",
        type=_non_negative_float,
        default=300.0,
        metavar="S",
        help="wait this long for each worker's /server_info at start; one that never answers is "
        "declared anyway and routed to once its /health answers",
    )
    g.add_argument(
        "--max-payload-size",
        dest="max_body_size",
        type=_positive_int,
        default=argparse.SUPPRESS,
        metavar="BYTES",
        help="sglang-router's name for --max-body-size",
    )
    g.add_argument(
        "--prometheus-port",
        type=_optional_port,
        default=None,
        metavar="PORT",
        help="serve /metrics (with /health and /router/state) on this port too: the admin port "
        "(--admin-port wins if both are given); /metrics is always on the main port as well",
    )
    g.add_argument(
        "--prometheus-host",
        default=None,
        metavar="HOST",
        help="accepted for sglang-router compatibility; the metrics port binds --host",
    )


def worker_fields(ns: argparse.Namespace) -> dict[str, Any]:
    """The :class:`RouterConfig` fields of :func:`add_worker_arguments`' flags (``--prometheus-port`` is
    read where the admin port is)."""
    return {
        "worker_urls": tuple(ns.worker_urls),
        "routed_cache_tokens": ns.routed_cache_tokens,
        "worker_startup_timeout": ns.worker_startup_timeout,
    }
