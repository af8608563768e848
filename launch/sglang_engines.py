"""Real SGLang servers for ``launch cluster --engine sglang``: ports and the server command line. Pure.

One server per GPU, started as ``python -m sglang.launch_server`` with the GPU pinned by
``CUDA_VISIBLE_DEVICES``, its HTTP port, and the two flags that make it publish what the agents follow
(SGLang 0.5.23, ``srt/disaggregation/kv_events.py`` and ``scheduler_components/load_publisher.py``):

* ``--kv-events-config '{"publisher": "zmq", "endpoint": "tcp://HOST:KV", "bind": true,
  "replay_endpoint": "tcp://HOST:REPLAY", "topic": "kv", "buffer_steps": 10000, "hwm": 100000}'`` — the
  KV event PUB stream and its replay ROUTER socket, bound on the engine's host (``"bind": true``: without
  it SGLang connects to a concrete host and binds only wildcards). These carry prompt token ids and have
  no authentication (SGLang's protocol has none): the engine's host should be loopback or a private
  address the agent reaches.
* ``--load-publish-endpoint tcp://*:LOAD`` — the LoadStat PUB stream (counts only, no prompt content).
  SGLang 0.5.23 binds it only on a wildcard host (``parse_bindable_tcp`` refuses a concrete one), so it
  listens on every interface; ``load="off"`` leaves it off (the agent then publishes no LoadReport).

The server advertises those ports in ``GET /server_info`` (``kv_events`` block), where the agent
discovers them. Distinct ports per server come from the OS (bound and released just before the start).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

SGLANG_MODULE = "sglang.launch_server"
KV_TOPIC = "kv"
REPLAY_BUFFER_STEPS = 10_000
PUB_HWM = 100_000


@dataclass(frozen=True)
class EnginePorts:
    """The four ports one SGLang server uses."""

    http: int
    kv: int
    replay: int
    load: int


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS reports free on ``host`` (held open together, then released).

    A port can in principle be taken between this call and the server's bind; the launcher then sees
    the server exit and reports it.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def allocate_ports(host: str = "127.0.0.1") -> EnginePorts:
    """Four free ports for one server."""
    return EnginePorts(*free_ports(4, host))


LOAD_MODES = ("wildcard", "off")


def _tcp_host(host: str) -> str:
    return "*" if host in ("", "*", "0.0.0.0") else (f"[{host}]" if ":" in host else host)


def kv_events_config(ports: EnginePorts, host: str = "127.0.0.1") -> str:
    """The ``--kv-events-config`` JSON for a server on ``ports``, its sockets bound on ``host``."""
    return json.dumps(
        {
            "publisher": "zmq",
            "endpoint": f"tcp://{_tcp_host(host)}:{ports.kv}",
            "bind": True,
            "replay_endpoint": f"tcp://{_tcp_host(host)}:{ports.replay}",
            "topic": KV_TOPIC,
            "buffer_steps": REPLAY_BUFFER_STEPS,
            "hwm": PUB_HWM,
        }
    )


def server_args(
    model_path: str,
    host: str,
    ports: EnginePorts,
    page_size: int,
    extra: tuple[str, ...] = (),
    load: str = "wildcard",
) -> list[str]:
    """Arguments after ``python -m sglang.launch_server`` for one server (``load``: one of
    :data:`LOAD_MODES`, module doc).

    ``extra`` (what the user put after ``--``) comes last, so it may override anything before it.
    """
    load_ep = f"tcp://*:{ports.load}" if load == "wildcard" else "off"
    return [
        "--model-path", model_path,
        "--host", host,
        "--port", str(ports.http),
        "--page-size", str(page_size),
        "--kv-events-config", kv_events_config(ports, host),
        "--load-publish-endpoint", load_ep,
        *extra,
    ]  # fmt: skip


def parse_gpus(spec: str | None, instances: int) -> list[str]:
    """GPU ids from ``--gpus 0,1,...``; without it, ``0 .. instances-1``.

    Raises:
        ValueError: an empty or non-numeric id, or a GPU listed twice.
    """
    if not spec:
        return [str(i) for i in range(instances)]
    gpus = [g.strip() for g in spec.split(",")]
    if any(not g.isdigit() for g in gpus):
        raise ValueError(f"--gpus takes comma-separated GPU indices, got {spec!r}")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus lists a GPU twice: {spec!r}")
    return gpus
