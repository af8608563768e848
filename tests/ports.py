"""A TCP port for a test to hand a server it does not start itself (e.g. ``launch cluster --port P``).

Chosen below the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 by
default), so no socket bound to port 0 meanwhile (the cluster's engines and agents bind OS-assigned
ports) can be given the same port between the check and the server's bind.
"""

from __future__ import annotations

import random
import socket


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A port in ``[low, high)`` that 127.0.0.1 can bind now. Raises ``RuntimeError`` if 200 tries fail."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")
