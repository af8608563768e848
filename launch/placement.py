"""Where ``launch cluster --ray`` puts each process: a pure plan over the Ray cluster's nodes.

Theory of operation. A Ray cluster is a set of nodes, each with an address and a map of resources
(``CPU``, ``GPU``, and any custom resource an operator gave it with ``ray start --resources``). The
launcher asks Ray for that list once (:func:`launch.ray_host.list_nodes`) and this module decides,
without Ray:

* **Instances** (an engine + its agent, kept together on one node) go into one placement group, one
  bundle per instance. With real SGLang a bundle holds one GPU (``PACK``: as many instances on a node
  as it has GPUs, whole nodes first); with the emulated engine a bundle holds CPUs only and the group is
  ``STRICT_SPREAD``: one instance per node. ``--ray-instance-resource NAME`` confines bundles to nodes that
  offer that custom resource. :func:`check_instances` says up front when the cluster cannot hold the
  group, instead of leaving the launcher waiting on a group Ray will never place.
* **Routers** go on chosen nodes (``--ray-router-nodes``: node addresses, node-id prefixes or custom
  resource names), pinned by node affinity. The primary takes the first chosen node; the standby the
  first chosen node that is not the primary's (:func:`pick_router_node`), never the same node: a node
  failure must not take both routers. After a takeover the new standby again avoids the new primary's
  node.

What must stay true: a standby is never planned on its primary's node; instances never share a node
with the emulated engine; nothing here imports Ray (the plan is tested without it).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "InstancePlan",
    "PlacementError",
    "RayNode",
    "RayOptions",
    "add_ray_arguments",
    "check_instances",
    "instance_plan",
    "pick_router_node",
    "ray_options_from_args",
    "router_candidates",
    "router_pair",
]

# A custom resource asked for by every bundle that names one: any positive amount confines the bundle to
# nodes that offer it, and this small one never exhausts a node's ``1``.
_MARKER = 0.001


class PlacementError(ValueError):
    """The Ray cluster cannot hold what was asked for (the message says what is missing)."""


@dataclass(frozen=True, slots=True)
class RayOptions:
    """``launch cluster --ray`` settings. CPUs and GPUs in Ray's logical units."""

    address: str
    router_nodes: tuple[str, ...] = ()
    instance_resource: str | None = None
    cpus_per_instance: float = 1.0
    gpus_per_instance: int = 1
    router_cpus: float = 1.0
    placement_timeout: float = 120.0


@dataclass(frozen=True, slots=True)
class RayNode:
    """One Ray node as the plan sees it: its id, its address and its total resources."""

    node_id: str
    ip: str
    resources: Mapping[str, float] = field(default_factory=dict)
    alive: bool = True

    def matches(self, selector: str) -> bool:
        """Whether ``selector`` names this node: its address, a prefix (6+ hex digits) of its id, or a
        custom resource it offers."""
        if selector == self.ip or selector in self.resources:
            return True
        return len(selector) >= 6 and self.node_id.startswith(selector)


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """The instances' placement group: one bundle (a resource map) per instance and Ray's strategy."""

    bundles: tuple[Mapping[str, float], ...]
    strategy: str


def instance_plan(engine: str, instances: int, opts: RayOptions) -> InstancePlan:
    """The placement group for ``instances`` engine + agent pairs of kind ``engine`` (``sim``/``sglang``)."""
    bundle: dict[str, float] = {"CPU": opts.cpus_per_instance}
    if engine == "sglang":
        bundle["GPU"] = float(opts.gpus_per_instance)
    if opts.instance_resource:
        bundle[opts.instance_resource] = _MARKER
    strategy = "PACK" if engine == "sglang" else "STRICT_SPREAD"
    return InstancePlan(tuple(dict(bundle) for _ in range(instances)), strategy)


def _fits(node: RayNode, bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` the node's total resources hold."""
    counts = [int(node.resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def check_instances(nodes: Sequence[RayNode], plan: InstancePlan) -> None:
    """Check that the alive ``nodes`` can hold ``plan`` at all (ignoring what already runs there).

    Raises:
        PlacementError: too few nodes (``STRICT_SPREAD``) or too few resources (``PACK``).
    """
    if not plan.bundles:
        return
    bundle = plan.bundles[0]
    holds = [_fits(n, bundle) for n in nodes if n.alive]
    need = len(plan.bundles)
    want = ", ".join(f"{k}={v:g}" for k, v in bundle.items())
    if plan.strategy == "STRICT_SPREAD":
        have = sum(1 for h in holds if h >= 1)
        if have < need:
            raise PlacementError(
                f"{need} instances of the emulated engine need {need} nodes with {want} each "
                f"(one instance per node); the Ray cluster has {have}"
            )
    elif sum(holds) < need:
        raise PlacementError(
            f"{need} instances need {need} bundles of {want}; the Ray cluster holds {sum(holds)}"
        )


def router_candidates(nodes: Sequence[RayNode], selectors: Sequence[str]) -> list[RayNode]:
    """The alive nodes routers may use: those matching a selector, in selector order (then in address
    order, so the plan does not depend on the order Ray lists nodes in); every alive node when there are
    no selectors."""
    alive = sorted((n for n in nodes if n.alive), key=lambda n: (n.ip, n.node_id))
    if not selectors:
        return alive
    out: list[RayNode] = []
    for sel in selectors:
        out += [n for n in alive if n.matches(sel) and n not in out]
    return out


def pick_router_node(candidates: Sequence[RayNode], avoid: Collection[str]) -> RayNode | None:
    """The first candidate whose node id is not in ``avoid`` (the other router's node), or None."""
    return next((n for n in candidates if n.node_id not in avoid), None)


def router_pair(
    nodes: Sequence[RayNode], selectors: Sequence[str], standby: bool
) -> tuple[RayNode, RayNode | None]:
    """The primary's node and, if ``standby``, the standby's: two different chosen nodes.

    Raises:
        PlacementError: no chosen node is alive, or only one while a standby is wanted.
    """
    cands = router_candidates(nodes, selectors)
    what = f"nodes matching {', '.join(selectors)}" if selectors else "alive nodes"
    if not cands:
        raise PlacementError(f"no router node: no {what}")
    primary = cands[0]
    if not standby:
        return primary, None
    other = pick_router_node(cands, {primary.node_id})
    if other is None:
        raise PlacementError(
            f"the standby router needs a node other than the primary's; of the {what} only one is alive "
            "(name more with --ray-router-nodes, or pass --no-standby)"
        )
    return primary, other


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--ray`` flags of ``launch cluster``."""
    d = RayOptions(address="")
    g = p.add_argument_group(
        "past one machine (Ray)",
        "--ray ADDRESS places every process on a running Ray cluster (pip install 'lmetric-router[ray]'): "
        "one engine + agent pair per GPU (per node with the emulated engine) in a placement group, the "
        "routers on chosen nodes, the standby never on the primary's. See docs/deploy.md.",
    )
    g.add_argument("--ray", default=None, metavar="ADDRESS", help="Ray cluster address (host:port or 'auto')")
    g.add_argument(
        "--ray-router-nodes",
        default="",
        metavar="SEL,...",
        help="nodes the routers may use, by address, node-id prefix or custom resource name, in order of "
        "preference (default: any node)",
    )
    g.add_argument(
        "--ray-instance-resource",
        default=None,
        metavar="NAME",
        help="place instances only on nodes that offer this custom resource",
    )
    g.add_argument(
        "--ray-cpus-per-instance",
        type=float,
        default=d.cpus_per_instance,
        help="logical CPUs reserved per engine + agent pair (default %(default)s)",
    )
    g.add_argument(
        "--ray-router-cpus",
        type=float,
        default=d.router_cpus,
        help="logical CPUs reserved per router (default %(default)s)",
    )
    g.add_argument(
        "--ray-placement-timeout",
        type=float,
        default=d.placement_timeout,
        help="seconds Ray has to place the instances' placement group (default %(default)s)",
    )


def ray_options_from_args(a: argparse.Namespace) -> RayOptions | None:
    """The :class:`RayOptions` of parsed flags, or None without ``--ray``."""
    if not a.ray:
        return None
    return RayOptions(
        address=a.ray,
        router_nodes=tuple(s.strip() for s in a.ray_router_nodes.split(",") if s.strip()),
        instance_resource=a.ray_instance_resource,
        cpus_per_instance=a.ray_cpus_per_instance,
        router_cpus=a.ray_router_cpus,
        placement_timeout=a.ray_placement_timeout,
    )
