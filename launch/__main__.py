"""``python -m launch COMMAND``: run the cluster, watch its streams, replay traces.

Commands:
  cluster   start emulated engines, agents and the router on this machine, or on a Ray cluster with
            --ray ADDRESS (Ctrl-C stops all)
  tail      print the agents' ZeroMQ event and load streams live
  replay    replay a Mooncake or Azure trace against a router or engine URL, streamed
  failover-bench  SIGKILL the primary router mid-replay; report takeover, failures, hit ratio
  chaos-bench     kill -9 or SIGSTOP a random engine, agent or router every 20 s under a replay
  overload-bench  10x the cluster's measured capacity: 429s, admitted TTFT, router memory
  compare   LMetric against every baseline policy in the simulator, at three load levels
  compare-live  the same trace through our router (per policy) and SGLang's router, live
  train-rl  train the Intelligent Router's Double DQN in the simulator and evaluate it (needs scikit-learn)
  overhead-bench  router CPU per request, latency and throughput: direct, ours, sglang-router
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from launch import (
    cluster,
    cluster_config,
    compare,
    compare_live,
    failover,
    fuzz,
    ray_cluster,
    replay,
    rl,
    tail,
)
from launch.bench import chaos, overhead, overload
from launch.sim import fidelity
from launch.sim import run as simulate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argparse only here)."""
    p = argparse.ArgumentParser(
        prog="python -m launch",
        description="KV-cache-aware router for SGLang clusters: launch, observe and load-test a cluster.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cluster_config.add_arguments(
        sub.add_parser(
            "cluster",
            help="start engines, agents and the router on this machine",
            description=cluster.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    tail.add_arguments(
        sub.add_parser(
            "tail",
            help="print the agents' streams live",
            description=tail.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    replay.add_arguments(
        sub.add_parser(
            "replay",
            help="replay a trace against a URL",
            description=replay.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    simulate.add_arguments(
        sub.add_parser(
            "simulate",
            help="replay a trace through a simulated cluster, once per policy",
            description=simulate.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    fidelity.add_arguments(
        sub.add_parser(
            "fidelity",
            help="compare the simulator with a live emulated cluster on a trace window",
            description=fidelity.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    failover.add_arguments(
        sub.add_parser(
            "failover-bench",
            help="kill the primary router mid-replay; measure takeover, failures and hit ratio",
            description=failover.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    chaos.add_arguments(
        sub.add_parser(
            "chaos-bench",
            help="kill or stop random engines, agents and routers under a replay; failures, detection, healing",
            description=chaos.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    overload.add_arguments(
        sub.add_parser(
            "overload-bench",
            help="10x the cluster's measured capacity: 429 latency, admitted TTFT, router memory",
            description=overload.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    compare.add_arguments(
        sub.add_parser(
            "compare",
            help="LMetric against every baseline in the simulator, at three calibrated loads",
            description=compare.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    compare_live.add_arguments(
        sub.add_parser(
            "compare-live",
            help="one live emulated cluster: our router per policy vs SGLang's own router",
            description=compare_live.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    fuzz.add_arguments(
        sub.add_parser(
            "fuzz",
            help="hypothesis over every network decoder and raw malformed HTTP at a live router",
            description=fuzz.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    rl.add_arguments(
        sub.add_parser(
            "train-rl",
            help="train the Intelligent Router (Double DQN) in the simulator, then evaluate it",
            description=rl.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    overhead.add_arguments(
        sub.add_parser(
            "overhead-bench",
            help="router CPU per request against direct-to-engine and sglang-router (pinned CPUs)",
            description=overhead.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument("--log-level", default="INFO", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "cluster":
        cfg = cluster_config.config_from_args(args)
        # --ray: the same cluster, its processes placed on a Ray cluster (launch/ray_cluster.py)
        c = ray_cluster.RayCluster(cfg) if cfg.ray is not None else None
        try:
            import uvloop

            return uvloop.run(cluster.run_cluster(cfg, c))
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            return asyncio.run(cluster.run_cluster(cfg, c))
    if args.command == "tail":
        return tail.run_tail(args)
    if args.command == "failover-bench":
        return failover.run_failover_bench(args)
    if args.command == "chaos-bench":
        return chaos.run_chaos_bench(args)
    if args.command == "overload-bench":
        return overload.run_overload_bench(args)
    if args.command == "simulate":
        return simulate.run_simulate(args)
    if args.command == "compare":
        return compare.run_compare(args)
    if args.command == "compare-live":
        return compare_live.run_compare_live(args)
    if args.command == "fuzz":
        return fuzz.run_fuzz(args)
    if args.command == "overhead-bench":
        return overhead.run_overhead_bench(args)
    if args.command == "fidelity":
        return fidelity.run_fidelity(args)
    if args.command == "train-rl":
        return rl.run_train_rl(args)
    return replay.run_replay(args)


if __name__ == "__main__":
    sys.exit(main())
