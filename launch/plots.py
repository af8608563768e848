"""CDF plots of per-request latencies, one curve per routing policy (``simulate --plot``, ``compare --plot``).

Policies often give near-identical curves (``lmetric`` and ``lmetric_plain`` coincide wherever no
failure case fires), so each curve has its own colour, line style, marker and width, the earlier
policies drawn wider: a curve drawn on top of an identical one leaves the one below visible around it.
Titles are wrapped onto a second line and figures saved with a tight bounding box, so long titles and the
last tick label of the log x axis are never cut off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "X", "<", ">")


def curve_style(i: int) -> dict[str, Any]:
    """Matplotlib keyword arguments for the ``i``-th curve (0-based) of a plot: distinct colour, line
    style and marker for the first 12, widths from 3.0 down to 1.2 points."""
    return {
        "color": f"C{i % 10}",
        "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        "marker": _MARKERS[i % len(_MARKERS)],
        "markersize": 4.5,
        "markevery": (0.02 * (i % 5), 0.1),  # staggered, so equal curves do not stack their markers
        "linewidth": max(3.0 - 0.2 * i, 1.2),
    }


def minor_label(v: float, _pos: int | None = None) -> str:
    """Label the 2x and 5x minor ticks of a log axis (0.2, 0.5, 2, 5, ...), leave the others blank."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v)))
    return f"{v:g}" if lead in (2, 5) else ""


def plot_cdf(
    curves: Mapping[str, Sequence[float]], xlabel: str, title: str, path: Path, dpi: int = 120
) -> Path:
    """Write one PNG at ``path``: the empirical CDF of each named sample (log x; values in seconds),
    in the mapping's order. Curves with no value are left out. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for i, (name, values) in enumerate(curves.items()):
        vals = np.sort(np.asarray(values, dtype=float))
        if len(vals):
            y = np.arange(1, len(vals) + 1) / len(vals)
            ax.plot(vals, y, label=name, drawstyle="steps-post", **curve_style(i))
    ax.set_xscale("log")  # long tails (prefill chunks stall decodes)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor_label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def cdf_title(metric: str, title: str) -> str:
    """``"TTFT CDF"`` over ``title`` on its own line (a one-line title runs past a 7-inch figure)."""
    return f"{metric.upper()} CDF\n{title}"
