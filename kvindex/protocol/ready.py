"""The readiness handshake between the launcher and the processes it starts.

A child process prints exactly one line ``READY {json}`` on stdout once it serves, where the JSON object
is ``{"role": str, "instance": str | null, "pid": int, "endpoints": {name: url}}`` (endpoints are the
addresses it actually bound, e.g. OS-assigned ports). The launcher waits for that line, with a timeout,
before starting what depends on the process. Everything else a child prints is ordinary logging.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

READY_PREFIX = "READY "


@dataclass(frozen=True)
class Ready:
    """A parsed ``READY`` line."""

    role: str
    instance: str | None
    pid: int
    endpoints: dict[str, str] = field(default_factory=dict)


def announce_ready(role: str, endpoints: dict[str, str], instance: str | None = None) -> None:
    """Print the ``READY`` line on stdout and flush it."""
    line = json.dumps({"role": role, "instance": instance, "pid": os.getpid(), "endpoints": endpoints})
    sys.stdout.write(READY_PREFIX + line + "\n")
    sys.stdout.flush()


def parse_ready(line: str) -> Ready | None:
    """The :class:`Ready` in ``line``, or ``None`` if the line is not a well-formed ``READY`` line."""
    if not line.startswith(READY_PREFIX):
        return None
    try:
        obj: Any = json.loads(line[len(READY_PREFIX) :])
        return Ready(
            role=str(obj["role"]),
            instance=None if obj.get("instance") is None else str(obj["instance"]),
            pid=int(obj["pid"]),
            endpoints={str(k): str(v) for k, v in obj.get("endpoints", {}).items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
