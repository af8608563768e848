"""The router's configuration: the frozen :class:`RouterConfig` and its validation.

Its command line is :mod:`router.cli` (``parse_args``, the only place argparse is used), with the flag
groups in :mod:`router.cli_flags` and sglang-router's flags in :mod:`router.cli_sglang`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    routable instances requests in flight, or, with ``engine_queue_allowance`` >= 0, per instance a limit that
    follows the engine's own concurrency (:mod:`router.model.concurrency`: it drops to what the engine runs
    when more than that many requests wait in it, or more than ``engine_queue_seconds`` of its prefill work,
    0 = no bound in time), ``max_queue`` waiting (each only if its predicted wait
    is at most ``max_queue_wait`` s, 0 = no such bound) at most ``queue_timeout`` s, the rest 429
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

    Several processes (:mod:`router.workers`): ``workers`` > 1 makes this process a supervisor of that
    many worker routers on the same ``port`` (``SO_REUSEPORT``), each an active router following the
    others. ``worker_index`` / ``worker_of`` are set only in a worker (internal flags): its number and its
    supervisor's pid (the worker exits when that process is gone); a worker keeps ``workers`` (the group's
    size) and its last ``workers - 1`` ``peer_routers`` are its siblings.
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
    engine_queue_allowance: int = 2
    engine_queue_seconds: float = 0.5
    max_queued_prefill_tokens: int = 0
    max_queue: int = 1024
    queue_timeout: float = 10.0
    max_queue_wait: float = 1.0
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
    workers: int = 1
    worker_index: int | None = None
    worker_of: int | None = None
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
            or self.max_queue_wait < 0
            or self.engine_queue_seconds < 0
        ):
            raise ValueError(
                "retry_backoff, stall_after, max_queue, max_queued_prefill_tokens, max_queue_wait and "
                "engine_queue_seconds must be >= 0"
            )
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
        if self.decision_slot < 0 or (self.decision_slot > 0 and self.role != "active" and self.workers == 1):
            raise ValueError("--decision-slot is for --role active (or --workers N) and must be >= 0")
        self._check_workers()
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

    def _check_workers(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.workers == 1:
            return
        if self.role == "standby":
            raise ValueError(
                "--workers N is for a primary or an active router; a standby runs one process "
                "(it follows the primary's first worker and takes over once every worker is gone)"
            )
        if self.takeover != "auto":
            raise ValueError("--workers N runs its workers as active routers: --takeover must be auto")
        if self.decision_slot > 0 and self.peer_routers and self.worker_index is None:
            raise ValueError("--decision-slot with --workers N takes no --peer-routers (one slot per worker)")
