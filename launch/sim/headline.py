"""The headline tables of docs/results.md from ``launch compare --json`` files.

``python -m launch.sim.headline FILE.json ... [--markdown OUT]``: per trace x model x load, every policy's
mean / p99 TTFT, mean / p99 TPOT, mean E2E and hit ratio; LMetric against the paper's claims (vs vLLM-v1
and vs the production scheduler, Bailian); and the issue's three targets per setting: LMetric's mean
TTFT the lowest of the published policies, its mean TPOT at most 2 % above every published policy's,
its mean TTFT within 2 % of the best ``linear`` point.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from router.model.policies import PUBLISHED

__all__ = ["render"]

PAPER: Final = {"vllm_v1": (-92.0, -21.0), "bailian": (-52.0, -20.0)}
"""The LMetric paper's mean TTFT / TPOT change against vLLM-v1 and the production scheduler (percent)."""


def _pct(x: float, base: float) -> float:
    return 100.0 * (x - base) / base


def _targets(rows: dict[str, dict[str, Any]], sweep: dict[str, Any] | None) -> dict[str, Any]:
    lm = rows["lmetric"]
    pub = {p: r for p, r in rows.items() if p in PUBLISHED and p != "lmetric"}
    best_ttft = min(pub, key=lambda p: pub[p]["ttft_mean"])
    best_tpot = min(pub, key=lambda p: pub[p]["tpot_mean"])
    out = {
        "ttft_lowest": lm["ttft_mean"] <= pub[best_ttft]["ttft_mean"],
        "ttft_runner_up": best_ttft,
        "ttft_vs_runner_up_pct": _pct(lm["ttft_mean"], pub[best_ttft]["ttft_mean"]),
        "tpot_best_other": best_tpot,
        "tpot_vs_best_pct": _pct(lm["tpot_mean"], pub[best_tpot]["tpot_mean"]),
    }
    out["tpot_within_2pct"] = out["tpot_vs_best_pct"] <= 2.0
    if sweep is not None:
        out["linear_gap_pct"] = sweep["lmetric_gap_pct"]
        out["linear_best_b"] = sweep["best_b"]
        out["linear_within_2pct"] = sweep["lmetric_gap_pct"] <= 2.0
    return out


def render(files: Sequence[Path]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown and one target record per setting."""
    md: list[str] = []
    records: list[dict[str, Any]] = []
    for f in files:
        d = json.loads(f.read_text())
        trace = Path(d["trace"]).stem
        model = d["config"]["profile"]
        for lv, L in d["levels"].items():
            rows = {r["policy"]: r for r in L["rows"]}
            t = _targets(rows, L.get("linear_sweep"))
            records.append({"trace": trace, "model": model, "level": lv, "rate_scale": L["rate_scale"], **t})
            md += [f"#### {trace}, 16 x {model}, {lv} (rate scale {L['rate_scale']:g})", ""]
            md += ["| policy | TTFT mean (s) | TTFT p99 (s) | TPOT mean (ms) | TPOT p99 (ms) | E2E mean (s) "
                   "| hit ratio |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for p, r in rows.items():
                e2e = r.get("e2e_mean")
                name = f"**{p}**" if p == "lmetric" else p
                md.append(
                    f"| {name} | {r['ttft_mean']:.3f} | {r['ttft_p99']:.2f} | {1e3 * r['tpot_mean']:.1f} "
                    f"| {1e3 * r['tpot_p99']:.0f} | {'-' if e2e is None else f'{e2e:.2f}'} "
                    f"| {100 * r['hit_ratio']:.1f} % |"
                )
            lm = rows["lmetric"]
            claims = []
            for base, (pt, pp) in PAPER.items():
                if base in rows:
                    ot = _pct(lm["ttft_mean"], rows[base]["ttft_mean"])
                    op = _pct(lm["tpot_mean"], rows[base]["tpot_mean"])
                    claims.append(
                        f"vs {base}: TTFT {ot:+.1f} % (paper {pt:+.0f} %), TPOT {op:+.1f} % (paper {pp:+.0f} %)"
                    )
            md += ["", "LMetric " + "; ".join(claims) + "."]
            lin = (
                f" Best linear point b = {t['linear_best_b']:g}: LMetric {t['linear_gap_pct']:+.1f} % from it."
                if "linear_gap_pct" in t
                else ""
            )
            md += [
                f"Targets: TTFT lowest of the published {'yes' if t['ttft_lowest'] else 'NO'} "
                f"({t['ttft_vs_runner_up_pct']:+.1f} % vs {t['ttft_runner_up']}); TPOT within 2 % of the best "
                f"{'yes' if t['tpot_within_2pct'] else 'NO'} ({t['tpot_vs_best_pct']:+.1f} % vs "
                f"{t['tpot_best_other']}).{lin}",
                "",
            ]
    return "\n".join(md), records


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sim.headline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="the target records")
    a = p.parse_args(argv)
    text, records = render(a.files)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
