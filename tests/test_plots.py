"""CDF plots: every policy's curve distinguishable, the file written (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from launch.plots import cdf_title, curve_style, minor_label, plot_cdf
from router.model.policies import POLICIES


def test_every_policy_gets_its_own_colour_line_style_and_marker() -> None:
    styles = [curve_style(i) for i in range(len(POLICIES))]
    looks = {(s["color"], s["linestyle"], s["marker"]) for s in styles}
    assert len(looks) == len(POLICIES)
    assert len({s["marker"] for s in styles}) == len(POLICIES)
    widths = [s["linewidth"] for s in styles]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]  # the first stays visible


def test_plot_cdf_writes_a_png_with_identical_curves(tmp_path: Path) -> None:
    same = [0.01 * (i + 1) for i in range(100)]
    path = plot_cdf(
        {"lmetric": same, "lmetric_plain": same, "empty": []},
        "TTFT (s)",
        cdf_title("ttft", "a title long enough to run past the width of the figure " * 2),
        tmp_path / "sub" / "ttft.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cdf_title("tpot", "x") == "TPOT CDF\nx"
    assert [minor_label(v) for v in (0.2, 0.3, 5.0, 0.0)] == ["0.2", "", "5", ""]
