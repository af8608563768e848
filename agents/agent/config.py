"""The agent's configuration and command line. Only :func:`parse_args` knows about argparse."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from agents.agent.engine_link import default_instance_id


@dataclass(frozen=True)
class AgentConfig:
    """Agent settings. Times in seconds; port 0 = OS-assigned; endpoint overrides are ZeroMQ URLs."""

    engine_url: str
    instance_id: str = ""
    host: str = "127.0.0.1"
    pub_port: int = 0
    snapshot_port: int = 0
    heartbeat_interval: float = 0.2
    # SGLang's /health takes >= 1 s (a generation probe; docs/sglang-contract.md), so the timeout must be
    # well above that, and one slow answer must not take an instance out of routing.
    health_interval: float = 2.0
    health_timeout: float = 5.0
    health_failures: int = 3
    publish_token_ids: bool = False
    engine_wait: float = 120.0
    replay_timeout: float = 2.0
    kv_endpoint: str | None = None
    replay_endpoint: str | None = None
    load_endpoint: str | None = None
    log_level: str = "INFO"
    engine_ca_file: str | None = None  # an https:// engine's CA (SGLang --ssl-certfile); None: system CAs
    engine_tls_verify: bool = True

    def instance(self) -> str:
        """``instance_id``, or ``host:port`` of the engine URL when it is empty."""
        return self.instance_id or default_instance_id(self.engine_url)


def parse_args(argv: Sequence[str] | None = None) -> AgentConfig:
    """Parse the command line into an :class:`AgentConfig` (exits with usage on bad flags)."""
    p = argparse.ArgumentParser(
        prog="python -m agents.agent",
        description="Per-instance agent: mirrors one SGLang engine's KV cache from its KV event stream "
        "(repairing gaps from its replay socket), and publishes event batches, load reports and "
        "heartbeats on a ZeroMQ PUB socket; serves full snapshots on a ZeroMQ ROUTER socket. "
        "Prints one 'READY {json}' line on stdout once serving.",
    )
    p.add_argument("--engine-url", required=True, help="engine HTTP base URL, e.g. http://127.0.0.1:30001")
    p.add_argument(
        "--instance-id",
        default="",
        help="name of this instance in the cluster; empty = host:port of --engine-url",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind the PUB and ROUTER sockets on (default: %(default)s)",
    )
    p.add_argument(
        "--pub-port", type=int, default=0, help="PUB socket port (0 = OS-assigned) (default: %(default)s)"
    )
    p.add_argument(
        "--snapshot-port",
        type=int,
        default=0,
        help="snapshot ROUTER port (0 = OS-assigned) (default: %(default)s)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=0.2,
        help="seconds between heartbeats (default: %(default)s)",
    )
    d = AgentConfig(engine_url="")
    p.add_argument(
        "--health-interval",
        type=float,
        default=d.health_interval,
        help="seconds between GET /health checks (default: %(default)s)",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=d.health_timeout,
        help="timeout of one health check, seconds; SGLang's /health runs a 1-token generation probe "
        "and never answers in under 1 s, so keep this well above 1 (default: %(default)s)",
    )
    p.add_argument(
        "--health-failures",
        type=int,
        default=d.health_failures,
        help="consecutive failed health checks (timeout, lost connection, unexpected status) that mark the "
        "engine unhealthy; a 503 (engine starting or exiting) or a refused connection (engine process "
        "gone) marks it at once, a 200 healthy again "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--engine-wait",
        type=float,
        default=120.0,
        help="seconds to wait for the engine to be healthy at start (default: %(default)s)",
    )
    p.add_argument(
        "--replay-timeout",
        type=float,
        default=2.0,
        help="seconds to wait for each replay reply before giving up (default: %(default)s)",
    )
    p.add_argument(
        "--kv-endpoint",
        default=None,
        help="engine KV event PUB endpoint; unset = discovered from GET /server_info",
    )
    p.add_argument(
        "--replay-endpoint",
        default=None,
        help="engine replay ROUTER endpoint; unset = discovered from GET /server_info",
    )
    p.add_argument(
        "--load-endpoint",
        default=None,
        help="engine load PUB endpoint; unset = discovered from GET /server_info",
    )
    p.add_argument(
        "--publish-token-ids",
        action="store_true",
        help="include the prompt token ids of BlockStored events in what the agent publishes and in "
        "snapshots (off by default: routers and the metrics daemon never read them, and they are prompt "
        "content; the agent's own mirror keeps them either way)",
    )
    p.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...) (default: %(default)s)"
    )
    p.add_argument(
        "--engine-ca-file",
        default=None,
        metavar="PATH",
        help="for an https:// --engine-url (SGLang --ssl-certfile): trust this CA bundle instead of the "
        "system's (default: system CAs)",
    )
    p.add_argument(
        "--no-engine-tls-verify",
        dest="engine_tls_verify",
        action="store_false",
        help="do not verify the engine's certificate (testing only)",
    )
    a = p.parse_args(argv)
    if not a.engine_url.startswith(("http://", "https://")):
        p.error("--engine-url must start with http:// or https://")
    for name in ("heartbeat_interval", "health_interval", "health_timeout", "replay_timeout"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.health_failures < 1:
        p.error("--health-failures must be at least 1")
    if a.engine_wait < 0:
        p.error("--engine-wait must not be negative")
    return AgentConfig(
        engine_url=a.engine_url.rstrip("/"),
        instance_id=a.instance_id,
        host=a.host,
        pub_port=a.pub_port,
        snapshot_port=a.snapshot_port,
        heartbeat_interval=a.heartbeat_interval,
        health_interval=a.health_interval,
        health_timeout=a.health_timeout,
        health_failures=a.health_failures,
        engine_wait=a.engine_wait,
        replay_timeout=a.replay_timeout,
        kv_endpoint=a.kv_endpoint,
        replay_endpoint=a.replay_endpoint,
        load_endpoint=a.load_endpoint,
        log_level=a.log_level.upper(),
        publish_token_ids=a.publish_token_ids,
        engine_ca_file=a.engine_ca_file,
        engine_tls_verify=a.engine_tls_verify,
    )
