"""The PIE-Bench report: a markdown page with the scores beside the reference's Table 1, the
preservation-vs-fidelity plot and one contact sheet per editing type.

Written into one folder: report.md, preservation_vs_fidelity.png, contact_<type>_<name>.png.
- "All photos": one row per method at the paper's scales (summary.py), each followed by the
  same method's Table 1 row when the reference published one (reference.py); then Table 1 whole.
- One section per editing type: the means over that type's photos (one row per method) and its
  contact sheet (contact.py) of the first few photos of the type, in the mapping file's order.
Means exclude NaN and show their count of valid photos when it is below the total.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from evaluation.pie.contact import contact_sheet
from evaluation.pie.dataset import EDITING_TYPES, PieItem
from evaluation.pie.metrics import METRICS, TABLE1
from evaluation.pie.plot import tradeoff_png
from evaluation.pie.reference import CITATION, TABLE1 as REFERENCE, TABLE1_ROWS
from evaluation.pie.table import ScoreTable
from evaluation.pie.summary import by_type, markdown_table, summarize, summary_rows
from ldm.files import write_bytes

PLOT_X, PLOT_Y = "psnr_unedit_part", "clip_similarity_target_image_edit_part"
PLOT_FILE = "preservation_vs_fidelity.png"


@dataclass(frozen=True)
class ReportSettings:
    photos_per_sheet: int = 4
    thumbnail: int = 256  # pixels per tile in the contact sheets


def _reference_cells(method: str, metrics: Sequence[str]) -> list[str] | None:
    row = REFERENCE.get(method)
    if row is None:
        return None
    return [f"{row.values[TABLE1.index(m)]:.2f}" if m in TABLE1 else "–" for m in metrics]


def _overall_rows(table: ScoreTable, metrics: Sequence[str]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []
    for method, cells in summary_rows(summarize(table), metrics):
        rows.append((f"**{method}**", cells))
        published = _reference_cells(method, metrics)
        if published is not None:
            rows.append((f"{method} (Table 1)", published))
    return rows


def _sheet_name(editing_type: str) -> str:
    return f"contact_{editing_type}_{EDITING_TYPES[editing_type].replace(' ', '_').replace('(', '').replace(')', '')}.png"


def write_report(
    folder: str | os.PathLike[str],
    table: ScoreTable,
    items: Sequence[PieItem],
    runs: str | os.PathLike[str],
    settings: ReportSettings = ReportSettings(),
    *,
    sources: str = "",
) -> Path:
    """Write report.md, the plot and the contact sheets into `folder`; returns report.md's path."""
    folder = Path(folder)
    metrics = [m for m in TABLE1 if m in table.metrics]
    scored = [item for item in items if item.id in set(table.ids)]
    lines = [
        "# PIE-Bench report",
        "",
        f"{len(table.ids)} photos, {len(table.methods)} methods. {sources}".rstrip(),
        "Means over the photos that gave a number (NaN excluded; `n=valid/total` shown when some did not). "
        f"Bold rows are this run; the row under each is the same method in {CITATION}, over all 700 photos.",
        "",
        "## All photos",
        "",
        markdown_table(_overall_rows(table, metrics), metrics),
        "",
    ]
    if PLOT_X in table.metrics and PLOT_Y in table.metrics:
        overall = summarize(table)
        ours = {m: (overall[m][PLOT_X].mean, overall[m][PLOT_Y].mean) for m in table.methods}
        published = {r.method: (r.values[TABLE1.index(PLOT_X)], r.values[TABLE1.index(PLOT_Y)]) for r in TABLE1_ROWS}
        tradeoff_png(folder / PLOT_FILE, ours, published, f"{METRICS[PLOT_X].label} (background) →", f"{METRICS[PLOT_Y].label} →")
        lines += [f"![background PSNR against CLIP of the edited part]({PLOT_FILE})", ""]
    reference_rows = [(f"{r.inversion} + {r.editing}" + (f" ({r.note})" if r.note else ""),
                       [f"{v:.2f}" for v in r.values]) for r in TABLE1_ROWS]
    lines += [f"### {CITATION}", "", markdown_table(reference_rows, TABLE1, first="inversion + editing"), ""]
    for editing_type, summary in by_type(table, scored).items():
        of_type = [item for item in scored if item.editing_type == editing_type]
        lines += [f"## {editing_type}: {EDITING_TYPES[editing_type]} ({len(of_type)} photos)", "",
                  markdown_table(summary_rows(summary, metrics), metrics), ""]
        sheet = contact_sheet(folder / _sheet_name(editing_type), of_type[: settings.photos_per_sheet], runs,
                              table.methods, settings.thumbnail)
        lines += [f"![source, then each method's edit]({sheet.name})", ""]
    untyped = [item for item in scored if item.editing_type is None]
    if untyped:  # the TI2I set: one sheet for all
        sheet = contact_sheet(folder / "contact_all.png", untyped[: settings.photos_per_sheet], runs, table.methods,
                              settings.thumbnail)
        lines += ["## Photos", "", f"![source, then each method's edit]({sheet.name})", ""]
    report = folder / "report.md"
    write_bytes(report, "\n".join(lines).encode("utf-8"))
    return report

