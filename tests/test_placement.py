"""The Ray placement plan (launch/placement.py), pure: no Ray needed, so it runs everywhere (CI too)."""

from __future__ import annotations

import argparse

import pytest

from launch.placement import (
    PlacementError,
    RayNode,
    RayOptions,
    add_ray_arguments,
    check_instances,
    instance_plan,
    pick_router_node,
    ray_options_from_args,
    router_candidates,
    router_pair,
)

HEAD = RayNode("aaaaaa01", "10.0.0.1", {"CPU": 8, "lmr-router": 1})
W0 = RayNode("bbbbbb02", "10.0.0.2", {"CPU": 8, "GPU": 4, "lmr-engine": 1, "lmr-router": 1})
W1 = RayNode("cccccc03", "10.0.0.3", {"CPU": 8, "GPU": 4, "lmr-engine": 1})
DEAD = RayNode("dddddd04", "10.0.0.4", {"CPU": 8, "GPU": 8, "lmr-engine": 1, "lmr-router": 1}, alive=False)
NODES = [W1, DEAD, W0, HEAD]  # Ray's listing order is not meaningful


def opts(**kw: object) -> RayOptions:
    return RayOptions(address="auto", **kw)  # type: ignore[arg-type]


def test_emulated_instances_spread_one_per_node_on_the_chosen_resource() -> None:
    plan = instance_plan("sim", 2, opts(instance_resource="lmr-engine", cpus_per_instance=2))
    assert plan.strategy == "STRICT_SPREAD"
    assert plan.bundles == ({"CPU": 2, "lmr-engine": 0.001},) * 2
    check_instances(NODES, plan)
    with pytest.raises(PlacementError, match=r"3 nodes .* the Ray cluster has 2"):
        check_instances(
            NODES, instance_plan("sim", 3, opts(instance_resource="lmr-engine"))
        )  # DEAD does not count
    check_instances(NODES, instance_plan("sim", 3, opts()))  # without the resource, the head counts too


def test_sglang_instances_take_one_gpu_each_packed() -> None:
    plan = instance_plan("sglang", 8, opts())
    assert plan.strategy == "PACK" and plan.bundles[0] == {"CPU": 1.0, "GPU": 1.0}
    check_instances(NODES, plan)  # 4 + 4 GPUs alive
    with pytest.raises(PlacementError, match="holds 8"):
        check_instances(NODES, instance_plan("sglang", 9, opts()))
    with pytest.raises(PlacementError, match="holds 4"):
        check_instances(NODES, instance_plan("sglang", 5, opts(gpus_per_instance=2, cpus_per_instance=4)))


def test_routers_on_chosen_nodes_and_the_standby_never_beside_the_primary() -> None:
    assert router_candidates(NODES, ["lmr-router"]) == [HEAD, W0]  # address order, dead left out
    assert router_candidates(NODES, ["10.0.0.3", "lmr-router"]) == [W1, HEAD, W0]  # selector order first
    assert router_candidates(NODES, ["bbbbbb"]) == [W0]  # a node-id prefix
    assert router_candidates(NODES, ["bbb"]) == []  # too short to be an id prefix
    assert router_candidates(NODES, []) == [HEAD, W0, W1]
    assert router_pair(NODES, ["lmr-router"], standby=True) == (HEAD, W0)
    assert router_pair(NODES, ["10.0.0.3"], standby=False) == (W1, None)
    with pytest.raises(PlacementError, match="only one is alive"):
        router_pair(NODES, ["10.0.0.3"], standby=True)
    with pytest.raises(PlacementError, match="no router node"):
        router_pair(NODES, ["nowhere"], standby=False)
    # after a takeover: the new standby avoids the new primary's node, whichever it is
    cands = router_candidates(NODES, ["lmr-router", "lmr-engine"])
    for primary in cands:
        picked = pick_router_node(cands, {primary.node_id})
        assert picked is not None and picked.node_id != primary.node_id
    assert pick_router_node([HEAD], {HEAD.node_id}) is None


def test_flags() -> None:
    p = argparse.ArgumentParser()
    add_ray_arguments(p)
    assert ray_options_from_args(p.parse_args([])) is None
    o = ray_options_from_args(
        p.parse_args(
            ["--ray", "10.0.0.1:6379", "--ray-router-nodes", "a, lmr-router", "--ray-instance-resource", "x"]
        )
    )
    assert o == RayOptions("10.0.0.1:6379", router_nodes=("a", "lmr-router"), instance_resource="x")
