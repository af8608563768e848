"""The router's (and the metrics daemon's) subscription to the agents' streams, and the snapshot fetch.

One SUB socket per agent (:class:`kvindex.transport.NumberedSubscriber`); each frame reaches
``on_message`` as a :class:`~kvindex.protocol.numbered.Received` that says whether it continues the
agent's stream (see :mod:`kvindex.protocol.numbered`). :func:`fetch_snapshot` asks an agent's ROUTER
socket for its whole mirror over a short-lived DEALER.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import zmq.asyncio

from kvindex.protocol.cluster import Snapshot, SnapshotRequest
from kvindex.protocol.messages import encode_message
from kvindex.protocol.numbered import (
    AGENT_TOPIC_OF,
    Received,
    SnapshotError,
    agent_epoch,
    parse_snapshot_reply,
)
from kvindex.transport import HWM, NumberedSubscriber, RequestFailed, request_reply

__all__ = ["Received", "SnapshotError", "Subscriber", "fetch_snapshot"]


class Subscriber(NumberedSubscriber[Received]):
    """SUB sockets to agent PUB endpoints, handing decoded frames to ``on_message``.

    Lifecycle: construct, :meth:`start` (inside a running event loop), :meth:`close`. ``on_message`` is
    called from the reader tasks, one frame at a time, in each agent's arrival order. A malformed
    endpoint raises ``zmq.ZMQError`` from :meth:`start`/:meth:`add_endpoint`.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        on_message: Callable[[Received], None],
        *,
        ctx: zmq.asyncio.Context | None = None,
        log_interval: float = 5.0,
        rcvhwm: int = HWM,
    ) -> None:
        super().__init__(
            endpoints,
            on_message,
            topic_of=AGENT_TOPIC_OF,
            epoch_of=agent_epoch,
            make=Received,
            ctx=ctx,
            log_interval=log_interval,
            hwm=rcvhwm,
        )


async def fetch_snapshot(ctx: zmq.asyncio.Context, endpoint: str, timeout: float) -> Snapshot:
    """Ask the agent ROUTER socket at ``endpoint`` for its whole mirror; wait at most ``timeout`` s.

    Sends ``[b"", SnapshotRequest]`` on a fresh DEALER and expects ``[b"", Snapshot]``.

    Raises:
        SnapshotError: no reply in time (``timeout``), a reply that is not a Snapshot (``bad_reply``),
        or an endpoint ZeroMQ cannot connect to (``connect``).
    """
    try:
        frames = await request_reply(ctx, endpoint, [b"", encode_message(SnapshotRequest())], timeout)
    except RequestFailed as exc:
        raise SnapshotError(exc.reason, str(exc)) from None
    return parse_snapshot_reply(frames)
