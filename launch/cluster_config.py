"""``launch cluster``'s configuration and command line: the frozen :class:`ClusterConfig`, its flags
(:func:`add_arguments`: the cluster, keys, real SGLang engines, ``--ray``) and :func:`config_from_args`,
which validates them into a config. The cluster itself is :mod:`launch.cluster`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.keys import AuthConfigError, ClusterAuth
from launch.placement import RayOptions, add_ray_arguments, ray_options_from_args
from launch.sglang_engines import LOAD_MODES, SGLANG_MODULE, parse_gpus
from router.model.policies import POLICIES, add_param_arguments, params_from_namespace


@dataclass(frozen=True)
class ClusterConfig:
    """What ``launch cluster`` starts. Token counts in tokens, times in seconds."""

    instances: int = 4
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "lmetric"
    cluster_file: Path = Path("cluster.json")
    log_dir: Path = Path("cluster-logs")
    profile: str = "h100-llama3.1-8b"
    model_name: str = "emulated-llama-3.1-8b"
    page_size: int = 16
    max_total_tokens: int | None = None
    max_running_requests: int = 128
    time_scale: float = 1.0
    tokenizer: str | None = None
    ready_timeout: float = 60.0
    standby: bool = True
    routers: int = 1
    workers: int = 1
    decision_slot: float = 0.0
    primary_timeout: float = 0.4
    metrics: bool = True
    metrics_port: int = 0
    engine: str = "sim"
    model_path: str | None = None
    gpus: tuple[str, ...] = ()
    attach: tuple[str, ...] = ()
    sglang_args: tuple[str, ...] = ()
    engine_ready_timeout: float = 1200.0
    sglang_module: str = SGLANG_MODULE
    policy_params: tuple[tuple[str, str, float], ...] = ()
    curve: bool = False
    sglang_load_stream: str = "wildcard"
    ray: RayOptions | None = None  # --ray: every process on a Ray cluster (launch/ray_cluster.py)
    auth: ClusterAuth = field(default_factory=ClusterAuth)  # --api-key/--admin-key/--metrics-key specs
    engine_ca_file: str | None = None  # CA of HTTPS engines (--attach https://...), for agents and routers


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cluster`` subcommand's flags."""
    d = ClusterConfig()
    p.add_argument(
        "--instances", type=int, default=d.instances, help="number of engine instances (default %(default)s)"
    )
    p.add_argument("--host", default=d.host, help="address every process binds (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=d.port, help="router HTTP port; 0 = OS-assigned (default %(default)s)"
    )
    p.add_argument(
        "--policy",
        default=d.policy,
        help="routing policy, one of router.model.policies.POLICIES (default %(default)s)",
    )
    add_param_arguments(p)  # --POLICY-PARAM: passed on to the routers when not the default
    p.add_argument(
        "--cluster-file",
        type=Path,
        default=d.cluster_file,
        help="where to write the endpoints as JSON (default %(default)s)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=d.log_dir,
        help="one log file per process goes here (default %(default)s)",
    )
    p.add_argument(
        "--profile",
        default=d.profile,
        help="emulated engine's GPU+model step-time profile (default %(default)s)",
    )
    p.add_argument(
        "--model-name", default=d.model_name, help="model name the engines serve (default %(default)s)"
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=d.page_size,
        help="KV cache page size in tokens (default %(default)s)",
    )
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="KV cache capacity per engine in tokens (default: from the profile)",
    )
    p.add_argument(
        "--max-running-requests",
        type=int,
        default=d.max_running_requests,
        help="per-engine cap (default %(default)s)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help="multiply modelled step times (<1 runs faster than the GPU would; default %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json (or its directory) for the router; default: built-in byte tokenizer",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=d.ready_timeout,
        help="seconds each process has to become ready (default %(default)s)",
    )
    p.add_argument(
        "--no-standby",
        dest="standby",
        action="store_false",
        help="run the primary router alone, without a hot standby",
    )
    p.add_argument(
        "--routers",
        type=int,
        default=d.routers,
        metavar="K",
        help="K > 1: run K active routers (on --port, --port + 1, ...; no standby), each following every "
        "agent and the other routers' decision streams, so each counts the others' dispatches as pending "
        "(docs/scale.md; default %(default)s: a primary and its standby)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        metavar="N",
        help="N > 1: the primary router runs as N processes on its one port (python -m router --workers "
        "N: SO_REUSEPORT, each an active router following the others, one /metrics on its admin port); "
        "the standby stays one process and takes over once all N are gone (default %(default)s)",
    )
    p.add_argument(
        "--decision-slot",
        type=float,
        default=d.decision_slot,
        metavar="S",
        help="with --routers K > 1: the routers take turns to decide, each in the first half of its own "
        "S-second slot (python -m router --decision-slot; 0 = off, default %(default)s)",
    )
    p.add_argument(
        "--primary-timeout",
        type=float,
        default=d.primary_timeout,
        help="the standby takes over after this many seconds without the primary's heartbeat, or at "
        "once when the primary's decision stream disconnects (default %(default)s)",
    )
    p.add_argument(
        "--no-metrics", dest="metrics", action="store_false", help="do not start the metrics daemon"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="the metrics daemon's HTTP port; 0 = OS-assigned (default %(default)s)",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="encrypt and authenticate every cluster ZeroMQ stream with CURVE: keys are made under "
        "LOG_DIR/curve (secrets 0600), each process gets its own by environment (docs/security.md)",
    )
    _add_key_arguments(p)
    _add_engine_arguments(p)
    add_ray_arguments(p)


def _add_key_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "keys (docs/security.md)",
        "KEY is file:PATH (one key a line), env:NAME (comma-separated keys) or the key itself (visible in ps: "
        "prefer a file). Repeat a flag to accept several keys. Both routers and the metrics daemon get them "
        "by file or environment, never on their command line. Default: no key, every endpoint open.",
    )
    key = {"action": "append", "default": [], "metavar": "KEY"}
    g.add_argument("--api-key", dest="api_keys", **key, help="generation endpoints and /v1/models")  # type: ignore[arg-type]
    g.add_argument(
        "--admin-key", dest="admin_keys", **key,  # type: ignore[arg-type]
        help="/router/* on the routers (default: the API keys); the launcher sends it to check a takeover",
    )  # fmt: skip
    g.add_argument(
        "--metrics-key", dest="metrics_keys", **key,  # type: ignore[arg-type]
        help="/metrics on the routers and the metrics daemon (default: the admin keys, else the API keys)",
    )  # fmt: skip


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "real SGLang engines",
        "--engine sglang starts one `python -m sglang.launch_server` per GPU (install the `sglang` extra on the GPU "
        "machine); --attach uses servers that already run. Arguments after `--` go to every SGLang server.",
    )
    g.add_argument(
        "--engine",
        choices=("sim", "sglang"),
        default="sim",
        help="emulated engines (sim, default) or real SGLang servers",
    )
    g.add_argument(
        "--model-path",
        default=None,
        help="model directory for --engine sglang; its tokenizer.json and chat template also serve the router",
    )
    g.add_argument(
        "--gpus",
        default=None,
        help="comma-separated GPU indices, one server each (default: 0..N-1 for --instances N)",
    )
    g.add_argument(
        "--attach",
        nargs="+",
        default=[],
        metavar="URL",
        help="attach agents to these running SGLang servers instead of starting engines",
    )
    g.add_argument(
        "--engine-ca-file",
        default=None,
        metavar="PEM",
        help="CA bundle that signed HTTPS engines' certificates (--attach https://...; SGLang --ssl-certfile), "
        "given to every agent and router (default: the system CAs)",
    )
    g.add_argument(
        "--engine-ready-timeout",
        type=float,
        default=1200.0,
        help="seconds a real server has to load its model and answer /health (default %(default)s)",
    )
    g.add_argument(
        "--sglang-load-stream",
        choices=LOAD_MODES,
        default="wildcard",
        help="SGLang 0.5.23 binds its LoadStat stream (counts, no prompts) only on every interface: "
        "'wildcard' does so, 'off' runs without it (no LoadReports; default %(default)s)",
    )
    g.add_argument(
        "--sglang-module", default=SGLANG_MODULE, help=argparse.SUPPRESS
    )  # tests point this at the emulated engine
    g.add_argument("sglang_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def config_from_args(a: argparse.Namespace) -> ClusterConfig:
    """Validate the parsed flags into a :class:`ClusterConfig`; exits with a usage error if invalid."""
    if a.instances < 1:
        sys.exit("launch cluster: error: --instances must be at least 1")
    if not a.primary_timeout > 0:
        sys.exit("launch cluster: error: --primary-timeout must be positive")
    if a.routers < 1:
        sys.exit("launch cluster: error: --routers must be at least 1")
    if a.workers < 1:
        sys.exit("launch cluster: error: --workers must be at least 1")
    if a.workers > 1 and a.routers > 1:
        sys.exit("launch cluster: error: --workers N is for the primary/standby pair, not --routers K > 1")
    if a.decision_slot < 0 or (a.decision_slot > 0 and a.routers == 1):
        sys.exit("launch cluster: error: --decision-slot must be >= 0, and needs --routers > 1")
    if a.policy not in POLICIES:
        sys.exit(f"launch cluster: error: unknown --policy {a.policy!r} ({', '.join(sorted(POLICIES))})")
    try:
        policy_params = params_from_namespace(a)
    except ValueError as exc:
        sys.exit(f"launch cluster: error: {exc}")
    extra = tuple(a.sglang_args[1:] if a.sglang_args[:1] == ["--"] else a.sglang_args)
    if extra and a.engine != "sglang":
        sys.exit(
            f"launch cluster: error: unexpected arguments {' '.join(extra)!r} (extra SGLang arguments need --engine sglang)"
        )
    if a.engine == "sglang" and not a.attach and not a.model_path:
        sys.exit("launch cluster: error: --engine sglang needs --model-path (or --attach URL ...)")
    try:
        gpus = tuple(parse_gpus(a.gpus, a.instances)) if a.engine == "sglang" and not a.attach else ()
    except ValueError as exc:
        sys.exit(f"launch cluster: error: {exc}")
    ray = ray_options_from_args(a)
    auth = ClusterAuth(tuple(a.api_keys), tuple(a.admin_keys), tuple(a.metrics_keys))
    try:
        auth.check()
    except AuthConfigError as exc:
        sys.exit(f"launch cluster: error: {exc}")
    if ray is not None and a.routers > 1:
        sys.exit("launch cluster: error: --ray runs a primary/standby pair; --routers > 1 is one machine's")
    if ray is not None and a.attach:
        sys.exit("launch cluster: error: --ray starts its engines; it does not take --attach")
    tokenizer = a.tokenizer
    if (
        tokenizer is None
        and a.engine == "sglang"
        and a.model_path
        and (Path(a.model_path) / "tokenizer.json").is_file()
    ):
        tokenizer = a.model_path  # the model's own tokenizer and chat template
    return ClusterConfig(
        engine=a.engine,
        model_path=a.model_path,
        gpus=gpus,
        attach=tuple(u.rstrip("/") for u in a.attach),
        sglang_args=extra,
        engine_ready_timeout=a.engine_ready_timeout,
        sglang_module=a.sglang_module,
        instances=len(a.attach) or (len(gpus) if gpus else a.instances),
        host=a.host,
        port=a.port,
        policy=a.policy,
        policy_params=policy_params,
        cluster_file=a.cluster_file,
        log_dir=a.log_dir,
        profile=a.profile,
        model_name=a.model_name,
        page_size=a.page_size,
        max_total_tokens=a.max_total_tokens,
        max_running_requests=a.max_running_requests,
        time_scale=a.time_scale,
        tokenizer=tokenizer,
        ready_timeout=a.ready_timeout,
        standby=a.standby,
        routers=a.routers,
        workers=a.workers,
        decision_slot=a.decision_slot,
        primary_timeout=a.primary_timeout,
        metrics=a.metrics,
        metrics_port=a.metrics_port,
        curve=a.curve,
        sglang_load_stream=a.sglang_load_stream,
        ray=ray,
        auth=auth,
        engine_ca_file=str(Path(a.engine_ca_file).absolute()) if a.engine_ca_file else None,
    )
