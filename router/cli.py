"""``python -m router``'s command line: :func:`build_parser` and :func:`parse_args` (the only place argparse
is used), which returns a :class:`~router.config.RouterConfig`. The flag groups for forwarding and overload,
security and etcd are in :mod:`router.cli_flags`; sglang-router's flags in :mod:`router.cli_sglang`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from router.cli_flags import (
    _add_etcd_flags,
    _add_robustness_flags,
    _add_security_flags,
    _non_negative_float,
    _non_negative_int,
    _optional_port,
    _positive_float,
    _positive_int,
    _security_kwargs,
    etcd_fields,
)
from router.cli_sglang import SGLANG_POLICY_ALIASES, add_worker_arguments, worker_fields
from router.config import LOG_LEVELS, ROLES, TAKEOVER_MODES, RouterConfig


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m router`` argument parser (every flag documented for ``--help``)."""
    from router.model.policies import (  # late import: policies are pure and cheap, but keep config leaf
        POLICIES,
        add_param_arguments,
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
    add_param_arguments(p)  # --POLICY-PARAM, from every policy's PARAMS (--linear-a, --linear-b, ...)
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
    _add_robustness_flags(p, _D)
    ha = p.add_argument_group("high availability (see docs/ha.md)")
    ha.add_argument(
        "--role",
        choices=ROLES,
        default="primary",
        help="primary: serve --port; standby: follow the primary's decision stream and take --port "
        "over when the primary dies; active: serve --port beside other active routers, following their "
        "decision streams (--peer-routers; docs/scale.md)",
    )
    ha.add_argument(
        "--peer-routers",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="with --role active: another active router's decision stream (tcp://host:port, its "
        "--decisions-port); its dispatches count as pending here until the agents' load reports cover "
        "them; repeatable or comma-separated",
    )
    ha.add_argument(
        "--decision-slot",
        type=float,
        default=0.0,
        metavar="S",
        help="with --role active: take turns with the peers to decide, each router in the first half of "
        "its own S-second slot (S > 2 x the decision streams' delay; the routers' clocks must agree), so "
        "that none decides without a peer's decision in flight; 0 = off (default; docs/scale.md)",
    )
    ha.add_argument(
        "--slot-index",
        type=int,
        default=0,
        metavar="I",
        help="with --decision-slot: this router's slot, 0 .. number of --peer-routers, distinct per router",
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
        "POST /router/promote on the admin port (a leader elector decides, e.g. a Kubernetes Lease); "
        "etcd: whoever holds a leader key in etcd serves, with the key's create revision as its "
        "fencing epoch (both routers of the pair run with it; needs the etcd extra)",
    )
    _add_etcd_flags(ha)
    ha.add_argument(
        "--workers",
        type=_positive_int,
        default=_D.workers,
        metavar="N",
        help="N > 1: this process supervises N router processes that all serve --port (SO_REUSEPORT: "
        "the kernel spreads connections over them), each an active router following the others' decision "
        "streams on loopback and every agent, so the HTTP work scales with cores; one /metrics for all of "
        "them (a 'worker' label) on the supervisor's --admin-port (OS-assigned if not given) or "
        "--metrics-port; a worker that dies is restarted; SIGINT/SIGTERM stop them all. For --role "
        "primary or active (docs/overhead.md)",
    )
    ha.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor
    ha.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)  # the supervisor's pid
    _add_security_flags(p)
    add_worker_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    """Parse command-line flags into a :class:`RouterConfig`. Exits (argparse) on bad flags."""
    from router.model.policies import params_from_namespace

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
            connect_timeout=ns.connect_timeout,
            headers_timeout=ns.headers_timeout,
            idle_timeout=ns.idle_timeout,
            retry_backoff=ns.retry_backoff,
            breaker_failures=ns.breaker_failures,
            breaker_window=ns.breaker_window,
            breaker_open=ns.breaker_open,
            max_ejected=ns.max_ejected,
            stall_after=ns.stall_after,
            max_inflight_per_instance=ns.max_inflight_per_instance,
            engine_queue_allowance=ns.engine_queue_allowance,
            engine_queue_seconds=ns.engine_queue_seconds,
            max_queued_prefill_tokens=ns.max_queued_prefill_tokens,
            max_queue=ns.max_queue,
            queue_timeout=ns.queue_timeout,
            max_queue_wait=ns.max_queue_wait,
            max_body_size=ns.max_body_size,
            client_body_timeout=ns.client_body_timeout,
            client_idle_timeout=ns.client_idle_timeout,
            suspect_cooldown=ns.suspect_cooldown,
            snapshot_timeout=ns.snapshot_timeout,
            warmup_timeout=ns.warmup_timeout,
            max_speculative_per_instance=ns.max_speculative_per_instance,
            log_level=ns.log_level,
            role=ns.role,
            primary_decisions=ns.primary_decisions,
            peer_routers=tuple(ep.strip() for arg in ns.peer_routers for ep in arg.split(",") if ep.strip()),
            decision_slot=ns.decision_slot,
            slot_index=ns.slot_index,
            workers=ns.workers,
            worker_index=ns.worker_index,
            worker_of=ns.worker_of,
            decisions_port=ns.decisions_port,
            primary_timeout=ns.primary_timeout,
            admin_port=ns.admin_port if ns.admin_port is not None else ns.prometheus_port,
            takeover=ns.takeover,
            policy_params=params_from_namespace(ns),
            **_security_kwargs(ns),  # type: ignore[arg-type]
            **worker_fields(ns),
            **etcd_fields(ns),
        )
    except ValueError as exc:
        parser.error(str(exc))
