"""A standby's copy of its primary's decisions, applied through the routing model. Pure.

Theory of operation
-------------------
Every routing decision changes two things in the deciding router besides the choice itself: the request's
blocks become speculative entries of the chosen instance in the index, and the request is added to that
instance's pending dispatches until a load report covers it or it ends. Those are the only parts of a
router's state that the agents' streams do not carry. So the primary publishes each decision
(:class:`~kvindex.protocol.RequestRouted`) and each end (:class:`~kvindex.protocol.RequestFinished`), and a
standby that also follows every agent applies them to its own model with
:meth:`~router.model.model.RoutingModel.apply_remote_decision` and
:meth:`~router.model.model.RoutingModel.finish`: same index, same speculative entries, same pending
accounting, give or take the milliseconds the frames travel.

The stream is at most once. A lost ``RequestRouted`` costs its speculative entries (the engine's own
events follow within a step) and its pending entry (the next load report covers it anyway); a lost
``RequestFinished`` would leave a ticket open forever, so every :class:`~kvindex.protocol.RouterHeartbeat`
lists the primary's open tickets and the mirror forgets any other (frames of one stream arrive in
publishing order, so every decision older than the heartbeat is in).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvindex.protocol import RequestFinished, RequestRouted, RouterHeartbeat
from kvindex.protocol.numbered import DecisionReceived
from router.model.model import RoutingModel

__all__ = ["DecisionMirror", "MirrorStats"]


@dataclass
class MirrorStats:
    """Monotonic counters of what the mirror applied."""

    routed: int = 0
    """RequestRouted applied (speculative insert + pending dispatch)."""
    finished: int = 0
    """RequestFinished that closed a mirrored ticket."""
    unknown_finished: int = 0
    """RequestFinished for a ticket never mirrored (its RequestRouted was lost, or came before we joined)."""
    reconciled: int = 0
    """Mirrored tickets closed because the primary's heartbeat no longer listed them."""
    released: int = 0
    """Mirrored tickets closed at once because the primary went away (takeover or a new primary)."""


class DecisionMirror:
    """Applies a primary's decision stream to a standby's :class:`RoutingModel`. Single owner: the loop.

    ``mono`` is the clock heartbeat arrivals are stamped with (the model's monotonic clock).
    """

    def __init__(self, core: RoutingModel, mono: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self._mono = mono
        self._tickets: dict[tuple[int, int], tuple[str, int]] = {}  # (epoch, primary ticket) -> ours
        self.stats = MirrorStats()
        self.primary: RouterHeartbeat | None = None
        """The last heartbeat of the followed router."""
        self.heartbeat_at: float | None = None
        """When it arrived (``mono``)."""

    @property
    def open_tickets(self) -> int:
        """Mirrored requests still open."""
        return len(self._tickets)

    def on_message(self, rec: DecisionReceived) -> None:
        """Apply one frame. Mutates the core; never raises on content."""
        msg = rec.msg
        if rec.discontinuity == "epoch":  # a different primary process: its tickets are not ours to keep
            self.release(keep_epoch=msg.router_epoch)
        if isinstance(msg, RouterHeartbeat):
            self.primary = msg
            self.heartbeat_at = self._mono()
            self._reconcile(msg)
        elif isinstance(msg, RequestRouted):
            self._routed(msg)
        else:
            self._finished(msg)

    def _routed(self, msg: RequestRouted) -> None:
        ours = self.core.apply_remote_decision(msg.instance, msg.block_hashes, msg.new_tokens, msg.ts)
        self._tickets[(msg.router_epoch, msg.ticket)] = (msg.instance, ours)
        self.stats.routed += 1

    def _finished(self, msg: RequestFinished) -> None:
        got = self._tickets.pop((msg.router_epoch, msg.ticket), None)
        if got is None:
            self.stats.unknown_finished += 1
            return
        self.core.finish(*got)
        self.stats.finished += 1

    def _reconcile(self, hb: RouterHeartbeat) -> None:
        if not self._tickets:
            return
        open_now = set(hb.open_tickets)
        for key in [k for k in self._tickets if k[0] != hb.router_epoch or k[1] not in open_now]:
            self.core.finish(*self._tickets.pop(key))
            self.stats.reconciled += 1

    def release(self, keep_epoch: int | None = None) -> int:
        """Close every mirrored ticket (except those of ``keep_epoch``): their requests died with the
        router that routed them. Mutates; returns how many."""
        keys = [k for k in self._tickets if k[0] != keep_epoch]
        for key in keys:
            self.core.finish(*self._tickets.pop(key))
        self.stats.released += len(keys)
        return len(keys)
