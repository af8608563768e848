"""Fencing: the epoch (``term``) that decides which of two routers that both think they are primary
keeps serving, and the gate that keeps a router that was frozen from answering before it knows.

Theory of operation
-------------------
Every router has a ``term``: 1 for a router started as primary, 0 for a standby, and at a takeover the
standby takes ``1 +`` the highest term it has seen on any decision stream it reads. Terms travel in every
frame of the decision stream (:class:`~kvindex.protocol.RouterHeartbeat` every 100 ms). Primaries are
ordered by ``(term, router_epoch)`` (the random incarnation id breaks ties between two routers promoted
to the same term). A serving router that receives a heartbeat of a *primary* ordered above itself stops
serving: it closes its HTTP listener (the port is free again), logs it, counts it
(``router_fenced_total``), heartbeats as ``fenced`` and, if asked, exits.

Who reads whom: a standby follows its primary's stream and keeps reading it after a takeover; a
primary reads every peer stream it was given (``--peer-decisions``) or that registered with it (a standby
sends ``POST /router/peers`` with its own stream once it hears its primary). So each of the pair sees the
other whenever the network between them works, and a split healed after a takeover ends with the lower
term stepping down within a heartbeat.

A router frozen while serving (SIGSTOP, a hung loop) cannot see anything until it runs again, and then
the connections queued in its listener are ready at the same instant as the heartbeats queued on its
sockets. :meth:`Fence.suspect` notices the stall (its own beat is late by more than half the standby's
``primary_timeout``: less than that and no standby can have taken over for silence), and requests wait
at the gate until a peer heartbeat *received after the stall* says who is primary (or no peer spoke for
:attr:`Fence.silence` seconds: the peer is gone, so nobody took over). So a router that was deposed while
frozen answers none of the requests it finds on resuming: they get 503 and go to the new primary on
retry.

Not covered: during a split both sides may serve (nothing that needs only the pair can prevent it; a
virtual IP or a Kubernetes Lease decides who gets the traffic, docs/ha.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvindex.protocol import RouterHeartbeat

__all__ = ["FRESH_AFTER", "Fence", "Rank"]

FRESH_AFTER = 0.15
"""Seconds after a stall from which a peer heartbeat counts as news (older ones were queued)."""


@dataclass(frozen=True, order=True)
class Rank:
    """A primary's place in the fencing order: higher ``(term, epoch)`` wins."""

    term: int
    epoch: int


class Fence:
    """One router's fencing state. Pure (clock injected); the HA node feeds it and acts on its answers.

    ``term`` is this router's fencing epoch; ``epoch`` its incarnation id. Times are monotonic seconds.
    """

    def __init__(
        self,
        term: int,
        epoch: int,
        primary_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.term = term
        self.epoch = epoch
        self.clock = clock
        self.stall_after = primary_timeout / 2
        self.silence = max(1.0, 2 * primary_timeout)
        self.highest: Rank | None = None
        """The highest primary seen on another router's stream."""
        self.fenced_by: RouterHeartbeat | None = None
        self.stalls = 0
        self._last_beat = clock()
        self._stalled_at: float | None = None
        self._peer_heard_at: float | None = None

    @property
    def rank(self) -> Rank:
        return Rank(self.term, self.epoch)

    def observe(self, hb: RouterHeartbeat) -> bool:
        """A heartbeat from a decision stream. Returns whether a router serving as ``self`` must step down
        (``hb`` is a primary ranked above it). Mutates the highest term seen and the freshness clock."""
        if hb.router_epoch == self.epoch:
            return False
        self._peer_heard_at = self.clock()
        if hb.role != "primary":
            return False
        rank = Rank(hb.term, hb.router_epoch)
        if self.highest is None or rank > self.highest:
            self.highest = rank
        return rank > self.rank

    def promotion_term(self) -> int:
        """The term to take over with: above every term this router has seen."""
        return max(self.term, self.highest.term if self.highest else 0) + 1

    def beat(self) -> None:
        """Called by the heartbeat loop: a late beat marks a stall."""
        now = self.clock()
        if now - self._last_beat > self.stall_after and self._stalled_at is None:
            self._stalled_at = now
            self.stalls += 1
        self._last_beat = now

    def suspect(self) -> bool:
        """Whether this router may have been deposed while it did not run, and has not heard since.

        Mutates: clears the suspicion once a fresh peer heartbeat came or the peers stayed silent."""
        now = self.clock()
        if self._stalled_at is None and now - self._last_beat > self.stall_after:
            self._stalled_at = now  # the loop is running requests before the late beat
            self.stalls += 1
        if self._stalled_at is None:
            return False
        heard = self._peer_heard_at
        if (
            heard is not None and heard >= self._stalled_at + FRESH_AFTER
        ) or now - self._stalled_at >= self.silence:
            self._stalled_at = None
            return False
        return True
