"""The router's configuration: a frozen dataclass, and ``parse_args`` (the only place argparse is used)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router process needs to start. Times in seconds, sizes in tokens.

    ``port`` 0 asks the OS for a free port (the bound one is reported by the server). ``block_size``
    ``None`` means "learn it from the first heartbeat". ``max_retries`` counts extra attempts on other
    instances after a connection failure (so a request makes at most ``1 + max_retries`` attempts).
    """

    host: str = "127.0.0.1"
    port: int = 30000
    agents: tuple[str, ...] = ()
    policy: str = "lmetric"
    tokenizer: str | None = None
    block_size: int | None = None
    heartbeat_timeout: float = 1.0
    speculative_ttl: float = 5.0
    load_coverage_margin: float = 0.02
    request_timeout: float = 3600.0
    max_retries: int = 1
    suspect_cooldown: float = 0.5
    snapshot_timeout: float = 2.0
    warmup_timeout: float = 5.0
    max_speculative_per_instance: int = 65536
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        for name in ("heartbeat_timeout", "speculative_ttl", "request_timeout", "snapshot_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if min(self.load_coverage_margin, self.suspect_cooldown, self.warmup_timeout) < 0:
            raise ValueError("load_coverage_margin, suspect_cooldown and warmup_timeout must be >= 0")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")


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


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m router`` argument parser (every flag documented for ``--help``)."""
    from router.policies import POLICIES  # late import: policies are pure and cheap, but keep config leaf

    p = argparse.ArgumentParser(
        prog="python -m router",
        description="KV-cache-aware request router for SGLang clusters: subscribes to every agent's "
        "KV-event/load/heartbeat stream, keeps a global prefix index, picks an instance per request "
        "with LMetric and forwards the request (streamed or not) to it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to bind")
    p.add_argument("--port", type=int, default=30000, help="HTTP port to bind (0 = OS-assigned)")
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
        choices=sorted(POLICIES),
        default="lmetric",
        help="routing policy: lmetric = argmin (queued prefill + new tokens) x (batch size + 1); "
        "round_robin = rotation over live instances",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="Hugging Face tokenizer.json or a directory holding one (never downloaded); "
        "default: the built-in byte tokenizer",
    )
    p.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="KV block size in tokens; default: learned from the first heartbeat. An instance reporting "
        "another size is refused (logged error, never routed to)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds without a heartbeat after which an instance is DOWN (not routed to, its blocks "
        "dropped from the index); a heartbeat with engine_healthy false takes it down at once",
    )
    p.add_argument(
        "--speculative-ttl",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="seconds a routed request's blocks count as cached on the chosen instance before the "
        "engine's own KV events confirm them",
    )
    p.add_argument(
        "--load-coverage-margin",
        type=_non_negative_float,
        default=0.02,
        metavar="S",
        help="a dispatched request stays in the router's own load accounting until a load report "
        "stamped at least this many seconds after the dispatch arrives",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=3600.0,
        metavar="S",
        help="total seconds allowed for one forwarded request (including streaming)",
    )
    p.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=1,
        metavar="N",
        help="extra attempts on another instance when connecting to the chosen engine fails",
    )
    p.add_argument(
        "--suspect-cooldown",
        type=_non_negative_float,
        default=0.5,
        metavar="S",
        help="an engine that refused a connection is not routed to until a healthy heartbeat "
        "received at least this many seconds later",
    )
    p.add_argument(
        "--snapshot-timeout",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="seconds to wait for an agent's snapshot reply before retrying",
    )
    p.add_argument(
        "--warmup-timeout",
        type=_non_negative_float,
        default=5.0,
        metavar="S",
        help="after binding the port, wait up to this long for every agent's instance to be routable "
        "before announcing readiness (0 = announce at once)",
    )
    p.add_argument(
        "--max-speculative-per-instance",
        type=_non_negative_int,
        default=65536,
        metavar="N",
        help="cap on speculative blocks per instance (oldest evicted first)",
    )
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="log level")
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
            policy=ns.policy,
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
        )
    except ValueError as exc:
        parser.error(str(exc))
