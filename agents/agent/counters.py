"""The agent's counters (read by a Prometheus exporter) and a rate-limited logger for bad network input.

Counters are plain ints and :class:`collections.Counter` s mutated only by the agent's owner task; a
reader in the same event loop may read them at any time (no locking needed, no await between updates).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class AgentCounters:
    """Monotonic counters since the agent started.

    Label keys: ``frames_in`` by stream (``kv``, ``load``, ``snapshot``, ``replay``); ``malformed`` by
    ``(stream, reason)`` where reason is a :class:`kvindex.protocol.WireError` reason or ``wrong_topic`` /
    ``unexpected_message``; ``events`` by SGLang event type; ``published`` by cluster topic.

    ``gaps``: live KV frames whose seq skipped ahead. ``replayed_batches``: batches applied from the
    replay socket. ``replay_failures``: replay requests that timed out or returned malformed replies.
    ``resync_incomplete``: gaps the replay could not fill (mirror cleared). ``late_join_incomplete``:
    joins (start, or after an engine restart) whose history could not be replayed back to seq 0.
    ``engine_restarts``: engine seq went back (mirror cleared). ``duplicates``: old frames skipped.
    ``health_checks``: health checks done (after the start). ``health_failures``: failed health checks (timeout, refused, unexpected status).
    ``health_not_ready``: health checks the engine answered 503 (starting, exiting, failed probe).
    """

    frames_in: Counter[str] = field(default_factory=Counter)
    malformed: Counter[tuple[str, str]] = field(default_factory=Counter)
    gaps: int = 0
    replayed_batches: int = 0
    replay_failures: int = 0
    resync_incomplete: int = 0
    late_join_incomplete: int = 0
    engine_restarts: int = 0
    duplicates: int = 0
    health_checks: int = 0
    health_failures: int = 0
    health_not_ready: int = 0
    events: Counter[str] = field(default_factory=Counter)
    published: Counter[str] = field(default_factory=Counter)

    def total_malformed(self) -> int:
        """Sum of ``malformed`` over every stream and reason."""
        return sum(self.malformed.values())
