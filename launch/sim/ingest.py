"""The simulated router's ingest: the work from a request's send to its routing decision (client write, HTTP
transfer, JSON parse of the token ids, block hashing) as a processor-sharing server, and its measured
constants. Pure; :mod:`launch.sim.cluster` routes each request at its :func:`ingest_times` time, and
``launch fidelity`` / ``launch tpot-join`` compare the same prediction with live runs."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

INGEST_OVERHEAD_S = 0.001
INGEST_PER_TOKEN_S = 0.26e-6
"""The router's ingest work per request, from send to routing decision (client write, HTTP transfer,
JSON parse of the token ids, block hashing): ``INGEST_OVERHEAD_S + INGEST_PER_TOKEN_S * prompt tokens``
seconds, served by one shared CPU, processor-sharing (:func:`ingest_times`). Measured on this project's
live router (2-vCPU host) with ``launch fidelity``: on the Azure trace, where requests rarely overlap,
send-to-route delays fit 1.0-1.1 ms + 0.25-0.27 us per token; with those constants the processor-sharing
queue predicts the Mooncake trace's burst delays (mean 24-26 ms predicted, 19-22 ms observed). It matters
because the Mooncake trace's timestamps come in 3 s steps, so a dozen requests share one and are routed
shortest first; routed in trace order instead (both 0), the simulator's mean TPOT was 12-32 % below the
live one in seven of eight level runs (docs/simulator.md)."""


def ingest_times(
    sends: Sequence[float], sizes: Sequence[int], overhead: float, per_token: float
) -> list[float]:
    """When each request is routed: a processor-sharing server (the router's one event loop reads and
    parses every request in flight at once) with ``overhead + per_token * size`` seconds of work per
    request. ``sends`` in seconds, ``sizes`` in prompt tokens, same order; the result in that order.

    A lone request is routed its work after its send; ``n`` requests sent together share the server, so
    the shortest is routed first, and the longest only after all of them (``sum`` of their work). Both
    constants 0: the send times.
    """
    n = len(sends)
    if overhead == 0.0 and per_token == 0.0:
        return [float(t) for t in sends]
    order = sorted(range(n), key=lambda i: (sends[i], i))
    out = [0.0] * n
    # (virtual finish, request); virtual time advances at 1 / (requests in service) per second
    heap: list[tuple[float, int]] = []
    t = v = 0.0
    k = 0
    while k < n or heap:
        next_send = sends[order[k]] if k < n else math.inf
        if heap:
            vf, i = heap[0]
            t_fin = t + (vf - v) * len(heap)
            if t_fin <= next_send:
                heapq.heappop(heap)
                t, v = t_fin, vf
                out[i] = t
                continue
            v += (next_send - t) / len(heap)
        t = next_send
        i = order[k]
        k += 1
        heapq.heappush(heap, (v + overhead + per_token * sizes[i], i))
    return out
