"""``python -m launch COMMAND``: run the cluster, watch its streams, replay traces.

Commands:
  cluster   start emulated engines, agents and the router on this machine (Ctrl-C stops all)
  tail      print the agents' ZeroMQ event and load streams live
  replay    replay a Mooncake or Azure trace against a router or engine URL, streamed
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from launch import cluster, replay, tail


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argparse only here)."""
    p = argparse.ArgumentParser(
        prog="python -m launch",
        description="KV-cache-aware router for SGLang clusters: launch, observe and load-test a cluster.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cluster.add_arguments(
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
    p.add_argument("--log-level", default="INFO", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "cluster":
        cfg = cluster.config_from_args(args)
        try:
            import uvloop

            return uvloop.run(cluster.run_cluster(cfg))
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            return asyncio.run(cluster.run_cluster(cfg))
    if args.command == "tail":
        return tail.run_tail(args)
    return replay.run_replay(args)


if __name__ == "__main__":
    sys.exit(main())
