"""The agent's verdict on its engine's health from a run of ``/health`` checks. Pure.

SGLang 0.5.23's ``/health`` is a generation probe that never answers in under a second and answers 503
while the server starts, exits or failed its own probe (``srt/entrypoints/http_server.py``,
``health_generate``; docs/sglang-contract.md). So a 503 is the engine's own word and marks it unhealthy at
once; so does a refused connection (nothing listens on the engine's port: the process is gone or not
started; a busy host drops connections, it does not refuse them). A timeout or another status is only a
failure: ``failures_to_down`` consecutive ones mark it unhealthy, so one slow probe on a busy host does not
take an instance out of routing. A 200 marks it healthy again.
"""

from __future__ import annotations

import enum

__all__ = ["EngineHealth", "Health"]


class Health(enum.Enum):
    """One ``/health`` outcome: ``OK`` (200), ``NOT_READY`` (503: the engine says it is starting, exiting or
    failed its own probe), ``REFUSED`` (the TCP connection was refused: nothing listens on the port) or
    ``FAILED`` (no answer in time, a lost connection, any other status)."""

    OK = "ok"
    NOT_READY = "not_ready"
    REFUSED = "refused"
    FAILED = "failed"


class EngineHealth:
    """Healthy until told otherwise. ``failures_to_down``: consecutive ``FAILED`` checks that mark the
    engine unhealthy (>= 1). Raises ``ValueError`` for a smaller value."""

    def __init__(self, failures_to_down: int) -> None:
        if failures_to_down < 1:
            raise ValueError(f"failures_to_down must be >= 1, got {failures_to_down}")
        self.failures_to_down = failures_to_down
        self.healthy = True
        self.failed_in_row = 0

    def observe(self, result: Health) -> bool:
        """Record one check's ``result``; returns whether the verdict changed. Mutates."""
        if result is Health.FAILED:
            self.failed_in_row += 1
            healthy = self.healthy and self.failed_in_row < self.failures_to_down
        elif result is Health.REFUSED:
            self.failed_in_row += 1
            healthy = False
        else:
            self.failed_in_row = 0
            healthy = result is Health.OK
        changed = healthy != self.healthy
        self.healthy = healthy
        return changed
