"""The records of one ``python -m launch chaos-bench`` run (events, finished requests, RSS samples) and their
analysis: which failures an event explains, the figures and the table."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from typing import Any

from launch.failover import machine


@dataclass
class Event:
    """One kill or stop. Times are Unix seconds."""

    at: float
    role: str  # engine, agent, router-primary, router-standby
    instance: str | None
    action: str  # kill or stop
    pid: int
    resumed_at: float | None = None
    detect_s: float | None = None
    heal_s: float | None = None
    index_exact_s: float | None = None
    index_diff: int | None = None

    @property
    def target(self) -> str:
        return self.role + (f"-{self.instance}" if self.instance is not None else "")


@dataclass
class Done:
    start: float
    end: float
    ok: bool
    status: str
    instance: str | None


@dataclass
class Run:
    events: list[Event] = field(default_factory=list)
    requests: list[Done] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    restarted: list[asyncio.subprocess.Process] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ analysis


def explained(d: Done, events: list[Event], grace: float) -> Event | None:
    """The event that explains failed request ``d``: its process was hit while ``d`` was in flight (plus
    ``grace`` s for the failure to surface) and ``d`` depended on it (any router; the engine or agent of
    the instance that served ``d``, or any engine/agent if the router could not say which). A standby
    router serves nothing, so it explains nothing. A 429 (the router refusing for want of capacity) is
    explained by an engine or agent event from the hit until that instance was healed (routable again),
    plus ``grace``: the cluster had one instance fewer."""
    for ev in events:
        hit_until = (ev.resumed_at or ev.at) + grace
        if d.status.startswith("HTTP 429") and ev.role in ("engine", "agent") and ev.heal_s is not None:
            # A refusal for want of capacity: the instance's outage (until it was routable again) is the
            # capacity that was missing, whether or not the request would have gone there.
            hit_until = ev.at + ev.heal_s + grace
        if not (d.start - grace <= hit_until and ev.at <= d.end):
            continue
        if ev.role == "router-primary" or d.instance is None or d.instance == ev.instance:
            return ev
    return None


def analyse(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    failed = [d for d in run.requests if not d.ok]
    unexplained = [d for d in failed if explained(d, run.events, 2.0) is None]
    per_event: dict[int, int] = {}
    for d in failed:
        ev = explained(d, run.events, 2.0)
        if ev is not None:
            per_event[id(ev)] = per_event.get(id(ev), 0) + 1
    rss = run.rss
    return {
        "requests": len(run.requests),
        "failed": len(failed),
        "failed_unexplained": len(unexplained),
        "unexplained_reasons": sorted({d.status[:160] for d in unexplained})[:8],
        "unexplained": [
            {
                "t_s": round(d.start - run.requests[0].start, 2),
                "s": round(d.end - d.start, 3),
                "status": d.status[:160],
            }
            for d in unexplained[:50]
        ],
        "events": [
            {
                "t_s": round(ev.at - (run.requests[0].start if run.requests else ev.at), 1),
                "target": ev.target,
                "action": ev.action,
                "detect_s": ev.detect_s,
                "heal_s": ev.heal_s,
                "index_exact_s": ev.index_exact_s,
                "index_diff": ev.index_diff,
                "failures": per_event.get(id(ev), 0),
            }
            for ev in run.events
        ],
        "router_rss_kib": {
            "start": rss[0][1] if rss else None,
            "end": rss[-1][1] if rss else None,
            "max": max(k for _, k in rss) if rss else None,
            "series": [(round(t - rss[0][0], 1), k) for t, k in rss],
        },
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
    }


def format_report(fig: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = [
        f"chaos bench: {fig['requests']} requests, {fig['failed']} failed, "
        f"{fig['failed_unexplained']} not explained by a killed or stopped process",
        f"machine: {fig['machine']}",
        f"{'t (s)':>7}  {'target':<18} {'action':<6} {'detect s':>9} {'heal s':>8} {'index exact s':>14} {'failures':>9}",
    ]
    for e in fig["events"]:
        lines.append(
            f"{e['t_s']:>7}  {e['target']:<18} {e['action']:<6} {f(e['detect_s']):>9} {f(e['heal_s']):>8} "
            f"{f(e['index_exact_s']):>14} {e['failures']:>9}"
        )
    r = fig["router_rss_kib"]
    lines.append(f"router RSS (KiB): start {f(r['start'])}, end {f(r['end'])}, max {f(r['max'])}")
    for reason in fig["unexplained_reasons"]:
        lines.append(f"  unexplained failure: {reason}")
    if fig.get("unexplained"):
        lines.append("  at t (s): " + ", ".join(str(u["t_s"]) for u in fig["unexplained"]))
    return "\n".join(lines)
