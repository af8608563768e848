"""ZeroMQ CURVE for the cluster's own streams: which keys a process holds, read from files named in the
environment, and how a socket is armed with them. The only place keys are read or made.

Theory of operation
-------------------
CURVE encrypts a ZeroMQ connection and authenticates both ends. A *binding* socket (PUB, ROUTER) is a
CURVE server: it needs the cluster's server secret key, and it admits only clients whose public key is in
the authorized set (a ZAP handler per ZeroMQ context, :class:`zmq.auth.thread.ThreadAuthenticator`). A
*connecting* socket (SUB, DEALER) is a CURVE client: it needs its own key pair and the server's public
key. One server key pair for the cluster, so that a client needs no endpoint-to-key table (endpoints are
OS-assigned and learnt at run time); one client key pair per process, so that each can be revoked alone.

Key files are pyzmq certificates (:func:`zmq.auth.create_certificates`: ``NAME.key`` public,
``NAME.key_secret`` with both keys); secret files must not be readable by group or others. The
environment variables (all paths):

==================================  ==========================================================
``LMETRIC_CURVE_SERVER_KEY``         the server's public certificate (clients)
``LMETRIC_CURVE_SERVER_SECRET_KEY``  the server's secret certificate (processes that bind)
``LMETRIC_CURVE_SECRET_KEY``         this process's own secret certificate (processes that connect)
``LMETRIC_CURVE_AUTHORIZED_KEYS``    a directory of authorized client public certificates (``*.key``)
==================================  ==========================================================

None set: CURVE is off (plain TCP, the default). Any set: CURVE is on for every socket of the cluster's
own streams, and a missing or unreadable file is a :class:`CurveError` at the first socket. The engines'
streams (SGLang's KV events, replay and LoadStat) speak SGLang's protocol, which has no CURVE: they stay
between an engine and its agent on the engine's host.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "ENV_AUTHORIZED",
    "ENV_SECRET",
    "ENV_SERVER",
    "ENV_SERVER_SECRET",
    "CurveConfig",
    "CurveError",
    "arm",
    "current",
    "generate_cluster_keys",
    "release",
    "set_current",
]

ENV_SERVER: Final = "LMETRIC_CURVE_SERVER_KEY"
ENV_SERVER_SECRET: Final = "LMETRIC_CURVE_SERVER_SECRET_KEY"
ENV_SECRET: Final = "LMETRIC_CURVE_SECRET_KEY"
ENV_AUTHORIZED: Final = "LMETRIC_CURVE_AUTHORIZED_KEYS"
ENV_VARS: Final = (ENV_SERVER, ENV_SERVER_SECRET, ENV_SECRET, ENV_AUTHORIZED)


class CurveError(Exception):
    """CURVE is asked for but a key is missing, unreadable, malformed or readable by others."""


@dataclass(frozen=True)
class CurveConfig:
    """The keys of one process (z85 bytes). ``server_secret`` None: this process cannot bind a CURVE
    socket; ``secret`` None: it cannot connect one. ``authorized`` is the directory of client public
    keys a server admits."""

    server_public: bytes | None = None
    server_secret: bytes | None = None
    public: bytes | None = None
    secret: bytes | None = None
    authorized: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> CurveConfig | None:
        """The keys named by the environment, or None when no CURVE variable is set. Raises
        :class:`CurveError`."""
        env = dict(os.environ) if env is None else env
        if not any(env.get(v) for v in ENV_VARS):
            return None
        server_public = server_secret = public = secret = None
        if env.get(ENV_SERVER):
            server_public, _ = _load(env[ENV_SERVER], secret=False)
        if env.get(ENV_SERVER_SECRET):
            server_public, server_secret = _load(env[ENV_SERVER_SECRET], secret=True)
        if env.get(ENV_SECRET):
            public, secret = _load(env[ENV_SECRET], secret=True)
        authorized = Path(env[ENV_AUTHORIZED]) if env.get(ENV_AUTHORIZED) else None
        if authorized is not None and not authorized.is_dir():
            raise CurveError(f"{ENV_AUTHORIZED}={authorized} is not a directory of public keys")
        if server_secret is not None and authorized is None:
            raise CurveError(f"a CURVE server needs {ENV_AUTHORIZED} (the clients it admits)")
        return cls(server_public, server_secret, public, secret, authorized)


def _load(path: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    p = Path(path)
    try:
        if secret and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CurveError(f"secret key file {p} is readable by others: chmod 600 it")
        public, sec = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read CURVE key {p}: {exc}") from exc
    if secret and sec is None:
        raise CurveError(f"{p} holds no secret key")
    return public, sec


_lock = threading.Lock()
_current: CurveConfig | None = None
_loaded = False
_authenticators: dict[int, ThreadAuthenticator] = {}


def current() -> CurveConfig | None:
    """This process's keys (read from the environment once). Raises :class:`CurveError`."""
    global _current, _loaded
    with _lock:
        if not _loaded:
            _current = CurveConfig.from_env()
            _loaded = True
        return _current


def set_current(cfg: CurveConfig | None) -> None:
    """Replace this process's keys (tests; a process that reads its keys from elsewhere)."""
    global _current, _loaded
    with _lock:
        _current, _loaded = cfg, True


def _authenticate(ctx: zmq.Context[Any], cfg: CurveConfig) -> None:
    """One ZAP handler per underlying ZeroMQ context, admitting ``cfg.authorized``'s keys."""
    handle = ctx.underlying
    with _lock:
        if handle in _authenticators:
            return
        sync: zmq.Context[Any] = zmq.Context.shadow(handle) if isinstance(ctx, zmq.asyncio.Context) else ctx
        auth = ThreadAuthenticator(sync)
        auth.start()
        auth.configure_curve(domain="*", location=str(cfg.authorized))
        _authenticators[handle] = auth


def release(ctx: zmq.Context[Any]) -> None:
    """Stop ``ctx``'s ZAP handler, if it has one: call before terminating a context that bound CURVE
    sockets (the handler's socket would keep ``term()`` waiting). Idempotent."""
    with _lock:
        auth = _authenticators.pop(ctx.underlying, None)
    if auth is not None:
        auth.stop()


def arm(ctx: zmq.Context[Any], sock: Any, *, server: bool) -> None:
    """Make ``sock`` (of ``ctx``) a CURVE server or client with this process's keys; nothing when CURVE
    is off. Call before bind/connect. Raises :class:`CurveError` when the needed key is missing."""
    cfg = current()
    if cfg is None:
        return
    if server:
        if cfg.server_secret is None:
            raise CurveError(f"CURVE is on but this process has no server key ({ENV_SERVER_SECRET})")
        _authenticate(ctx, cfg)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, cfg.server_secret)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)
        return
    if cfg.secret is None or cfg.public is None or cfg.server_public is None:
        raise CurveError(f"CURVE is on but this process lacks {ENV_SECRET} or {ENV_SERVER}")
    sock.setsockopt(zmq.CURVE_SERVERKEY, cfg.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, cfg.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, cfg.secret)


@dataclass(frozen=True)
class ClusterKeys:
    """Where :func:`generate_cluster_keys` put the keys."""

    root: Path
    server_public: Path
    server_secret: Path
    authorized: Path

    def secret_of(self, name: str) -> Path:
        """The secret certificate of client ``name``."""
        return self.root / "secret" / f"{name}.key_secret"

    def env(self, name: str | None, *, server: bool) -> dict[str, str]:
        """The environment of one process: its own client key (``name``; None: none), the server's
        public key, and the server's secret key and the authorized set when it binds (``server``)."""
        out = {ENV_SERVER: str(self.server_public)}
        if name is not None:
            out[ENV_SECRET] = str(self.secret_of(name))
        if server:
            out[ENV_SERVER_SECRET] = str(self.server_secret)
            out[ENV_AUTHORIZED] = str(self.authorized)
        return out


def generate_cluster_keys(root: Path, clients: list[str]) -> ClusterKeys:
    """Make a server key pair and one client key pair per name under ``root`` (replacing old ones).
    Secret files and their directory are private to the user (0600/0700). Returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    secret_dir = root / "secret"
    authorized = root / "authorized"
    for d in (secret_dir, authorized):
        d.mkdir(exist_ok=True)
        for old in d.iterdir():
            old.unlink()
    os.chmod(secret_dir, 0o700)
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(secret_dir, "server")
        for name in clients:
            pub, _ = zmq.auth.create_certificates(secret_dir, name)
            os.replace(pub, authorized / f"{name}.key")
    finally:
        os.umask(old_umask)
    server_public = root / "server.key"
    os.replace(secret_dir / "server.key", server_public)
    os.chmod(server_public, 0o644)
    for p in authorized.iterdir():
        os.chmod(p, 0o644)
    return ClusterKeys(root, server_public, secret_dir / "server.key_secret", authorized)
