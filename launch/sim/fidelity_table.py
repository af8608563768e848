"""The tables of ``python -m launch fidelity``: live runs against simulated runs, metric by metric (means over
runs, the simulator's relative difference, ranges), and the one-line agreement of the compared means."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Getter", "agreement", "format_agreement", "relative", "side_by_side", "spread"]


Getter = Callable[[dict[str, Any]], float | None]


def _at(key: str, stat: str) -> Getter:
    """Reads ``summary[key][stat]`` (e.g. ``"tpot"``, ``"p99"``)."""
    return lambda s: s[key][stat]


def _rows() -> list[tuple[str, Getter]]:
    """The compared metrics: (label, how to read it from a summary); mean TTFT and mean TPOT first."""
    rows: list[tuple[str, Getter]] = [
        ("TTFT mean (s)", _at("ttft", "mean")),
        ("TPOT mean (s)", _at("tpot", "mean")),
    ]
    for k in ("ttft", "tpot", "e2e"):
        for q in ("p50", "p90", "p99"):
            rows.append((f"{k.upper()} {q} (s)", _at(k, q)))
    rows += [
        ("E2E mean (s)", _at("e2e", "mean")),
        ("hit ratio", lambda s: s["hit_ratio"]),
        ("throughput (req/s)", lambda s: s["throughput_rps"]),
        ("output tok/s", lambda s: s["output_tokens_per_s"]),
    ]
    return rows


def spread(runs: Sequence[dict[str, Any]], get: Getter) -> tuple[float, float, float] | None:
    """``(mean, min, max)`` of one metric over ``runs`` (runs lacking it are skipped; None if all do)."""
    vals = [v for v in (get(r) for r in runs) if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals), min(vals), max(vals)


def relative(live: float | None, sim: float | None) -> float | None:
    """``(sim - live) / live``, or None when either is missing or ``live`` is 0."""
    if live is None or sim is None or live == 0:
        return None
    return (sim - live) / live


def _mean(x: tuple[float, float, float] | None) -> float | None:
    return None if x is None else x[0]


def side_by_side(
    live: Sequence[dict[str, Any]],
    sims: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    title: str,
) -> str:
    """A table of the live runs against one or more sets of simulated runs (``(label, runs)``): each
    set's mean over its runs and the simulator's relative difference to the live mean; then, for mean
    TTFT and mean TPOT, each set's min..max over its runs; then the live engines' pacing."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    head = f"{'metric':<20}{'live':>11}"
    for label, _ in sims:
        head += f"{label:>16}{'vs live':>9}"
    lines = [title, f"runs: live {len(live)}, " + ", ".join(f"{label} {len(runs)}" for label, runs in sims)]
    lines.append(
        f"requests: live {live[0]['requests']} ({sum(r['failed'] for r in live)} failed in all runs), "
        + ", ".join(f"{label} {sum(r['failed'] for r in runs)} failed" for label, runs in sims)
    )
    lines.append(head)
    for name, get in _rows():
        lv = _mean(spread(live, get))
        row = f"{name:<20}{f(lv):>11}"
        for _, runs in sims:
            sv = _mean(spread(runs, get))
            d = relative(lv, sv)
            row += f"{f(sv):>16}{'-' if d is None else f'{100 * d:+.1f}%':>9}"
        lines.append(row)
    for key in ("ttft", "tpot"):
        parts = []
        for label, runs in (("live", live), *sims):
            x = spread(runs, _at(key, "mean"))
            if x is not None:
                parts.append(f"{label} {f(x[1])}..{f(x[2])}")
        lines.append(f"{key.upper()} mean range over runs: " + ", ".join(parts))
    for i, r in enumerate(live):
        p = r.get("engine_pace")
        if p:
            lines.append(
                f"live run {i + 1} engine pacing: {p['steps']:.0f} steps, outputs"
                f" {1000 * p['step_lateness_mean_s']:.2f} ms late on average,"
                f" {100 * p['late_steps_over_10ms']:.1f}% of steps > 10 ms late,"
                f" {p['pace_resync_s']:.2f} s given up to overload"
            )
        a = r.get("stream_age")
        if a and a["kv_event_batches"]:
            lines.append(
                f"live run {i + 1} router inputs: KV event batches {1000 * a['kv_event_age_mean_s']:.2f} ms old on"
                f" average ({a['kv_event_batches']:.0f}), load reports {1000 * a['load_report_age_mean_s']:.2f} ms"
                f" ({a['load_reports']:.0f})"
            )
    return "\n".join(lines)


def agreement(live: Sequence[dict[str, Any]], sim: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """``{"ttft_mean", "tpot_mean"}``: the simulator's relative difference of the means over runs."""
    out: dict[str, float | None] = {}
    for key in ("ttft", "tpot"):
        lv, sv = spread(live, _at(key, "mean")), spread(sim, _at(key, "mean"))
        out[f"{key}_mean"] = relative(_mean(lv), _mean(sv))
    return out


def format_agreement(agree: dict[str, float | None], tolerance: float) -> str:
    """One line: each compared mean's relative difference and whether it is within ``tolerance``."""
    parts = []
    for k, v in agree.items():
        label = k.replace("_", " ").upper().replace(" MEAN", " mean")
        if v is None:
            parts.append(f"{label} -")
        else:
            within = "within" if abs(v) <= tolerance else "OUTSIDE"
            parts.append(f"{label} {100 * v:+.1f}% ({within} {100 * tolerance:g}%)")
    return "agreement: " + ", ".join(parts)
