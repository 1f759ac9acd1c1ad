"""The report's trade-off picture: background preservation against edit fidelity, one point per
method (PSNR of the unedited region, right = better kept; CLIP score of the edited part, up =
closer to the target prompt), the reference's Table 1 methods as hollow grey points beside ours,
a dotted line from a published point to ours where both name the same method.

matplotlib's object API (Figure + Agg canvas): no pyplot, so no global figure state.
"""

from __future__ import annotations

import io
import math
import os
from typing import Mapping

from ldm.files import write_bytes

Point = tuple[float, float]  # (x, y)


def tradeoff_png(
    path: str | os.PathLike[str],
    ours: Mapping[str, Point],
    reference: Mapping[str, Point],
    x_label: str,
    y_label: str,
) -> None:
    """Scatter `ours` (filled, labelled) and `reference` (hollow grey, labelled) and write a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (x, y) in reference.items():
        axes.scatter([x], [y], s=40, facecolors="none", edgecolors="0.55", linewidths=1.2)
        axes.annotate(name, (x, y), xytext=(4, -9), textcoords="offset points", fontsize=7, color="0.45")
    for n, (name, (x, y)) in enumerate(ours.items()):
        if math.isfinite(x) and math.isfinite(y):
            if name in reference:
                rx, ry = reference[name]
                axes.plot([rx, x], [ry, y], linestyle=":", color=f"C{n % 10}", linewidth=1)
            axes.scatter([x], [y], s=60, color=f"C{n % 10}", zorder=3)
            axes.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8, color=f"C{n % 10}")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title("Preservation vs edit fidelity (filled: this run; hollow: Table 1)", fontsize=10)
    axes.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    write_bytes(path, buffer.getvalue())
