"""Who may use which of the router's HTTP endpoints, and TLS: keys, the aiohttp middleware, SSL contexts.

Theory of operation
-------------------
Three key rings, each a set of accepted bearer keys (several at once, so keys rotate without downtime):
the API keys (generation endpoints and ``/v1/models``), the admin keys (``/router/*``: state, promotion,
peer registration) and the metrics keys (``/metrics``). An empty admin ring falls back to the API ring,
an empty metrics ring to the admin ring; all empty, everything is open, as before. ``/health`` is always
open (load balancers and keepalived probe it). :class:`Access` decides per path; :meth:`Access.middleware`
answers a request without a valid ``Authorization: Bearer KEY`` with 401 and an OpenAI-style body.

Keys are compared (as SHA-256 digests, so equal lengths) with :func:`hmac.compare_digest` against every key of the ring (no early exit), are
never logged, and come from ``file:PATH`` (one key a line), ``env:NAME`` (comma-separated) or the flag
itself. :meth:`KeyRing.load` re-reads them (SIGHUP in :mod:`router.main`).

Towards the engines: once the router checks keys itself, a client's ``Authorization`` header is dropped
before forwarding unless ``forward_client_key``; ``engine_api_key`` replaces it with the router's own key
for the engines (SGLang's ``--api-key``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter

from kvindex.logutil import RateLimitedLog
from kvindex.protocol.http import PATHS, error_body
from router.config import RouterConfig

__all__ = [
    "Access",
    "AuthConfigError",
    "KeyRing",
    "client_ssl",
    "read_keys",
    "require_key",
    "server_ssl",
    "unauthorized",
]

log = logging.getLogger(__name__)
_failures_log = RateLimitedLog(log, 10.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuthConfigError(ValueError):
    """A key spec that names an unreadable file, an unset variable, or holds no key."""


def read_keys(spec: str) -> list[str]:
    """The keys of one spec (module doc). Raises :class:`AuthConfigError`."""
    if spec.startswith("file:"):
        path = Path(spec[5:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise AuthConfigError(f"cannot read key file {path}: {exc.strerror}") from None
        keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        where = f"key file {path}"
    elif spec.startswith("env:"):
        name = spec[4:]
        if name not in os.environ:
            raise AuthConfigError(f"environment variable {name} (a key spec) is not set")
        keys = [k.strip() for k in os.environ[name].split(",") if k.strip()]
        where = f"environment variable {name}"
    else:
        keys, where = [spec.strip()] if spec.strip() else [], "a --*-key flag"
    if not keys:
        raise AuthConfigError(f"{where} holds no key")
    return keys


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyRing:
    """The accepted keys of one kind. ``enabled`` once it holds a key."""

    def __init__(self, specs: Sequence[str], what: str) -> None:
        self.specs = tuple(specs)
        self.what = what
        self._keys: tuple[bytes, ...] = ()
        self.load()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def load(self) -> None:
        """(Re-)read every spec; on error the old keys stay. Raises :class:`AuthConfigError`."""
        keys = [_digest(k.encode()) for spec in self.specs for k in read_keys(spec)]
        self._keys = tuple(dict.fromkeys(keys))

    def accepts(self, authorization: str | None) -> bool:
        """Whether ``authorization`` is ``Bearer KEY`` with a key of the ring (constant time per key,
        every key compared)."""
        if authorization is None:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = _digest(token.strip().encode("utf-8", "surrogateescape"))  # equal lengths: no length leak
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(given, k)
        return ok


class Access:
    """Which ring guards which path, and the middleware that enforces it.

    Raises :class:`AuthConfigError` from the constructor for a key spec that yields no key."""

    def __init__(self, cfg: RouterConfig, registry: CollectorRegistry | None = None) -> None:
        self.api = KeyRing(cfg.api_keys, "API")
        self.admin = KeyRing(cfg.admin_keys, "admin")
        self.metrics_ring = KeyRing(cfg.metrics_keys, "metrics")
        self.forward_client_key = cfg.forward_client_key
        self.engine_key = read_keys(cfg.engine_api_key)[0] if cfg.engine_api_key else None
        ring = next((specs for specs in (cfg.admin_keys, cfg.api_keys) if specs), ())
        self.client_key = read_keys(ring[0])[0] if ring else None
        """The key this router sends to its peer's admin port (the first admin key, else API key)."""
        self.rejected = Counter(
            "router_auth_rejected_total",
            "Requests refused for a missing or wrong key, by the ring that was asked for",
            ["ring"],
            registry=registry,
        )

    def reload(self) -> None:
        """Re-read every key file and variable (key rotation). Raises :class:`AuthConfigError`."""
        for ring in (self.api, self.admin, self.metrics_ring):
            ring.load()
        log.info(
            "keys reloaded: %d API, %d admin, %d metrics",
            len(self.api),
            len(self.admin),
            len(self.metrics_ring),
        )

    def ring_for(self, path: str) -> KeyRing | None:
        """The ring guarding ``path``, None when open."""
        if path == "/health":
            return None
        if path == "/metrics":
            ring = next((r for r in (self.metrics_ring, self.admin, self.api) if r.enabled), None)
        elif path.startswith("/router/"):
            ring = self.admin if self.admin.enabled else self.api
        else:
            ring = self.api
        return ring if ring is not None and ring.enabled else None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """401 without the right key; on the generation paths, the engine-bound Authorization header."""
        ring = self.ring_for(request.path)
        if ring is not None and not ring.accepts(request.headers.get(hdrs.AUTHORIZATION)):
            self.rejected.labels(ring.what).inc()
            _failures_log.warning(
                ring.what,
                "refused %s %s from %s: no valid %s key",
                request.method,
                request.path,
                request.remote,
                ring.what,
            )
            return unauthorized(request, ring)
        if request.path in PATHS:
            headers = self._engine_headers(request)
            if headers is not None:
                request = request.clone(headers=headers)
        return await handler(request)

    def _engine_headers(self, request: web.Request) -> CIMultiDict[str] | None:
        """The request's headers as the engine should see them, None when unchanged."""
        if self.engine_key is not None:
            h = CIMultiDict(request.headers)
            h[hdrs.AUTHORIZATION] = f"Bearer {self.engine_key}"
            return h
        if self.api.enabled and not self.forward_client_key and hdrs.AUTHORIZATION in request.headers:
            h = CIMultiDict(request.headers)
            del h[hdrs.AUTHORIZATION]
            return h
        return None


def unauthorized(request: web.Request, ring: KeyRing) -> web.Response:
    """The 401 answer (OpenAI-style body, ``WWW-Authenticate: Bearer``) to a request without a valid key
    of ``ring``; says whether the key was missing or wrong, never which key."""
    what = "missing" if hdrs.AUTHORIZATION not in request.headers else "invalid"
    body = error_body(401, f"{what} {ring.what} key: send 'Authorization: Bearer <key>'")
    return web.json_response(body, status=401, headers={hdrs.WWW_AUTHENTICATE: "Bearer"})


def require_key(ring: KeyRing, open_paths: frozenset[str] = frozenset({"/health"})) -> Middleware:
    """An aiohttp middleware for a process with one key ring (the metrics daemon): every path but
    ``open_paths`` needs ``Authorization: Bearer KEY`` with a key of ``ring`` (else :func:`unauthorized`,
    logged rate-limited, never the key); an empty ring lets everything through."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        guarded = ring.enabled and request.path not in open_paths
        if guarded and not ring.accepts(request.headers.get(hdrs.AUTHORIZATION)):
            _failures_log.warning(
                ring.what, "refused %s %s from %s: no valid %s key",
                request.method, request.path, request.remote, ring.what,
            )  # fmt: skip
            return unauthorized(request, ring)
        return await handler(request)

    return guard


def server_ssl(cfg: RouterConfig) -> ssl.SSLContext | None:
    """The HTTPS context of the router's listeners, None for plain HTTP. Raises ``OSError`` /
    ``ssl.SSLError`` for an unreadable certificate or key."""
    if not cfg.ssl_certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
    return ctx


def client_ssl(cfg: RouterConfig) -> ssl.SSLContext | bool:
    """What ``aiohttp.TCPConnector(ssl=...)`` gets for HTTPS engines: a context trusting
    ``engine_ca_file``, False when verification is off, True (the system's CAs) otherwise."""
    if not cfg.engine_tls_verify:
        return False
    if cfg.engine_ca_file:
        return ssl.create_default_context(cafile=cfg.engine_ca_file)
    return True


def scheme(cfg: RouterConfig) -> str:
    """``https`` when the router serves TLS, else ``http``."""
    return "https" if cfg.ssl_certfile else "http"
