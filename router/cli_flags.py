"""The flag groups of ``python -m router`` (:mod:`router.cli`): forwarding and overload
(docs/robustness.md), security (docs/security.md), ``--takeover etcd``'s settings, each with the function
that reads its :class:`~router.config.RouterConfig` fields back; and the flag value types they share."""

from __future__ import annotations

import argparse
from typing import Any

from router.config import RouterConfig


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
        "--engine-queue-allowance", type=int, default=d.engine_queue_allowance, metavar="N",
        help="adaptive in-flight limits: per instance, at most what its engine runs at once plus N, the limit "
        "dropping when more than N requests wait in the engine and growing by one a load report while the "
        "router keeps it full (--max-inflight-per-instance is the ceiling); -1 = a fixed limit of "
        "--max-inflight-per-instance",
    )  # fmt: skip
    g.add_argument(
        "--engine-queue-seconds", type=_non_negative_float, default=d.engine_queue_seconds, metavar="S",
        help="adaptive in-flight limits: an instance's limit also drops while the prompts waiting in its engine "
        "(plus the router's dispatches it has not reported yet) are more than S seconds of its prefill, "
        "measured from its own load reports (SGLang's total_prefill_busy_us over total_prefill_uncached_tokens); "
        "0 = count requests only",
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
        "--max-queue-wait", type=_non_negative_float, default=d.max_queue_wait, metavar="S",
        help="a request that would wait longer than this for a slot gets 429 at once instead of queueing: the "
        "longer of the head of the queue's wait so far and (requests ahead + 1) / the rate requests left the "
        "queue while it was not empty, over the last 2 s (0 = no such bound)",
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
