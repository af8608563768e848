"""The emulated engine's configuration: a frozen dataclass and ``parse_args`` (SGLang's flags accepted).

``python -m agents.engine.server --help`` lists every flag. Defaults that SGLang takes from environment
variables (health probe, keep-alive) are read here as SGLang reads them (:mod:`agents.engine.health`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from agents.engine.core import EngineConfig
from agents.engine.health import health_check_timeout_default, health_generation_default, keep_alive_default
from agents.engine.profiles import DEFAULT_PROFILE, PROFILES

__all__ = ["ServerConfig", "parse_args"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything one emulated engine needs. Ports 0 = OS-assigned; seconds for intervals."""

    host: str = "127.0.0.1"
    port: int = 0
    model_name: str = "emulated-llama-3.1-8b"
    profile: str = DEFAULT_PROFILE
    page_size: int = 16
    max_total_tokens: int | None = None
    max_running_requests: int = 128
    chunked_prefill_size: int = 8192
    enable_mixed_chunk: bool = False
    context_length: int = 131072
    kv_events_port: int = 0
    kv_replay_port: int = 0
    load_port: int = 0
    kv_topic: str = "kv"
    load_interval: float = 0.1
    buffer_steps: int = 10000
    time_scale: float = 1.0
    stream_interval: int = 1
    log_level: str = "INFO"
    # SGLang reads these three from its environment (srt/environ.py); so does the default here.
    health_generation: bool = field(default_factory=health_generation_default)
    health_check_timeout: float = field(default_factory=health_check_timeout_default)
    keepalive_timeout: float = field(default_factory=keep_alive_default)
    startup_delay: float = 0.0  # seconds /health answers 503 after the port listens (model load + warmup)
    drain_timeout: float = 30.0  # SIGTERM: longest wait for requests in flight (SGLang waits without bound)
    # HTTPS as SGLang 0.5.23 (--ssl-certfile/--ssl-keyfile/--ssl-keyfile-password; no client certificates)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = field(default=None, repr=False)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            page_size=self.page_size,
            max_total_tokens=self.max_total_tokens,
            max_running_requests=self.max_running_requests,
            chunked_prefill_size=self.chunked_prefill_size,
            mixed_chunk=self.enable_mixed_chunk,
            context_length=self.context_length,
        )


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Command-line flags (SGLang's names where SGLang has the flag) to a :class:`ServerConfig`."""
    d = ServerConfig()
    ap = argparse.ArgumentParser(
        prog="python -m agents.engine.server",
        description="Emulated SGLang engine: SGLang's HTTP API, KV event / replay / load ZeroMQ sockets, "
        "a paged radix cache and a step-time model of a GPU. No GPU needed.",
    )
    a = ap.add_argument
    a("--host", default=d.host, help="address for HTTP and ZeroMQ sockets (default %(default)s)")
    a("--port", type=int, default=d.port, help="HTTP port; 0 = OS-assigned (default %(default)s)")
    a("--model-name", default=d.model_name, help="served model name (default %(default)s)")
    a("--profile", default=d.profile, choices=sorted(PROFILES), help="GPU + model step-time profile")
    a("--page-size", type=int, default=d.page_size, help="tokens per KV page / block (default %(default)s)")
    a("--max-total-tokens", type=int, default=None, help="KV capacity in tokens (default: from the profile)")
    a("--max-running-requests", type=int, default=d.max_running_requests, help="running batch cap")
    a(
        "--chunked-prefill-size",
        type=int,
        default=d.chunked_prefill_size,
        help="prefill tokens per step; <=0 off",
    )
    a("--enable-mixed-chunk", action="store_true", help="decode requests ride along in prefill steps")
    a("--context-length", type=int, default=d.context_length, help="model context length in tokens")
    a("--kv-events-port", type=int, default=d.kv_events_port, help="KV event PUB port; 0 = OS-assigned")
    a("--kv-replay-port", type=int, default=d.kv_replay_port, help="KV replay ROUTER port; 0 = OS-assigned")
    a("--load-port", type=int, default=d.load_port, help="LoadStat PUB port; 0 = OS-assigned")
    a("--kv-topic", default=d.kv_topic, help="topic frame of KV event batches (default %(default)s)")
    a("--load-interval", type=float, default=d.load_interval, help="seconds between LoadStat frames")
    a("--buffer-steps", type=int, default=d.buffer_steps, help="KV batches kept for replay")
    a("--time-scale", type=float, default=d.time_scale, help="multiplies every modelled step duration")
    a("--stream-interval", type=int, default=d.stream_interval, help="tokens per streamed chunk")
    a(
        "--startup-delay",
        type=float,
        default=d.startup_delay,
        help="seconds /health answers 503 after the HTTP port listens, as SGLang while it loads and warms "
        "up (default %(default)s)",
    )
    a(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="on SIGTERM, /health answers 503 and requests in flight may finish for at most this many "
        "seconds (default %(default)s); SIGINT stops at once. Environment, as SGLang: "
        "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 makes /health answer at once instead of running the "
        "1-token probe (>= 1 s), SGLANG_HEALTH_CHECK_TIMEOUT (20) bounds the probe, "
        "SGLANG_TIMEOUT_KEEP_ALIVE (5) closes idle HTTP keep-alive connections",
    )
    a("--log-level", default="INFO", help="logging level (default %(default)s)")
    sg = ap.add_argument_group(
        "SGLang's own flags",
        "accepted so a launcher can start this engine exactly like `python -m sglang.launch_server`; "
        "other SGLang-only flags (e.g. --load-format, --tp) are accepted, ignored and listed in a warning",
    )
    sg.add_argument("--model-path", default=None, help="served model name when --served-model-name is absent")
    sg.add_argument("--served-model-name", default=None, help="served model name (overrides --model-name)")
    sg.add_argument(
        "--kv-events-config",
        default=None,
        metavar="JSON",
        help='e.g. \'{"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv",'
        '"buffer_steps":10000}\': sets the KV PUB/replay ports, topic and replay buffer',
    )
    sg.add_argument(
        "--load-publish-endpoint",
        default=None,
        metavar="tcp://HOST:PORT|auto|off",
        help="LoadStat PUB endpoint; auto = the port after the replay port, as SGLang packs it",
    )
    sg.add_argument(
        "--ssl-certfile", default=None, metavar="PATH", help="serve HTTPS with this certificate (PEM)"
    )
    sg.add_argument("--ssl-keyfile", default=None, metavar="PATH", help="the certificate's private key (PEM)")
    sg.add_argument(
        "--ssl-keyfile-password",
        default=None,
        metavar="PASSWORD",
        help="decrypts --ssl-keyfile (visible in ps)",
    )
    ns, unknown = ap.parse_known_args(argv)
    if unknown:
        if any(not u.startswith("-") for u in unknown[:1]):
            ap.error(f"unexpected arguments: {' '.join(unknown)}")
        logging.getLogger(__name__).warning(
            "ignoring SGLang flags the emulated engine has no use for: %s", " ".join(unknown)
        )
    _apply_sglang_flags(ap, ns)
    for name in ("page_size", "max_running_requests", "buffer_steps", "stream_interval", "context_length"):
        if getattr(ns, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if ns.max_total_tokens is not None and ns.max_total_tokens <= 0:
        ap.error("--max-total-tokens must be positive")
    if ns.startup_delay < 0 or ns.drain_timeout < 0:
        ap.error("--startup-delay and --drain-timeout must not be negative")
    if bool(ns.ssl_certfile) != bool(ns.ssl_keyfile):
        ap.error("--ssl-certfile and --ssl-keyfile go together (as SGLang's)")
    if ns.ssl_keyfile_password and not ns.ssl_certfile:
        ap.error("--ssl-keyfile-password has no effect without --ssl-certfile and --ssl-keyfile")
    if ns.time_scale < 0 or ns.load_interval <= 0:
        ap.error("--time-scale must be >= 0 and --load-interval > 0")
    return ServerConfig(**vars(ns))


def _port_of(ap: argparse.ArgumentParser, endpoint: str, what: str) -> int:
    """The port of a ``tcp://HOST:PORT`` endpoint; exits with a usage error otherwise."""
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        ap.error(f"{what} must be tcp://HOST:PORT, got {endpoint!r}")
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except ValueError:
        ap.error(f"{what} has no numeric port: {endpoint!r}")


def _apply_sglang_flags(ap: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Fold SGLang's flag names into this server's own (SGLang ``server_args``/``KVEventsConfig``, 0.5.23)."""
    model_path, served, kv_cfg, load_ep = (
        ns.model_path,
        ns.served_model_name,
        ns.kv_events_config,
        ns.load_publish_endpoint,
    )
    for k in ("model_path", "served_model_name", "kv_events_config", "load_publish_endpoint"):
        delattr(ns, k)
    if served or model_path:
        ns.model_name = served or model_path
    if kv_cfg:
        try:
            cfg = json.loads(kv_cfg)
        except json.JSONDecodeError as exc:
            ap.error(f"--kv-events-config is not JSON: {exc}")
        if not isinstance(cfg, dict) or cfg.get("publisher", "zmq") != "zmq":
            ap.error("--kv-events-config must be a JSON object with publisher 'zmq'")
        ns.kv_events_port = _port_of(ap, str(cfg.get("endpoint", "tcp://*:5557")), "kv-events endpoint")
        if cfg.get("replay_endpoint"):
            ns.kv_replay_port = _port_of(ap, str(cfg["replay_endpoint"]), "kv-events replay_endpoint")
        ns.kv_topic = str(cfg.get("topic", ns.kv_topic))
        ns.buffer_steps = int(cfg.get("buffer_steps", ns.buffer_steps))
    if load_ep and load_ep.lower() not in ("off", "auto"):
        ns.load_port = _port_of(ap, load_ep, "--load-publish-endpoint")
    elif load_ep and load_ep.lower() == "auto" and ns.kv_events_port:
        ns.load_port = ns.kv_events_port + 2  # SGLang packs load after the KV range, past replay = kv + 1
