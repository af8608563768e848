"""The router's configuration: a frozen dataclass, and ``parse_args`` (the only place argparse is used)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router.model.config import DEFAULTS, ModelConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ROLES = ("primary", "standby", "active")
TAKEOVER_MODES = ("auto", "external", "etcd")


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router process needs to start. Times in seconds, sizes in tokens.

    ``port`` 0 asks the OS for a free port (the bound one is reported by the server). ``block_size``
    ``None`` means "learn it from the first heartbeat". ``max_retries`` counts extra attempts on other
    instances after a failed attempt (so a request makes at most ``1 + max_retries`` attempts).

    Forwarding and overload (docs/robustness.md): ``connect_timeout`` (TCP connect to an engine),
    ``headers_timeout`` (send to response headers, streamed requests), ``idle_timeout`` (longest gap
    between two chunks of a stream, the first included), ``request_timeout`` (total); ``retry_backoff``
    the base of the jittered exponential wait between attempts; ``breaker_*`` and ``max_ejected`` the
    per-instance circuit breakers (:mod:`router.breaker`); ``stall_after`` the longest silence of an
    engine's load stream before it is ejected as stalled (0 = off); ``max_inflight_per_instance`` x
    routable instances requests in flight, ``max_queue`` waiting at most ``queue_timeout`` s, the rest 429
    (:mod:`router.admission`); while every routable instance has at least ``max_queued_prefill_tokens``
    queued prefill tokens (0 = no such bound), new requests get 429 at once; ``max_body_size`` bytes per
    request body (413 above). Slow clients: ``client_body_timeout`` the longest gap between two reads of a
    request body (408 and the connection closed after it), ``client_idle_timeout`` how long a client
    connection may sit idle between requests or still be sending its request head before it is closed.

    High availability (:mod:`router.ha`): a ``primary`` serves ``port``; a ``standby`` follows the
    primary's decision stream at ``primary_decisions`` and takes ``port`` over once the primary is gone
    (no heartbeat for ``primary_timeout`` seconds, or its stream disconnected). ``decisions_port`` is this
    router's own decision stream (0 = OS-assigned, None = none); ``admin_port`` an extra HTTP port with
    only ``/health``, ``/metrics`` and ``/router/state`` (0 = OS-assigned, None = none), which is how a
    standby is observed before it serves. ``takeover`` ``external`` leaves the decision to take over to
    someone else (keepalived, a Kubernetes leader elector), who asks with ``POST /router/promote`` on the
    admin port; ``etcd`` to a leader key in etcd (:mod:`router.etcd_lease`: ``etcd_endpoints``
    ``host:port`` each, the key under ``etcd_prefix``, a lease of ``etcd_lease_ttl`` whole seconds).
    ``policy_params``: the policies' parameters given (``--POLICY-PARAM`` flags, made from
    each policy's ``PARAMS``; :data:`router.model.policies.PolicyParams`).

    Active-active (:mod:`router.active`): an ``active`` router serves ``port`` like a primary, publishes
    its decisions, and follows the decision streams of the other active routers at ``peer_routers``,
    counting their dispatches as pending; active routers never fence each other. ``decision_slot`` > 0
    (seconds): the routers take turns to decide (:mod:`router.model.slots`), this one being number
    ``slot_index`` of ``1 + len(peer_routers)``.
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
    connect_timeout: float = 3.0
    headers_timeout: float = 30.0
    idle_timeout: float = 120.0
    max_retries: int = 2
    retry_backoff: float = 0.02
    breaker_failures: int = 3
    breaker_window: float = 10.0
    breaker_open: float = 2.0
    max_ejected: float = 0.5
    stall_after: float = 3.0
    max_inflight_per_instance: int = 256
    max_queued_prefill_tokens: int = 32768
    max_queue: int = 1024
    queue_timeout: float = 2.0
    max_body_size: int = 64 * 2**20
    client_body_timeout: float = 60.0
    client_idle_timeout: float = 75.0
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
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    etcd_prefix: str = "/lmetric-router/"
    etcd_lease_ttl: int = 2
    policy_params: tuple[tuple[str, str, float], ...] = DEFAULTS.policy_params
    # Security (docs/security.md; router/auth.py). Key *specs*, never keys in logs: ``file:PATH`` (one key
    # a line), ``env:NAME`` (comma-separated) or the key itself. Hosts None = ``host``.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_keys: tuple[str, ...] = field(default=(), repr=False)
    forward_client_key: bool = False
    engine_api_key: str | None = field(default=None, repr=False)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    engine_ca_file: str | None = None
    engine_tls_verify: bool = True
    admin_host: str | None = None
    decisions_host: str | None = None
    metrics_host: str | None = None
    metrics_port: int | None = None
    peer_decisions: tuple[str, ...] = ()
    exit_when_fenced: bool = False
    peer_routers: tuple[str, ...] = ()
    decision_slot: float = 0.0
    slot_index: int = 0
    # Without agents (sglang-router's command line; router/static_workers.py): see add_worker_arguments.
    worker_urls: tuple[str, ...] = ()
    routed_cache_tokens: int | None = None
    worker_startup_timeout: float = 300.0

    def __post_init__(self) -> None:
        from router.model.policies import check_policy_params

        self.model  # noqa: B018 (validates the routing model's settings)
        check_policy_params(self.policy_params)
        positive: tuple[str, ...] = ("request_timeout", "snapshot_timeout", "connect_timeout")
        positive += ("headers_timeout", "idle_timeout", "breaker_window", "breaker_open", "queue_timeout")
        positive += ("client_body_timeout", "client_idle_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("breaker_failures", "max_inflight_per_instance", "max_body_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.retry_backoff < 0
            or self.stall_after < 0
            or self.max_queue < 0
            or self.max_queued_prefill_tokens < 0
        ):
            raise ValueError("retry_backoff, stall_after and max_queue must be >= 0")
        if not 0 <= self.max_ejected <= 1:
            raise ValueError(f"max_ejected must be in [0, 1], got {self.max_ejected}")
        if self.warmup_timeout < 0:
            raise ValueError(f"warmup_timeout must be >= 0, got {self.warmup_timeout}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        self._check_ha()
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port out of range: {self.metrics_port}")
        if self.worker_urls and self.agents:
            raise ValueError("give either agents (--agent) or --worker-urls, not both")

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
            policy_params=self.policy_params,
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
        if self.takeover == "etcd" and (self.etcd_lease_ttl < 1 or not self.etcd_endpoints):
            raise ValueError("--takeover etcd needs --etcd-endpoints and an --etcd-lease-ttl >= 1 s")
        for ep in self.etcd_endpoints if self.takeover == "etcd" else ():
            host, _, port = ep.removeprefix("http://").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--etcd-endpoints: host:port expected, got {ep!r}")
        if self.peer_routers and self.role != "active":
            raise ValueError("--peer-routers is for --role active (a standby follows --primary-decisions)")
        if self.decision_slot < 0 or (self.decision_slot > 0 and self.role != "active"):
            raise ValueError("--decision-slot is for --role active and must be >= 0")
        if self.decision_slot > 0 and not 0 <= self.slot_index <= len(self.peer_routers):
            raise ValueError(
                f"--slot-index must be in [0, {len(self.peer_routers)}] (one slot per active router)"
            )
        if self.role == "active" and self.decisions_port is None:
            raise ValueError("an active router publishes its decisions: --decisions-port cannot be off")
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
    _add_security_flags(p)
    add_worker_arguments(p)
    return p


def _add_etcd_flags(g: argparse._ArgumentGroup) -> None:
    """``--takeover etcd``'s settings (router/etcd_lease.py, docs/ha.md)."""
    g.add_argument(
        "--etcd-endpoints",
        type=lambda t: tuple(e.strip() for e in t.split(",") if e.strip()),
        default=RouterConfig.etcd_endpoints,
        metavar="HOST:PORT[,...]",
        help="etcd client endpoints for --takeover etcd, tried in turn (default 127.0.0.1:2379)",
    )
    g.add_argument(
        "--etcd-prefix",
        default=RouterConfig.etcd_prefix,
        metavar="PREFIX",
        help="key prefix: the pair campaigns for PREFIX + 'leader' (default /lmetric-router/); one "
        "prefix per router pair",
    )
    g.add_argument(
        "--etcd-lease-ttl",
        type=_positive_int,
        default=RouterConfig.etcd_lease_ttl,
        metavar="S",
        help="the leader key's lease in whole seconds (default 2; etcd raises it to its minimum, 2 s "
        "with its default timings): a dead primary is replaced about this long after its death; the "
        "holder stops serving when it could not renew within it",
    )


def etcd_fields(ns: argparse.Namespace) -> dict[str, Any]:
    """The :class:`RouterConfig` fields of :func:`_add_etcd_flags`' flags."""
    return {
        "etcd_endpoints": tuple(ns.etcd_endpoints),
        "etcd_prefix": ns.etcd_prefix,
        "etcd_lease_ttl": ns.etcd_lease_ttl,
    }


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    """Keys, TLS, bind hosts and fencing (docs/security.md)."""
    sec = p.add_argument_group(
        "security (see docs/security.md)",
        "KEY is file:PATH (one key a line, '#' comments), env:NAME (comma-separated keys) or the key "
        "itself (visible in ps: prefer a file). Repeat a flag to accept several keys (rotation).",
    )
    key = {"action": "append", "default": [], "metavar": "KEY"}
    sec.add_argument(
        "--api-key",
        dest="api_keys",
        **key,  # type: ignore[arg-type]
        help="require 'Authorization: Bearer KEY' on the generation endpoints and /v1/models "
        "(/health stays open); none = open",
    )
    sec.add_argument(
        "--admin-key",
        dest="admin_keys",
        **key,  # type: ignore[arg-type]
        help="the key for /router/* (state, promote, peers) on every port; default: the --api-key keys",
    )
    sec.add_argument(
        "--metrics-key",
        dest="metrics_keys",
        **key,  # type: ignore[arg-type]
        help="the key for /metrics; default: the admin keys, else the API keys, else open",
    )
    sec.add_argument(
        "--forward-client-key",
        action="store_true",
        help="pass the client's Authorization header on to the engine (default: dropped once the router "
        "checks keys itself; passed through when it does not)",
    )
    sec.add_argument(
        "--engine-api-key",
        default=None,
        metavar="KEY",
        help="send 'Authorization: Bearer KEY' to the engines (SGLang's --api-key); one key",
    )
    sec.add_argument("--ssl-certfile", default=None, metavar="PATH", help="serve HTTPS with this certificate")
    sec.add_argument("--ssl-keyfile", default=None, metavar="PATH", help="the certificate's private key")
    sec.add_argument(
        "--engine-ca-file", default=None, metavar="PATH", help="CA bundle to verify HTTPS engines with"
    )
    sec.add_argument(
        "--no-engine-tls-verify",
        dest="engine_tls_verify",
        action="store_false",
        help="do not verify HTTPS engines' certificates (testing only)",
    )
    sec.add_argument(
        "--admin-host", default=None, metavar="ADDR", help="address of the admin port (default: --host)"
    )
    sec.add_argument(
        "--decisions-host",
        default=None,
        metavar="ADDR",
        help="address of the decision stream (default: --host); with a virtual IP as --host, this "
        "host's own address",
    )
    sec.add_argument(
        "--metrics-port",
        type=_optional_port,
        default=None,
        metavar="PORT",
        help="serve /metrics on this port instead of the HTTP port (0 = OS-assigned; default off: "
        "/metrics on the HTTP and admin ports)",
    )
    sec.add_argument(
        "--metrics-host", default=None, metavar="ADDR", help="address of --metrics-port (default: --host)"
    )
    sec.add_argument(
        "--peer-decisions",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="another router's decision stream to watch for a higher fencing epoch (a standby also "
        "registers itself with its primary on its own); repeatable",
    )
    sec.add_argument(
        "--exit-when-fenced",
        action="store_true",
        help="exit (status 0) after stepping down for a router with a higher epoch, so a supervisor "
        "replaces this router (launch cluster sets it)",
    )


def _security_kwargs(ns: argparse.Namespace) -> dict[str, object]:
    return {
        "api_keys": tuple(ns.api_keys),
        "admin_keys": tuple(ns.admin_keys),
        "metrics_keys": tuple(ns.metrics_keys),
        "forward_client_key": ns.forward_client_key,
        "engine_api_key": ns.engine_api_key,
        "ssl_certfile": ns.ssl_certfile,
        "ssl_keyfile": ns.ssl_keyfile,
        "engine_ca_file": ns.engine_ca_file,
        "engine_tls_verify": ns.engine_tls_verify,
        "admin_host": ns.admin_host,
        "decisions_host": ns.decisions_host,
        "metrics_host": ns.metrics_host,
        "metrics_port": ns.metrics_port,
        "peer_decisions": tuple(ns.peer_decisions),
        "exit_when_fenced": ns.exit_when_fenced,
    }


def _add_robustness_flags(p: argparse.ArgumentParser, d: RouterConfig) -> None:
    """Timeouts, retries, circuit breakers and admission control (docs/robustness.md)."""
    g = p.add_argument_group("forwarding and overload (see docs/robustness.md)")
    g.add_argument(
        "--connect-timeout", type=_positive_float, default=d.connect_timeout, metavar="S",
        help="seconds to open a TCP connection to an engine (then: retry on another instance)",
    )  # fmt: skip
    g.add_argument(
        "--headers-timeout", type=_positive_float, default=d.headers_timeout, metavar="S",
        help="streamed requests: seconds from sending to the engine's response headers (a non-streamed "
        "answer's headers come with its end, so only --request-timeout bounds it)",
    )  # fmt: skip
    g.add_argument(
        "--idle-timeout", type=_positive_float, default=d.idle_timeout, metavar="S",
        help="streamed requests: longest gap between two chunks from the engine, the first included",
    )  # fmt: skip
    g.add_argument(
        "--request-timeout", type=_positive_float, default=d.request_timeout, metavar="S",
        help="total seconds allowed for one forwarded request (including streaming)",
    )  # fmt: skip
    g.add_argument(
        "--max-retries", type=_non_negative_int, default=d.max_retries, metavar="N",
        help="extra attempts, each on another instance, while nothing was sent to the client: after a "
        "connection failure, a timeout, an engine 5xx or 429, or a stream broken before its first byte",
    )  # fmt: skip
    g.add_argument(
        "--retry-backoff", type=_non_negative_float, default=d.retry_backoff, metavar="S",
        help="base of the jittered exponential wait before a retry (full jitter, capped at 0.5 s)",
    )  # fmt: skip
    g.add_argument(
        "--breaker-failures", type=_positive_int, default=d.breaker_failures, metavar="N",
        help="failed attempts in a row on an instance that open its circuit breaker (eject it)",
    )  # fmt: skip
    g.add_argument(
        "--breaker-window", type=_positive_float, default=d.breaker_window, metavar="S",
        help="those failures must fall within this many seconds",
    )  # fmt: skip
    g.add_argument(
        "--breaker-open", type=_positive_float, default=d.breaker_open, metavar="S",
        help="seconds an open breaker waits before one probe request may close it",
    )  # fmt: skip
    g.add_argument(
        "--max-ejected", type=float, default=d.max_ejected, metavar="SHARE",
        help="largest share of instances ejected at once by breakers and stall detection (0..1)",
    )  # fmt: skip
    g.add_argument(
        "--stall-after", type=_non_negative_float, default=d.stall_after, metavar="S",
        help="eject an up instance whose engine load stream went silent for this long, or for 5x its "
        "usual interval if shorter (at least 0.3 s); it comes back with the next report (0 = off)",
    )  # fmt: skip
    g.add_argument(
        "--max-inflight-per-instance", type=_positive_int, default=d.max_inflight_per_instance, metavar="N",
        help="requests in flight through the router, per routable instance; more wait in the queue",
    )  # fmt: skip
    g.add_argument(
        "--max-queued-prefill-tokens", type=_non_negative_int, default=d.max_queued_prefill_tokens, metavar="N",
        help="while every routable instance has at least N prefill tokens queued (its last load report plus "
        "the router's own dispatches), new requests get 429 at once: the engines' queues are the queue "
        "(0 = no such bound)",
    )  # fmt: skip
    g.add_argument(
        "--max-queue", type=_non_negative_int, default=d.max_queue, metavar="N",
        help="requests waiting for a slot; beyond: 429 with Retry-After at once",
    )  # fmt: skip
    g.add_argument(
        "--queue-timeout", type=_positive_float, default=d.queue_timeout, metavar="S",
        help="longest wait in the queue; then 429 with Retry-After",
    )  # fmt: skip
    g.add_argument(
        "--max-body-size", type=_positive_int, default=d.max_body_size, metavar="BYTES",
        help="largest request body accepted; larger: 413",
    )  # fmt: skip
    g.add_argument(
        "--client-body-timeout", type=_positive_float, default=d.client_body_timeout, metavar="S",
        help="longest gap between two reads of a request body; then 408 and the connection is closed "
        "(slow senders; nginx's client_body_timeout)",
    )  # fmt: skip
    g.add_argument(
        "--client-idle-timeout", type=_positive_float, default=d.client_idle_timeout, metavar="S",
        help="a client connection idle between requests, or still sending its request head, is closed "
        "after this (nginx's keepalive_timeout and client_header_timeout in one)",
    )  # fmt: skip


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
            max_queued_prefill_tokens=ns.max_queued_prefill_tokens,
            max_queue=ns.max_queue,
            queue_timeout=ns.queue_timeout,
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
