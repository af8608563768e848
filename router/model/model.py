"""The routing model: the one decision model of the live router, its standby and the simulator.

Pure: no I/O, no asyncio, no zmq, clocks injected. :class:`RoutingModel` owns the global index and the
instance table and adds to :class:`router.model.sync.StreamSync` (which follows the agents' streams) the
decisions themselves:

* :meth:`RoutingModel.route` / :meth:`RoutingModel.route_hashes` score the routable instances with the
  policy (views = last load report + this router's dispatches not yet covered by one), insert the
  request's blocks speculatively on the chosen instance and record a pending dispatch;
* :meth:`RoutingModel.finish` closes it; :meth:`RoutingModel.apply_remote_decision` records another
  router's decision (the standby mirroring its primary);
* :meth:`RoutingModel.add_static` declares an instance that no agent reports (the simulator's engines).

Who drives it: ``router/server.py`` (the live shell: frames from the subscriber, requests from HTTP, a
periodic tick), ``router/model/mirror.py`` (a standby's copy of its primary's decisions) and
``launch/sim/router_model.py`` (delay queues and a virtual clock in front of it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvindex.hashing import block_hashes
from router.model.config import ModelConfig
from router.model.policies import Decision, Policy, make_policy, params_for
from router.model.routed import RoutedBlocks
from router.model.sync import SnapshotJob, StreamSync

__all__ = ["NoLiveInstance", "Routed", "RoutingModel", "SnapshotJob"]

log = logging.getLogger(__name__)


class NoLiveInstance(LookupError):
    """No routable instance (for the requested model, excluding the ones already tried)."""


@dataclass(frozen=True, slots=True)
class Routed:
    """A routing decision with what the shell needs to forward and account for the request.

    ``ticket`` identifies the pending dispatch: pass it to :meth:`RoutingModel.finish`. ``engine_url`` is
    the chosen engine's base URL (no trailing slash). ``block_hashes`` is the request's full-page count,
    ``hashes`` those pages' hashes (inserted speculatively on the chosen instance).
    """

    decision: Decision
    ticket: int
    engine_url: str
    block_hashes: int
    hashes: tuple[int, ...] = ()

    @property
    def instance(self) -> str:
        return self.decision.instance


class RoutingModel(StreamSync):
    """Index + instance table + policy (see the module docstring). Single owner; no locks.

    Args:
        cfg: the model's settings.
        request_snapshot: see :class:`~router.model.sync.StreamSync` (never called for static instances;
            the simulator passes a function that raises).
        policy: overrides ``cfg.policy`` (e.g. a policy object shared with a report).
        mono, wall: clocks (monotonic seconds; Unix seconds), injectable for tests and the simulator.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        request_snapshot: Callable[[SnapshotJob], None],
        *,
        policy: Policy | None = None,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(cfg, request_snapshot, mono=mono, wall=wall)
        self.policy = (
            policy
            if policy is not None
            else make_policy(cfg.policy, params=params_for(cfg.policy_params, cfg.policy))
        )
        self._routed: dict[str, RoutedBlocks] = {}

    def add_static(
        self,
        name: str,
        block_size: int,
        engine_url: str = "",
        *,
        model: str = "",
        routed_capacity_blocks: int = 0,
    ) -> None:
        """Declare instance ``name`` whose engine pages ``block_size`` tokens and that no agent reports:
        up and synced from now on, never timed out (its load comes through :meth:`on_load`, its KV
        events through :meth:`on_events`). ``model``: the model it serves ('' = any). Mutates.

        ``routed_capacity_blocks`` > 0: nothing will report its KV events either (a router without
        agents); the blocks of every request routed to it are recorded as held, in a
        :class:`~router.model.routed.RoutedBlocks` LRU of that many blocks whose evictions are applied
        to the index, instead of speculative entries that expire.

        Raises:
            ValueError: ``block_size`` differs from the model's.
        """
        if self.block_size is None:
            self._make_index(block_size)
        if block_size != self.block_size:
            raise ValueError(f"block size {block_size} differs from the model's {self.block_size}")
        assert self.index is not None
        self.index.add_instance(name)
        st = self.table.ensure(name)
        st.static = st.up = st.ever_up = True
        st.down_reason = None
        st.sync = "synced"
        st.block_size = block_size
        st.static_url = engine_url.rstrip("/")
        st.static_model = model
        if routed_capacity_blocks > 0:
            self._routed[name] = RoutedBlocks(routed_capacity_blocks, block_size)
        else:
            self._routed.pop(name, None)

    # --------------------------------------------------------------------------------------- routing

    def route(
        self,
        token_ids: Sequence[int],
        *,
        hashes: Sequence[int] | None = None,
        model: str | None = None,
        exclude: Collection[str] = (),
    ) -> Routed:
        """Choose an instance for a prompt of ``token_ids`` and account for the dispatch. Mutates.

        ``hashes``: the prompt's block hashes at :attr:`block_size` if already computed (e.g. off the
        event loop for a long prompt); computed here otherwise.

        Only routable instances serving ``model`` (if given; an instance reporting no model serves any)
        and not in ``exclude`` are candidates. The request's blocks are inserted speculatively on the
        chosen instance and a pending dispatch is recorded: call :meth:`finish` when the request ends.

        Raises:
            NoLiveInstance: no candidate.
        """
        if self.index is None:
            raise NoLiveInstance("no live engine instance" + (f" serving model {model!r}" if model else ""))
        if hashes is None:
            hashes = block_hashes(token_ids, self.index.block_size)
        return self.route_hashes(len(token_ids), hashes, model=model, exclude=exclude)

    def route_hashes(
        self,
        prompt_tokens: int,
        hashes: Sequence[int],
        *,
        model: str | None = None,
        exclude: Collection[str] = (),
    ) -> Routed:
        """:meth:`route` for a prompt of ``prompt_tokens`` tokens whose full-page block hashes at
        :attr:`block_size` are ``hashes`` (the simulator's entry point). Mutates.

        Raises:
            NoLiveInstance: no candidate.
        """
        if exclude or model is not None:
            names: set[str] | None = {
                st.name
                for st in self.table.routable()
                if st.name not in exclude and (model is None or st.model in ("", model))
            }
        else:
            names = None
        views = self.table.views(names)
        if not views or self.index is None:
            raise NoLiveInstance("no live engine instance" + (f" serving model {model!r}" if model else ""))
        match = self.index.match_hashes(hashes, prompt_tokens)
        decision = self.policy.choose(views, prompt_tokens, match.cached_tokens)
        routed = self._routed.get(decision.instance)
        if routed is None:
            held = match.cached_tokens.get(decision.instance, 0) // self.index.block_size
            self.index.insert_speculative(decision.instance, match.hashes, self._mono(), held)
        else:
            self._record_routed(routed, decision.instance, match.hashes, match.cached_tokens)
        ticket = self.table.add_pending(decision.instance, decision.new_tokens, self._wall())
        self.stats.decisions[(decision.policy, decision.instance)] += 1
        for kind in decision.failure_cases:
            self.stats.failure_cases[kind] += 1
        st = self.table.get(decision.instance)
        assert st is not None
        return Routed(decision, ticket, st.engine_url, len(match.hashes), tuple(match.hashes))

    def _record_routed(
        self, routed: RoutedBlocks, instance: str, hashes: Sequence[int], cached: Mapping[str, int]
    ) -> None:
        assert self.index is not None
        # The index holds exactly the LRU's blocks for this instance unless speculative entries were
        # added (a standby following its primary): then the match is no hint.
        held = (
            0 if self.index.speculative_blocks(instance) else cached.get(instance, 0) // self.index.block_size
        )
        self.index.apply_batch(instance, routed.record(hashes, held))

    def routed_blocks(self, instance: str) -> RoutedBlocks | None:
        """The LRU of what was routed to static ``instance`` (None: not tracked). Pure."""
        return self._routed.get(instance)

    def apply_remote_decision(
        self, instance: str, block_hashes: Sequence[int], new_tokens: int, dispatched_at: float
    ) -> int:
        """Account for a request another router sent to ``instance`` (a standby follows its primary):
        its ``block_hashes`` become speculative entries there and a pending dispatch of ``new_tokens``
        dated ``dispatched_at`` (the deciding router's Unix seconds, so the same load reports cover it in
        both routers) is recorded. A report that reached this model before the decision and already
        covers it drops it at once. Mutates; returns the local ticket to pass to :meth:`finish`."""
        if self.index is not None and block_hashes:
            self.index.insert_speculative(instance, block_hashes, self._mono())
        ticket = self.table.add_pending(instance, new_tokens, dispatched_at)
        st = self.table.get(instance)
        if st is not None and st.load is not None:
            self.table.on_load(st.load)
        return ticket

    def expire_speculative(self) -> int:
        """Drop speculative index entries older than the TTL now. Mutates; returns how many."""
        return self.index.expire_speculative(self._mono()) if self.index is not None else 0

    def finish(self, instance: str, ticket: int) -> None:
        """The request of ``ticket`` on ``instance`` ended (any outcome). Idempotent; mutates."""
        self.table.finish(instance, ticket)

    def mark_suspect(self, instance: str) -> None:
        """Connecting to ``instance``'s engine failed: stop routing to it until a healthy heartbeat
        arrives after ``cfg.suspect_cooldown``. Mutates."""
        self.table.mark_suspect(instance, self._mono())
        log.warning("instance %s is suspect: its engine refused a connection", instance)

    def clear_suspect(self, instance: str) -> None:
        """``instance``'s engine answered again (a static instance: no heartbeat will say so). Mutates."""
        st = self.table.get(instance)
        if st is not None:
            st.suspect_since = None

    # --------------------------------------------------------------------------------------- queries

    def suspect_static(self) -> list[str]:
        """Static instances marked suspect (their engine refused a connection), in name order."""
        return [st.name for st in self.table if st.static and st.suspect_since is not None]

    def models(self) -> list[str]:
        """Models served by instances that are up (non-empty names from heartbeats), sorted."""
        return sorted({st.model for st in self.table.up() if st.model})

    def serves_model(self, model: str) -> bool:
        """Whether an up instance serves ``model`` (or reports no model name, i.e. serves any)."""
        return any(st.model in ("", model) for st in self.table.up())

    def instances_up(self) -> int:
        """Number of instances that are up."""
        return len(self.table.up())

    def routable_count(self) -> int:
        """Number of routable instances."""
        return len(self.table.routable())

    def state_json(self) -> dict[str, Any]:
        """A JSON-ready dump of the instances and the index (for ``GET /router/state``)."""
        idx = self.index
        insts = []
        for st in sorted(self.table, key=lambda s: s.name):
            d = st.to_json()
            d["blocks"] = idx.blocks_of(st.name) if idx is not None else 0
            d["speculative_blocks"] = idx.speculative_blocks(st.name) if idx is not None else 0
            insts.append(d)
        return {
            "policy": self.policy.name,
            "block_size": self.block_size,
            "instances": insts,
            "index": {
                "total_blocks": idx.total_blocks() if idx is not None else 0,
                "speculative_blocks": idx.speculative_blocks() if idx is not None else 0,
            },
            "failure_cases": dict(self.stats.failure_cases),
            "resyncs": [{"instance": i, "reason": r, "count": n} for (i, r), n in self.stats.resyncs.items()],
        }
