"""The emulated engine's three SGLang sockets: the KV event PUB (with its replay buffer), the replay ROUTER
and the load PUB (SGLang 0.5.23 formats, see :mod:`kvindex.protocol`; no CURVE: SGLang's protocol).

* KV PUB ``[topic, seq 8B BE, KVEventBatch]``; each published ``(seq, payload)`` is kept in a buffer of
  ``--buffer-steps`` batches;
* replay ROUTER: receives ``[identity, b"", start_seq 8B]``, answers ``[identity, b"", topic, seq,
  payload]`` per buffered batch with seq >= start then ``[identity, b"", b"", -1 8B, b""]``; malformed
  requests are counted and ignored;
* load PUB ``[b"load", seq 8B BE, LoadStat]`` every ``--load-interval`` seconds, own seq from 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from agents.engine.config import ServerConfig
from agents.engine.core import EngineCore
from kvindex.protocol import (
    REPLAY_END,
    KVEvent,
    KVEventBatch,
    encode_kv_batch,
    encode_load_stat,
    seq_to_bytes,
)
from kvindex.transport import Publisher, bind_router

__all__ = ["EngineStreams"]

log = logging.getLogger("agents.engine")


class EngineStreams:
    """The KV, replay and load sockets of one engine. ``bind()``, run the two loops, ``close()``."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.endpoints: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.malformed_replay_requests = 0
        self._topic = cfg.kv_topic.encode()
        self._replay: deque[tuple[int, bytes]] = deque(maxlen=max(1, cfg.buffer_steps))
        self._actx = zmq.asyncio.Context()
        self._pubs: list[Publisher] = []  # KV events, load: sends never block (drop at the high-water mark)
        self._replay_sock: zmq.asyncio.Socket | None = None

    def _advertise(self, name: str, port: int) -> None:
        self.ports[name] = port
        self.endpoints[name] = f"tcp://{self.cfg.host}:{port}"

    def _publisher(self, name: str, port: int) -> Publisher:
        pub = Publisher(self._actx, self.cfg.host, port, curve=False)  # SGLang's protocol: no CURVE
        self._pubs.append(pub)
        self._advertise(name, pub.port)
        return pub

    def bind(self) -> None:
        """Bind the KV PUB, the replay ROUTER and the load PUB (``kv``, ``replay``, ``load`` in
        :attr:`endpoints` and :attr:`ports`). Raises ``zmq.ZMQError`` (a port in use)."""
        cfg = self.cfg
        self._kv_pub = self._publisher("kv", cfg.kv_events_port)
        self._replay_sock, replay_endpoint = bind_router(
            self._actx, cfg.host, cfg.kv_replay_port, curve=False
        )
        self._advertise("replay", int(replay_endpoint.rsplit(":", 1)[1]))
        self._load_pub = self._publisher("load", cfg.load_port)

    def close(self) -> None:
        """Close every socket and the context."""
        for pub in self._pubs:
            pub.close()
        self._pubs.clear()
        if self._replay_sock is not None:
            self._replay_sock.close(linger=0)
            self._replay_sock = None
        self._actx.term()

    def publish_events(self, events: Sequence[KVEvent]) -> None:
        """Publish ``events`` (if any) as one batch and keep it for replay."""
        if not events:
            return
        payload = encode_kv_batch(KVEventBatch(time.time(), tuple(events), 0))
        seq = self._kv_pub.publish(self._topic, payload)
        if seq >= 0:
            self._replay.append((seq, payload))

    async def replay_loop(self) -> None:
        """Answer replay requests until cancelled."""
        sock = self._replay_sock
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                self.malformed_replay_requests += 1
                log.warning("malformed replay request of %d frames ignored", len(frames))
                continue
            ident, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
            buffered = list(self._replay)  # seqs are consecutive: skip straight to ``start``
            first = buffered[0][0] if buffered else 0
            for seq, payload in buffered[max(0, start - first) :]:
                await sock.send_multipart([ident, b"", self._topic, seq_to_bytes(seq), payload])
            await sock.send_multipart([ident, b"", b"", REPLAY_END, b""])

    async def load_loop(self, core: EngineCore) -> None:
        """Publish ``core``'s load every ``load_interval`` seconds until cancelled."""
        while True:
            payload = encode_load_stat(core.load_stat())
            self._load_pub.publish(b"load", payload)
            await asyncio.sleep(self.cfg.load_interval)
