"""The cluster's bearer keys: what ``launch cluster --api-key/--admin-key/--metrics-key`` hands its routers
and metrics daemon, and what its own HTTP calls send.

A KEY is a spec as the router reads it (:func:`router.auth.read_keys`): ``file:PATH``, ``env:NAME`` or the
key itself. No key ever goes on a child's command line or into a log: a ``file:`` spec is passed on as
``file:ABSOLUTE_PATH`` (so SIGHUP to a router re-reads the file: rotation), an ``env:`` spec as itself
(children inherit the launcher's environment), and a literal key goes by environment
(:data:`KEY_ENV`, the child gets ``env:LMETRIC_..._KEY``). Children on other machines (``--ray``) inherit
nothing: there every key travels by value in :data:`KEY_ENV`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from router.auth import AuthConfigError, read_keys

__all__ = ["KEY_ENV", "AuthConfigError", "ClusterAuth", "client_api_key"]

KEY_ENV = {"api": "LMETRIC_API_KEY", "admin": "LMETRIC_ADMIN_KEY", "metrics": "LMETRIC_METRICS_KEY"}
"""Ring -> the variable that carries its literal keys (comma-separated) to a child. ``launch replay``
reads ``LMETRIC_API_KEY`` when it has no ``--api-key``."""


def client_api_key(spec: str | None) -> str | None:
    """The key a client of the router (``launch replay``) sends: the first key of ``spec``, else of the
    variable ``LMETRIC_API_KEY`` when set, else None (no ``Authorization`` header).

    Raises:
        AuthConfigError: ``spec`` names an unreadable file or an unset variable, or holds no key.
    """
    if spec is None:
        if not os.environ.get(KEY_ENV["api"], "").strip():
            return None
        spec = "env:" + KEY_ENV["api"]
    return read_keys(spec)[0]


_FLAG = {"api": "--api-key", "admin": "--admin-key", "metrics": "--metrics-key"}


@dataclass(frozen=True)
class ChildKeys:
    """What one child gets: flags (specs only, never keys) and environment variables (keys)."""

    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ClusterAuth:
    """The key specs of each ring (tuples of specs; empty: that ring is not set). ``repr`` hides them."""

    api: tuple[str, ...] = field(default=(), repr=False)
    admin: tuple[str, ...] = field(default=(), repr=False)
    metrics: tuple[str, ...] = field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin or self.metrics)

    def check(self) -> None:
        """Read every spec once, so a bad one stops the launcher before any child starts.

        Raises:
            AuthConfigError: a file cannot be read, a variable is unset, or a spec holds no key.
        """
        for spec in (*self.api, *self.admin, *self.metrics):
            read_keys(spec)

    def client_key(self, ring: str) -> str | None:
        """The key the launcher itself sends on ``ring``'s endpoints (``admin``: ``/router/*``), falling
        back as the router does (admin -> API); None when that ring is open. Raises
        :class:`AuthConfigError`."""
        order = {
            "api": (self.api,),
            "admin": (self.admin, self.api),
            "metrics": (self.metrics, self.admin, self.api),
        }
        specs = next((s for s in order[ring] if s), ())
        return read_keys(specs[0])[0] if specs else None

    def for_router(self, *, by_value: bool = False) -> ChildKeys:
        """Flags and variables for a router (each ring as given; the router does its own fallbacks)."""
        return self._child({"api": self.api, "admin": self.admin, "metrics": self.metrics}, by_value)

    def for_metrics(self, *, by_value: bool = False) -> ChildKeys:
        """Flags and variables for the metrics daemon: the metrics ring, else the admin ring, else the API
        ring (the router's fallback for ``/metrics``)."""
        ring = next((s for s in (self.metrics, self.admin, self.api) if s), ())
        return self._child({"metrics": ring}, by_value)

    @staticmethod
    def _child(rings: dict[str, tuple[str, ...]], by_value: bool) -> ChildKeys:
        args: list[str] = []
        env: dict[str, str] = {}
        for ring, specs in rings.items():
            literal: list[str] = []
            for spec in specs:
                if by_value or not spec.startswith(("file:", "env:")) or spec == "env:" + KEY_ENV[ring]:
                    literal += read_keys(spec)
                elif spec.startswith("file:"):
                    args += [_FLAG[ring], "file:" + str(Path(spec[5:]).absolute())]
                else:
                    args += [_FLAG[ring], spec]
            if literal:
                env[KEY_ENV[ring]] = ",".join(dict.fromkeys(literal))
                args += [_FLAG[ring], "env:" + KEY_ENV[ring]]
        return ChildKeys(tuple(args), env)
