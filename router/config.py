"""The router's configuration: a frozen dataclass, and ``parse_args`` (the only place argparse is used)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.model.config import DEFAULTS, ModelConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ROLES = ("primary", "standby")
TAKEOVER_MODES = ("auto", "external")


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router process needs to start. Times in seconds, sizes in tokens.

    ``port`` 0 asks the OS for a free port (the bound one is reported by the server). ``block_size``
    ``None`` means "learn it from the first heartbeat". ``max_retries`` counts extra attempts on other
    instances after a connection failure (so a request makes at most ``1 + max_retries`` attempts).

    High availability (:mod:`router.ha`): a ``primary`` serves ``port``; a ``standby`` follows the
    primary's decision stream at ``primary_decisions`` and takes ``port`` over once the primary is gone
    (no heartbeat for ``primary_timeout`` seconds, or its stream disconnected). ``decisions_port`` is this
    router's own decision stream (0 = OS-assigned, None = none); ``admin_port`` an extra HTTP port with
    only ``/health``, ``/metrics`` and ``/router/state`` (0 = OS-assigned, None = none), which is how a
    standby is observed before it serves. ``takeover`` ``external`` leaves the decision to take over to
    someone else (keepalived, a Kubernetes leader elector), who asks with ``POST /router/promote`` on the
    admin port. ``linear_a``/``linear_b`` are the weights of the ``linear`` policy.
    """

    host: str = "127.0.0.1"
    port: int = 30000
    agents: tuple[str, ...] = ()
    policy: str = DEFAULTS.policy
    tokenizer: str | None = None
    block_size: int | None = DEFAULTS.block_size
    heartbeat_timeout: float = DEFAULTS.heartbeat_timeout
    speculative_ttl: float = DEFAULTS.speculative_ttl
    load_coverage_margin: float = DEFAULTS.load_coverage_margin
    request_timeout: float = 3600.0
    max_retries: int = 1
    suspect_cooldown: float = DEFAULTS.suspect_cooldown
    snapshot_timeout: float = 2.0
    warmup_timeout: float = 5.0
    max_speculative_per_instance: int = DEFAULTS.max_speculative_per_instance
    log_level: str = "INFO"
    role: str = "primary"
    primary_decisions: str | None = None
    decisions_port: int | None = 0
    primary_timeout: float = 0.4
    admin_port: int | None = None
    takeover: str = "auto"
    linear_a: float = DEFAULTS.linear_a
    linear_b: float = DEFAULTS.linear_b
    # Without agents (sglang-router's command line; router/static_workers.py): see add_worker_arguments.
    worker_urls: tuple[str, ...] = ()
    routed_cache_tokens: int | None = None
    worker_startup_timeout: float = 300.0
    max_payload_size: int = 256 * 2**20

    def __post_init__(self) -> None:
        self.model  # noqa: B018 (validates the routing model's settings)
        for name in ("request_timeout", "snapshot_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_timeout < 0:
            raise ValueError(f"warmup_timeout must be >= 0, got {self.warmup_timeout}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        self._check_ha()
        if self.worker_urls and self.agents:
            raise ValueError("give either agents (--agent) or --worker-urls, not both")
        if self.max_payload_size <= 0:
            raise ValueError(f"max_payload_size must be positive, got {self.max_payload_size}")

    @property
    def model(self) -> ModelConfig:
        """The routing model's settings. Raises ``ValueError`` for a value out of range."""
        return ModelConfig(
            policy=self.policy,
            block_size=self.block_size,
            heartbeat_timeout=self.heartbeat_timeout,
            speculative_ttl=self.speculative_ttl,
            max_speculative_per_instance=self.max_speculative_per_instance,
            load_coverage_margin=self.load_coverage_margin,
            suspect_cooldown=self.suspect_cooldown,
            linear_a=self.linear_a,
            linear_b=self.linear_b,
        )

    def _check_ha(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role == "standby" and not self.primary_decisions:
            raise ValueError("a standby needs the primary's decision stream (--primary-decisions)")
        if self.role == "standby" and self.port == 0:
            raise ValueError("a standby takes over a fixed port: give the primary's --port, not 0")
        if self.takeover not in TAKEOVER_MODES:
            raise ValueError(f"takeover must be one of {', '.join(TAKEOVER_MODES)}, got {self.takeover!r}")
        if self.takeover == "external" and self.role == "standby" and self.admin_port is None:
            raise ValueError(
                "--takeover external needs --admin-port (promotion comes as POST /router/promote)"
            )
        if not self.primary_timeout > 0:
            raise ValueError(f"primary_timeout must be positive, got {self.primary_timeout}")
        for name in ("decisions_port", "admin_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                raise ValueError(f"{name} out of range: {v}")


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _non_negative_float(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _optional_port(text: str) -> int | None:
    if text.lower() in ("off", "none"):
        return None
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port (0 = OS-assigned) or 'off', got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m router`` argument parser (every flag documented for ``--help``)."""
    from router.model.policies import (
        POLICIES,  # late import: policies are pure and cheap, but keep config leaf
    )

    _D = RouterConfig()  # every default below is the dataclass's (itself the routing model's where shared)
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="KV-cache-aware request router for SGLang clusters: subscribes to every agent's "
        "KV-event/load/heartbeat stream, keeps a global prefix index, picks an instance per request "
        "with LMetric and forwards the request (streamed or not) to it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=_D.host, help="HTTP address to bind")
    p.add_argument("--port", type=int, default=_D.port, help="HTTP port to bind (0 = OS-assigned)")
    p.add_argument(
        "--agent",
        dest="agents",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="an agent's PUB endpoint (tcp://host:port); repeat once per agent",
    )
    p.add_argument(
        "--policy",
        choices=sorted(POLICIES) + sorted(SGLANG_POLICY_ALIASES),
        default=_D.policy,
        help="routing policy: lmetric = argmin (queued prefill + new tokens) x (batch size + 1); "
        "round_robin = rotation over live instances; the others are the published baselines "
        "(docs/results.md) and linear = argmin a x (queued prefill + new tokens) + b x batch size",
    )
    p.add_argument(
        "--linear-a", type=_non_negative_float, default=_D.linear_a, help="linear: weight of prefill tokens"
    )
    p.add_argument(
        "--linear-b", type=_non_negative_float, default=_D.linear_b, help="linear: weight of batch size"
    )
    p.add_argument(
        "--tokenizer",
        default=_D.tokenizer,
        metavar="PATH",
        help="Hugging Face tokenizer.json or a directory holding one (never downloaded); "
        "default: the built-in byte tokenizer",
    )
    p.add_argument(
        "--block-size",
        type=_positive_int,
        default=_D.block_size,
        metavar="N",
        help="KV block size in tokens; default: learned from the first heartbeat. An instance reporting "
        "another size is refused (logged error, never routed to)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        default=_D.heartbeat_timeout,
        metavar="S",
        help="seconds without a heartbeat after which an instance is DOWN (not routed to, its blocks "
        "dropped from the index); a heartbeat with engine_healthy false takes it down at once",
    )
    p.add_argument(
        "--speculative-ttl",
        type=_positive_float,
        default=_D.speculative_ttl,
        metavar="S",
        help="seconds a routed request's blocks count as cached on the chosen instance before the "
        "engine's own KV events confirm them",
    )
    p.add_argument(
        "--load-coverage-margin",
        type=_non_negative_float,
        default=_D.load_coverage_margin,
        metavar="S",
        help="a dispatched request stays in the router's own load accounting until a load report "
        "stamped at least this many seconds after the dispatch arrives",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=_D.request_timeout,
        metavar="S",
        help="total seconds allowed for one forwarded request (including streaming)",
    )
    p.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=_D.max_retries,
        metavar="N",
        help="extra attempts on another instance when connecting to the chosen engine fails",
    )
    p.add_argument(
        "--suspect-cooldown",
        type=_non_negative_float,
        default=_D.suspect_cooldown,
        metavar="S",
        help="an engine that refused a connection is not routed to until a healthy heartbeat "
        "received at least this many seconds later",
    )
    p.add_argument(
        "--snapshot-timeout",
        type=_positive_float,
        default=_D.snapshot_timeout,
        metavar="S",
        help="seconds to wait for an agent's snapshot reply before retrying",
    )
    p.add_argument(
        "--warmup-timeout",
        type=_non_negative_float,
        default=_D.warmup_timeout,
        metavar="S",
        help="after binding the port, wait up to this long for every agent's instance to be routable "
        "before announcing readiness (0 = announce at once)",
    )
    p.add_argument(
        "--max-speculative-per-instance",
        type=_non_negative_int,
        default=_D.max_speculative_per_instance,
        metavar="N",
        help="cap on speculative blocks per instance (oldest evicted first)",
    )
    p.add_argument("--log-level", default=_D.log_level, type=str.upper, choices=LOG_LEVELS, help="log level")
    ha = p.add_argument_group("high availability (see docs/ha.md)")
    ha.add_argument(
        "--role",
        choices=ROLES,
        default="primary",
        help="primary: serve --port; standby: follow the primary's decision stream and take --port "
        "over when the primary dies",
    )
    ha.add_argument(
        "--primary-decisions",
        default=None,
        metavar="ENDPOINT",
        help="the primary's decision stream (tcp://host:port; its --decisions-port); required for a standby",
    )
    ha.add_argument(
        "--decisions-port",
        type=_optional_port,
        default=0,
        metavar="PORT",
        help="publish this router's decisions and heartbeats on a ZeroMQ PUB socket on this port "
        "(0 = OS-assigned, 'off' = none); a standby follows it, so does the metrics daemon",
    )
    ha.add_argument(
        "--primary-timeout",
        type=_positive_float,
        default=0.4,
        metavar="S",
        help="a standby takes over once the primary's heartbeats stopped for this long (or at once when "
        "its decision stream disconnects) and the HTTP port can be bound",
    )
    ha.add_argument(
        "--admin-port",
        type=_optional_port,
        default=None,
        metavar="PORT",
        help="also serve GET /health, /metrics, /router/state and POST /router/promote on this port "
        "(0 = OS-assigned): how a standby is observed before it serves (None = off)",
    )
    ha.add_argument(
        "--takeover",
        choices=TAKEOVER_MODES,
        default="auto",
        help="auto: a standby takes the port over by itself when the primary is gone (one machine, or a "
        "virtual IP it can bind only once keepalived moved it here); external: only when told with "
        "POST /router/promote on the admin port (a leader elector decides, e.g. a Kubernetes Lease)",
    )
    add_worker_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    """Parse command-line flags into a :class:`RouterConfig`. Exits (argparse) on bad flags."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return RouterConfig(
            host=ns.host,
            port=ns.port,
            agents=tuple(ns.agents),
            policy=SGLANG_POLICY_ALIASES.get(ns.policy, ns.policy),
            tokenizer=ns.tokenizer,
            block_size=ns.block_size,
            heartbeat_timeout=ns.heartbeat_timeout,
            speculative_ttl=ns.speculative_ttl,
            load_coverage_margin=ns.load_coverage_margin,
            request_timeout=ns.request_timeout,
            max_retries=ns.max_retries,
            suspect_cooldown=ns.suspect_cooldown,
            snapshot_timeout=ns.snapshot_timeout,
            warmup_timeout=ns.warmup_timeout,
            max_speculative_per_instance=ns.max_speculative_per_instance,
            log_level=ns.log_level,
            role=ns.role,
            primary_decisions=ns.primary_decisions,
            decisions_port=ns.decisions_port,
            primary_timeout=ns.primary_timeout,
            admin_port=ns.admin_port if ns.admin_port is not None else ns.prometheus_port,
            takeover=ns.takeover,
            linear_a=ns.linear_a,
            linear_b=ns.linear_b,
            **worker_fields(ns),
        )
    except ValueError as exc:
        parser.error(str(exc))


# ---- sglang-router's command line ------------------------------------------------------------------

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
        type=_positive_int,
        default=256 * 2**20,
        metavar="BYTES",
        help="largest request body accepted (413 beyond)",
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
        "max_payload_size": ns.max_payload_size,
    }
