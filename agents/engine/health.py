"""SGLang's server status and ``/health`` probe, as the emulated engine models them (SGLang 0.5.23).

Theory of operation (facts read from ``srt/entrypoints/http_server.py``, ``health_generate``, and
``srt/managers/tokenizer_manager.py``; see docs/sglang-contract.md):

* A server is ``starting`` from the moment its HTTP port listens until its warmup request succeeded
  (``_execute_server_warmup`` sets ``ServerStatus.Up``), ``up`` afterwards, ``unhealthy`` after a probe
  timed out, and *exiting* once SIGTERM arrived (``SignalHandler.sigterm_handler`` sets
  ``gracefully_exit``). ``/health`` and ``/health_generate`` answer 503 with an empty body while starting
  or exiting, at once.
* Otherwise both run a generation probe: a 1-token request (rid ``HEALTH_CHECK_<hex>``, prompt ids
  ``[0]``). The scheduler runs it only when fully idle (``Scheduler`` skips it when busy, and answers on
  the next batch output instead: the running batch already proves it is alive). The handler then sleeps
  1 s at a time, up to ``SGLANG_HEALTH_CHECK_TIMEOUT`` seconds (default 20), and answers 200 (empty body)
  at the first tick where the scheduler has sent *anything* since the probe began -- so never sooner than
  1 s, busy or idle. If the deadline passes, it answers 503 and marks the server ``unhealthy``; a later
  successful probe marks it ``up`` again.
* ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0`` makes ``/health`` (not ``/health_generate``) answer 200
  at once when the server is up (still 503 while starting or exiting).

This module holds the pure parts (status, environment parsing); the probe's I/O lives in
:mod:`agents.engine.http_api` and the scheduler timestamp in :mod:`agents.engine.server`.
"""

from __future__ import annotations

import enum
import os

ENV_HEALTH_GENERATION = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"
ENV_HEALTH_CHECK_TIMEOUT = "SGLANG_HEALTH_CHECK_TIMEOUT"
ENV_TIMEOUT_KEEP_ALIVE = "SGLANG_TIMEOUT_KEEP_ALIVE"
HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"  # srt/constants.py
PROBE_TICK = 1.0  # seconds the health handler sleeps between looks at the scheduler (fixed in SGLang)
DEFAULT_HEALTH_CHECK_TIMEOUT = 20.0  # srt/entrypoints/http_server.py, HEALTH_CHECK_TIMEOUT
DEFAULT_KEEP_ALIVE = 5.0  # srt/environ.py, SGLANG_TIMEOUT_KEEP_ALIVE, passed to uvicorn's timeout_keep_alive


class ServerStatus(enum.Enum):
    """SGLang's ``ServerStatus`` (``srt/managers/tokenizer_manager.py``) plus the graceful-exit flag."""

    STARTING = "starting"
    UP = "up"
    UNHEALTHY = "unhealthy"
    EXITING = "exiting"


def env_bool(name: str, default: bool) -> bool:
    """An environment flag parsed as SGLang's ``EnvBool`` does (true/1/yes/y, false/0/no/n, any case).

    Raises:
        ValueError: the variable is set to anything else (SGLang refuses it too).
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.lower()
    if value in ("true", "1", "yes", "y"):
        return True
    if value in ("false", "0", "no", "n"):
        return False
    raise ValueError(f"{name}={raw!r} is not a valid boolean value")


def env_seconds(name: str, default: float) -> float:
    """An environment number of seconds (SGLang reads these as ``EnvInt``; a float is accepted here).

    Raises:
        ValueError: the variable is set but not a number.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def health_generation_default() -> bool:
    """Whether ``/health`` runs the generation probe: ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION``, else on."""
    return env_bool(ENV_HEALTH_GENERATION, True)


def health_check_timeout_default() -> float:
    """``SGLANG_HEALTH_CHECK_TIMEOUT`` in seconds, else 20."""
    return env_seconds(ENV_HEALTH_CHECK_TIMEOUT, DEFAULT_HEALTH_CHECK_TIMEOUT)


def keep_alive_default() -> float:
    """``SGLANG_TIMEOUT_KEEP_ALIVE`` in seconds, else 5 (uvicorn's default, which SGLang passes on)."""
    return env_seconds(ENV_TIMEOUT_KEEP_ALIVE, DEFAULT_KEEP_ALIVE)
