"""The routing model's settings: the one place their defaults live.

The live router (:class:`router.config.RouterConfig`), the standby and the simulator
(:class:`launch.sim.cluster.SimConfig`) take their defaults from :class:`ModelConfig` and hand the model
one of these; no other module repeats a default.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """How the routing model decides and keeps its state. Times in seconds, sizes in tokens.

    ``block_size`` None means "learn it from the first heartbeat". ``heartbeat_timeout``: an instance
    whose agent sent no heartbeat for this long is down. ``speculative_ttl``: unconfirmed speculative
    index entries expire after this long; at most ``max_speculative_per_instance`` per instance.
    ``load_coverage_margin``: a load report stamped at least this long after a dispatch covers it.
    ``suspect_cooldown``: after a failed connection to an engine, how long before a healthy heartbeat
    makes it routable again. ``policy``: a name from :data:`router.model.policies.POLICIES`;
    ``policy_params``: ``(policy, parameter, value)`` triples for the policies' ``PARAMS`` (only the
    values given; the rest keep the classes' defaults), checked by ``make_policy`` (which this leaf
    module cannot import) when the model is built.

    Raises ``ValueError`` from the constructor for a value out of range.
    """

    policy: str = "lmetric"
    block_size: int | None = None
    heartbeat_timeout: float = 1.0
    speculative_ttl: float = 5.0
    max_speculative_per_instance: int = 65536
    load_coverage_margin: float = 0.02
    suspect_cooldown: float = 0.5
    policy_params: tuple[tuple[str, str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        for name in ("heartbeat_timeout", "speculative_ttl"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_speculative_per_instance < 0:
            raise ValueError("max_speculative_per_instance must be >= 0")
        if min(self.load_coverage_margin, self.suspect_cooldown) < 0:
            raise ValueError("load_coverage_margin and suspect_cooldown must be >= 0")
        for triple in self.policy_params:
            if len(triple) != 3 or not isinstance(triple[2], int | float):
                raise ValueError(f"policy_params holds (policy, parameter, value) triples, got {triple!r}")


DEFAULTS = ModelConfig()
"""The default settings (read by the shells' own config classes for their defaults)."""
