"""A router's decision stream: what it publishes for its hot standby, the metrics daemon and ``launch tail``.

Pure. Multipart ``(topic, seq as 8-byte big-endian, payload)`` like an agent's stream, one sequence number
across both topics, payloads msgpack maps tagged by ``"type"`` (coded by :mod:`kvindex.protocol.messages`).
``router_epoch`` changes whenever the router process restarts (its seq restarts at 0): a random
incarnation id, not comparable between routers. ``term`` is the fencing epoch: a router started as
primary has term 1, a standby takes ``1 +`` the highest term it has seen when it takes over, and a router
that sees a primary with a higher ``(term, router_epoch)`` than its own stops serving (``router/fence.py``).
Delivery is at most once (PUB/SUB): a follower detects a lost frame by the seq and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

TOPIC_DECISIONS: Final = b"decisions"
TOPIC_ROUTER_HEARTBEAT: Final = b"router-hb"
DECISION_TOPICS: Final = (TOPIC_DECISIONS, TOPIC_ROUTER_HEARTBEAT)


@dataclass(frozen=True, slots=True)
class RequestRouted:
    """A router sent a request to ``instance`` (topic ``decisions``).

    ``ticket`` is the router's pending-dispatch ticket, ``request_id`` the client's ``X-Request-Id`` or
    one the router made up. ``block_hashes`` are the request's full-page hashes, which the router inserted
    as speculative entries of ``instance``; ``new_tokens`` its uncached prompt tokens there (queued
    prefill added to the instance until a load report covers it); ``score`` the policy's value for
    ``instance`` (LMetric's product; 0 for round robin). ``ts``: router wall clock, Unix seconds.
    """

    router_epoch: int
    request_id: str
    ticket: int
    instance: str
    policy: str
    ts: float
    prompt_tokens: int
    new_tokens: int
    score: float
    block_hashes: tuple[int, ...] = ()
    failure_cases: tuple[str, ...] = ()
    term: int = 0


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """The request of ``ticket`` on ``instance`` ended (topic ``decisions``), any outcome.

    ``status`` is the router's outcome label (``"200"``, ``"502"``, ``"stream_error"``,
    ``"client_closed"``, ``"connect_failed"``...). ``ts``: router wall clock, Unix seconds.
    """

    router_epoch: int
    request_id: str
    ticket: int
    instance: str
    status: str
    ts: float
    term: int = 0


@dataclass(frozen=True, slots=True)
class RouterHeartbeat:
    """Liveness and role of a router (topic ``router-hb``), sent every ``interval`` seconds.

    ``role`` is ``"primary"`` (serving ``http``), ``"standby"`` (following a primary, ready to take
    ``http`` over) or ``"fenced"`` (a former primary that saw a higher term and stopped serving).
    ``term`` is its fencing epoch (module doc); ``admin`` and ``decisions`` its admin URL and decision
    stream endpoint ("" when off). The counts are the router's at ``ts`` (wall clock, Unix seconds): distinct blocks in
    its index, speculative entries, requests in flight, routable instances. ``open_tickets`` are the
    tickets of its requests in flight: a follower that lost a ``RequestFinished`` (a seq gap) forgets
    every mirrored ticket not listed, since the frames of one stream arrive in publishing order.
    """

    router_epoch: int
    role: str
    ts: float
    http: str
    pid: int
    index_blocks: int = 0
    speculative_blocks: int = 0
    inflight: int = 0
    instances_routable: int = 0
    interval: float = 0.1
    open_tickets: tuple[int, ...] = ()
    term: int = 0
    admin: str = ""
    decisions: str = ""


DecisionMessage: TypeAlias = RequestRouted | RequestFinished | RouterHeartbeat
