"""Who serves, decided by etcd: a leader key attached to a lease (``--takeover etcd``).

Theory of operation
-------------------
The pair's routers campaign for one key, ``PREFIX + "leader"``, in an etcd cluster the user already runs
(etcd's own Raft is the consensus; nothing here votes). A campaign is one transaction: *if the key's
create revision is 0 (it does not exist), put it with this router's lease attached, else read it*. The
winner's **fencing epoch is the key's create revision**: etcd's revision counter only grows, so every
election gives a higher epoch than the last, whoever wins and however many times.

The holder keeps its lease alive (a keep-alive every ``ttl / 3`` s) and serves only while its local lease
deadline has not passed: the deadline is *the send time of the last keep-alive etcd answered* plus the
TTL etcd granted. etcd starts its own countdown when it *receives* that keep-alive, so the holder's
deadline always falls first (clock rates assumed equal, as in every lease). A holder that cannot renew
in time, whose keep-alive etcd answers with TTL 0 (the lease expired: the process was frozen past the
TTL), or whose key is no longer attached to its lease, has **lost** the lease: it stops serving through
the HA node's step-down path. After a freeze the check runs before any queued request is answered,
because the HA node's request gate asks :meth:`EtcdLease.held` (a clock comparison, no I/O).

A standby waits on a watch of the key for its deletion (the lease expired, or the holder resigned by
revoking its lease at shutdown) and campaigns again, at the latest every TTL seconds in case a watch
event was missed. Two routers can therefore serve at once only if clocks run at different rates.

Takeover time after a holder dies without resigning (kill -9, a host lost): the TTL, plus etcd's expiry
check (every 500 ms in etcd 3.4), plus one watch event and one transaction. A clean shutdown revokes
the lease, so the standby takes over within milliseconds.

The etcd client is ``aetcd`` (asyncio, gRPC v3 API; the ``etcd`` extra), imported only when a lease is
made, so this module loads without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "EtcdLease",
    "EtcdUnavailable",
    "Holder",
    "LeaseClock",
    "LeaseError",
    "LeaseHeld",
    "parse_endpoints",
]

log = logging.getLogger(__name__)

RETRY_DELAY = 0.2
"""Seconds between two attempts while etcd cannot be reached."""


class LeaseError(RuntimeError):
    """``--takeover etcd`` cannot start."""


class EtcdUnavailable(LeaseError):
    """The ``aetcd`` client is not installed (``pip install 'lmetric-router[etcd]'``)."""


class LeaseHeld(LeaseError):
    """A router started as primary found the leader key held by another for too long."""


def parse_endpoints(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]`` (an IPv6 host in brackets) as ``((host, port), ...)``. Raises
    ``ValueError`` for an empty list, a missing port or a port out of range."""
    out: list[tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip().removeprefix("http://")
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint must be host:port, got {item!r}")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return tuple(out)


@dataclass(frozen=True)
class Holder:
    """The leader key's current holder: its fencing ``epoch`` (the key's create revision) and what it
    wrote (``router_epoch``, ``http``, ``decisions``, ``pid``; empty strings / 0 when absent)."""

    epoch: int
    router_epoch: str
    http: str
    decisions: str
    pid: int

    @classmethod
    def decode(cls, create_revision: int, value: bytes) -> Holder:
        """From the key's create revision and value; a value that is not this module's JSON gives empty
        fields (another program may write the key; it is still the holder)."""
        try:
            v = json.loads(value)
            if not isinstance(v, dict):
                v = {}
        except ValueError:
            v = {}
        pid = v.get("pid", 0)
        return cls(
            epoch=create_revision,
            router_epoch=str(v.get("router_epoch", "")),
            http=str(v.get("http", "")),
            decisions=str(v.get("decisions", "")),
            pid=pid if isinstance(pid, int) else 0,
        )


class LeaseClock:
    """The holder's local deadline for a lease. Pure (clock injected); monotonic seconds.

    Mutates only in :meth:`renewed` and :meth:`clear`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline: float | None = None

    def renewed(self, sent_at: float, ttl: float) -> None:
        """etcd answered a grant or keep-alive sent at ``sent_at`` with ``ttl`` seconds left."""
        new = sent_at + ttl
        self.deadline = new if self.deadline is None else max(self.deadline, new)

    def clear(self) -> None:
        self.deadline = None

    def held(self) -> bool:
        """Whether the lease surely has not expired in etcd yet."""
        return self.deadline is not None and self.clock() < self.deadline

    def left(self) -> float:
        """Seconds until the deadline (negative once passed; ``-inf`` without a lease)."""
        return float("-inf") if self.deadline is None else self.deadline - self.clock()


class EtcdLease:
    """One router's side of the election: campaign, hold (keep-alive), resign.

    Lifecycle: :meth:`campaign` (blocks until this router holds the key; returns the epoch), then
    :attr:`lost` is set if the lease is lost; :meth:`close` revokes the lease if held (the key goes with
    it). All etcd errors are retried (rotating through the endpoints) and logged; none is raised.
    """

    def __init__(
        self, endpoints: tuple[tuple[str, int], ...], prefix: str, ttl: int, value: dict[str, Any]
    ) -> None:
        if ttl < 1:
            raise ValueError(f"etcd lease TTL must be >= 1 s, got {ttl}")
        try:
            import aetcd
        except ImportError as exc:
            raise EtcdUnavailable(
                "--takeover etcd needs the aetcd client: pip install 'lmetric-router[etcd]'"
            ) from exc
        self._aetcd: Any = aetcd
        self.endpoints = endpoints
        self.key = (prefix.rstrip("/") + "/leader").encode()
        self.ttl = ttl
        self.value = json.dumps(value, sort_keys=True).encode()
        self.clock = LeaseClock()
        self.epoch: int | None = None
        """The fencing epoch while held (the key's create revision)."""
        self.lost = asyncio.Event()
        """Set once a held lease was lost (never set before :meth:`campaign` returned)."""
        self.lost_reason = ""
        self.holder: Holder | None = None
        """The holder last seen while campaigning (None: none seen, or this router)."""
        self.vacant_at: float | None = None
        """Wall clock (Unix s) when the key was last seen deleted or absent by a campaign that then won."""
        self.renewals = 0
        self.renew_failures = 0
        self.campaigns = 0
        self._lease_id: int | None = None
        self._client: Any = None
        self._ep = 0
        self._keepalive: asyncio.Task[None] | None = None
        self._watch_from = 0

    # ------------------------------------------------------------------------------------ connection

    def _conn(self) -> Any:
        if self._client is None:
            host, port = self.endpoints[self._ep % len(self.endpoints)]
            self._client = self._aetcd.Client(host=host, port=port)
        return self._client

    async def _rotate(self, exc: BaseException) -> None:
        """Drop the connection after an error; the next call uses the next endpoint."""
        host, port = self.endpoints[self._ep % len(self.endpoints)]
        log.warning("etcd %s:%d: %s: %s", host, port, type(exc).__name__, exc)
        client, self._client = self._client, None
        self._ep += 1
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 1.0)

    def _rpc_timeout(self) -> float:
        return max(0.5, self.ttl / 2)

    # -------------------------------------------------------------------------------------- campaign

    async def campaign(self) -> int:
        """Block until this router holds the leader key; return its fencing epoch (the key's create
        revision, higher than any earlier holder's). Starts the keep-alive. Retries etcd errors forever
        (cancel the task to give up)."""
        while True:
            try:
                won = await self._try_acquire()
            except (asyncio.TimeoutError, self._aetcd.ClientError, OSError) as exc:
                await self._rotate(exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            if won is not None:
                return won

    async def try_once(self) -> int | None:
        """One campaign round without waiting: the epoch if this router now holds the key, else None
        (:attr:`holder` says who does). Raises the client's errors (``aetcd.ClientError``) and
        ``asyncio.TimeoutError``."""
        c = self._conn()
        sent = time.monotonic()
        lease = await asyncio.wait_for(c.lease(self.ttl), self._rpc_timeout())
        tx = c.transactions
        ok, responses = await asyncio.wait_for(
            c.transaction(
                compare=[tx.create(self.key) == 0],
                success=[tx.put(self.key, self.value, lease=lease.id), tx.get(self.key)],
                failure=[tx.get(self.key)],
            ),
            self._rpc_timeout(),
        )
        got = responses[-1] if responses else []
        kv = got[0][1] if got else None
        if ok:  # the key is ours: the get in the same transaction read it back
            assert kv is not None
            self._lease_id = lease.id
            self.clock.clear()
            self.clock.renewed(sent, lease.ttl)
            self.epoch = int(kv.create_revision)
            self.holder = None
            self.campaigns += 1
            self._keepalive = asyncio.get_running_loop().create_task(self._keep(), name="etcd-keepalive")
            log.info(
                "holding etcd key %s (lease %x, TTL %d s): fencing epoch %d",
                self.key.decode(),
                lease.id,
                lease.ttl,
                self.epoch,
            )
            return self.epoch
        with contextlib.suppress(Exception):  # not needed; let it go now rather than expire
            await asyncio.wait_for(c.revoke_lease(lease.id), self._rpc_timeout())
        self.holder = Holder.decode(int(kv.create_revision), bytes(kv.value)) if kv is not None else None
        self._watch_from = int(kv.header.revision) + 1 if kv is not None else 0
        return None

    async def _try_acquire(self) -> int | None:
        epoch = await self.try_once()
        if epoch is not None:
            return epoch
        if self.holder is not None:
            await self._wait_deleted(self._watch_from)
        return None

    async def _wait_deleted(self, from_revision: int) -> None:
        """Until the key is deleted (from ``from_revision`` on), or one TTL passed (then campaign again in
        case an event was missed). Raises the client's errors."""
        c = self._conn()
        watch = await asyncio.wait_for(
            c.watch(self.key, start_revision=from_revision or None), self._rpc_timeout()
        )

        async def deleted() -> bool:
            async for ev in watch:
                if ev.kind == "DELETE":
                    return True
            return False

        try:
            if await asyncio.wait_for(deleted(), self.ttl):
                self.vacant_at = time.time()
                log.info("etcd key %s deleted: campaigning", self.key.decode())
        except asyncio.TimeoutError:
            pass
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), 1.0)

    # ------------------------------------------------------------------------------------------ hold

    def held(self) -> bool:
        """Whether this router holds the key and its lease surely has not expired (no I/O)."""
        return self.epoch is not None and not self.lost.is_set() and self.clock.held()

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        log.error("lost the etcd lease on %s (epoch %s): %s", self.key.decode(), self.epoch, reason)

    async def _keep(self) -> None:
        interval = self.ttl / 3
        while not self.lost.is_set():
            await asyncio.sleep(interval)
            if not self.clock.held():  # frozen, or renewals failed for a whole TTL
                self._lose(f"no keep-alive answered within the TTL ({self.ttl} s)")
                return
            sent = time.monotonic()
            try:
                c = self._conn()
                reply = await asyncio.wait_for(c.refresh_lease(self._lease_id), max(0.05, self.clock.left()))
                ttl = int(reply.TTL) if reply is not None else 0
                if ttl <= 0:
                    self._lose("etcd says the lease expired (TTL 0)")
                    return
                self.clock.renewed(sent, ttl)
                self.renewals += 1
                kv = await asyncio.wait_for(c.get(self.key), max(0.05, self.clock.left()))
                if kv is None or int(kv.lease) != self._lease_id:
                    self._lose("the leader key is gone or attached to another lease")
                    return
            except (asyncio.TimeoutError, self._aetcd.ClientError, OSError) as exc:
                self.renew_failures += 1
                await self._rotate(exc)
        return

    async def close(self, resign: bool) -> None:
        """Stop the keep-alive; with ``resign`` and the lease held, revoke it (the key is deleted and a
        standby takes over at once). Errors are logged, not raised."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if resign and self._lease_id is not None and not self.lost.is_set():
            try:
                await asyncio.wait_for(self._conn().revoke_lease(self._lease_id), self._rpc_timeout())
                log.info("resigned the etcd key %s (lease revoked)", self.key.decode())
            except (asyncio.TimeoutError, self._aetcd.ClientError, OSError) as exc:
                log.warning("could not revoke the etcd lease: %s", exc)
        self._lease_id = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.close(), 1.0)
            self._client = None

    def collector(self) -> Collector:
        """Prometheus metrics of this lease, read at scrape time."""
        return _LeaseCollector(self)


class _LeaseCollector(Collector):
    def __init__(self, lease: EtcdLease) -> None:
        self._lease = lease

    def collect(self) -> Iterator[Metric]:
        n = self._lease
        yield GaugeMetricFamily(
            "router_lease_held", "1 while this router holds the etcd leader key", value=n.held()
        )
        yield GaugeMetricFamily(
            "router_lease_epoch",
            "The leader key's create revision while held (0: not held)",
            value=n.epoch or 0,
        )
        yield CounterMetricFamily(
            "router_lease_renewals", "etcd lease keep-alives answered", value=n.renewals
        )
        yield CounterMetricFamily(
            "router_lease_renew_failures", "etcd lease keep-alives that failed", value=n.renew_failures
        )
        yield CounterMetricFamily(
            "router_lease_lost", "Times this router lost the etcd lease", value=1 if n.lost.is_set() else 0
        )
