"""The Intelligent Router trainer's rewards, returns and replay buffer (``launch/rl``). Pure numpy.

Theory of operation
-------------------
An episode is a sequence of routing decisions ``k = 0..K-1`` at virtual times ``t_k`` (a request's
first decision, then one per hold, :data:`launch.sim.cluster.HOLD_S` apart). Two rewards:

``little`` (the default; semi-MDP, average cost): the reward of decision ``k`` is minus the integral,
from ``t_k`` to ``t_{k+1}``, of the number of requests in the system (sent and not finished, whether
held at the router or in an engine), over ``scale``. Summed over an episode that is minus the total time
every request spent in the system, i.e. minus the sum of their E2E (Little's law), so a hold pays for
every request (itself included) waiting during it. Discounting is per elapsed second (``gamma ** dt``),
not per decision: the decisions' spacing varies with the load. The return of decision ``k`` sums the
discounted rewards over a lookahead of ``horizon`` seconds (up to the first decision ``m`` with ``t_m
>= t_k + horizon``) and bootstraps from ``gamma ** (t_m - t_k) x Q(s_m)`` (Double DQN); the last
decision of an episode is not used (the window is a cut of a continuing task, not a terminal state).

``own`` (a per-request alternative, for comparison): a routing decision's return is minus that request's
remaining time in the system (its end minus ``t_k``) over ``scale``, with no bootstrap; a hold's is
``-HOLD_S / scale`` plus the value of the same request's next decision. The sum along one request is
minus its own latency; the cost a request imposes on others is not charged (a selfish router).

Rejected requests leave the system when rejected (``little``) or cost ``scale`` seconds (``own``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Episode", "Replay", "little_returns", "occupancy", "own_returns"]

Arr = npt.NDArray[np.float64]


def occupancy(starts: Arr, ends: Arr, t: Arr) -> Arr:
    """``F(t)``: the integral from 0 to each ``t`` of the number of requests in the system, request
    ``i`` being in it over ``[starts[i], ends[i])`` (request-seconds)."""
    s, e = np.sort(starts), np.sort(ends)
    cs, ce = np.concatenate([[0.0], np.cumsum(s)]), np.concatenate([[0.0], np.cumsum(e)])
    ns, ne = np.searchsorted(s, t, side="right"), np.searchsorted(e, t, side="right")
    out: Arr = (ns * t - cs[ns]) - (ne * t - ce[ne])
    return out


@dataclass(frozen=True)
class Returns:
    """Per decision: the discounted reward sum ``g``, the bootstrap discount ``disc`` and the bootstrap
    decision ``nxt`` (-1: none); ``use`` marks the decisions that become transitions."""

    g: Arr
    disc: Arr
    nxt: npt.NDArray[np.int64]
    use: npt.NDArray[np.bool_]


def little_returns(times: Arr, starts: Arr, ends: Arr, gamma: float, horizon: float, scale: float) -> Returns:
    """The ``little`` returns (module docstring) of decisions at ``times`` (sorted), requests in the
    system over ``[starts, ends)``."""
    k = len(times)
    f = occupancy(starts, ends, times)
    df = np.diff(f) / scale  # cost of the interval after decision j, j < K-1
    m = np.minimum(np.searchsorted(times, times + horizon, side="left"), k - 1)
    m = np.maximum(m, np.minimum(np.arange(k) + 1, k - 1))
    g = np.zeros(k)
    for j in range(k - 1):
        g[j] = -(gamma ** (times[j : m[j]] - times[j])) @ df[j : m[j]]
    disc = gamma ** (times[m] - times)
    use = np.arange(k) < k - 1
    return Returns(g, disc, m.astype(np.int64), use)


def own_returns(
    times: Arr, requests: Sequence[int], ends: dict[int, float | None], routed: Sequence[bool], hold_s: float,
    scale: float,
) -> Returns:  # fmt: skip
    """The ``own`` returns (module docstring): decision ``j`` is for request ``requests[j]``, routed
    (``routed[j]``) or held; ``ends[request]`` its end time (None: rejected)."""
    k = len(times)
    g, disc, nxt = np.zeros(k), np.zeros(k), np.full(k, -1, dtype=np.int64)
    later: dict[int, int] = {}
    for j in range(k - 1, -1, -1):
        r = requests[j]
        if routed[j]:
            end = ends.get(r)
            g[j] = -(end - times[j]) / scale if end is not None else -1.0
        else:
            g[j] = -hold_s / scale
            if r in later:
                nxt[j], disc[j] = later[r], 1.0
        later[r] = j
    return Returns(g, disc, nxt, np.ones(k, dtype=bool))


@dataclass(frozen=True)
class Episode:
    """One episode's transitions: ``cands[j]`` the candidate matrix of decision ``j`` (rows: actions),
    ``actions[j]`` the row taken, and its :class:`Returns`."""

    cands: npt.NDArray[np.float32]
    actions: npt.NDArray[np.int64]
    ret: Returns


class Replay:
    """The last ``keep`` episodes; samples transitions uniformly. Mutates on :meth:`add`."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.episodes: list[Episode] = []

    def add(self, ep: Episode) -> None:
        self.episodes = [*self.episodes, ep][-self.keep :]

    def sample(self, rng: np.random.Generator, n: int) -> tuple[Arr, Arr, Arr, list[npt.NDArray[np.float32]]]:
        """``n`` transitions: the taken actions' feature rows, returns ``g``, bootstrap discounts and the
        bootstrap states' candidate matrices (an empty one where ``disc`` is 0)."""
        pool = [(e, np.flatnonzero(e.ret.use)) for e in self.episodes]
        sizes = np.array([len(ix) for _, ix in pool], dtype=np.float64)
        which = rng.choice(len(pool), size=n, p=sizes / sizes.sum())
        x, g, d, nx = [], [], [], []
        empty = np.zeros((0, 0), dtype=np.float32)
        for w in which:
            e, ix = pool[w]
            j = int(ix[rng.integers(len(ix))])
            x.append(e.cands[j, e.actions[j]])
            g.append(e.ret.g[j])
            d.append(e.ret.disc[j])
            nx.append(e.cands[e.ret.nxt[j]] if e.ret.disc[j] > 0 else empty)
        return np.asarray(x, dtype=np.float64), np.asarray(g), np.asarray(d), nx
