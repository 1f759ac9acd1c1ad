"""Per-method means of the per-image scores, at the paper's scales, NaNs excluded and counted.

The reference writes only per-image values; Table 1 of "PnP Inversion" (arXiv 2310.01506) is the
mean of each column. NaN cells (an empty background, metrics.py) are left out of the mean, as users
of the reference and later papers do, and each mean carries its count of valid items, so a reader
sees when a mean is over fewer photos. inf (a PSNR of an untouched background) is kept: it is a
valid value, and a mean of inf says so. Means are over all items, and per editing type.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from evaluation.pie.dataset import EDITING_TYPES, PieItem
from evaluation.pie.metrics import METRICS
from evaluation.pie.table import ScoreTable, valid_values
from ldm.files import atomic_path


@dataclass(frozen=True)
class Cell:
    mean: float  # mean of the valid values times the metric's scale; NaN when none is valid
    valid: int  # items that gave a number
    total: int  # items averaged over


Summary = dict[str, dict[str, Cell]]  # method -> metric -> Cell


def summarize(table: ScoreTable, ids: Sequence[str] | None = None) -> Summary:
    """Means of every column over `ids` (default: every item of the table)."""
    ids = table.ids if ids is None else ids
    summary: Summary = {}
    for method in table.methods:
        summary[method] = {}
        for metric in table.metrics:
            values = valid_values(table, method, metric, ids)
            mean = math.fsum(values) / len(values) if values else math.nan
            scale = METRICS[metric].scale if metric in METRICS else 1.0
            summary[method][metric] = Cell(mean * scale, len(values), len(ids))
    return summary


def by_type(table: ScoreTable, items: Sequence[PieItem]) -> dict[str, Summary]:
    """editing type id -> Summary over that type's items in the table (types that have some)."""
    in_table = set(table.ids)
    groups: dict[str, list[str]] = {}
    for item in items:
        if item.editing_type is not None and item.id in in_table:
            groups.setdefault(item.editing_type, []).append(item.id)
    return {t: summarize(table, groups[t]) for t in EDITING_TYPES if t in groups}


def format_cell(cell: Cell) -> str:
    """"27.22", with the count when some items gave no number: "27.22 (n=698/700)"."""
    text = "n/a" if math.isnan(cell.mean) else f"{cell.mean:.2f}"
    return text if cell.valid == cell.total else f"{text} (n={cell.valid}/{cell.total})"


def heading(metric: str) -> str:
    spec = METRICS.get(metric)
    return f"{spec.label} {'↑' if spec.higher_is_better else '↓'}" if spec else metric


def summary_rows(summary: Summary, metrics: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(method, formatted cells) per method, for `markdown_table`."""
    return [(method, [format_cell(cells[m]) for m in metrics]) for method, cells in summary.items()]


def markdown_table(rows: Sequence[tuple[str, Sequence[str]]], metrics: Sequence[str], first: str = "method") -> str:
    """A markdown table: a heading per metric, then one line per (name, cells) row."""
    lines = [f"| {first} | " + " | ".join(heading(m) for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines)


def _column(metric: str) -> str:
    scale = METRICS[metric].scale if metric in METRICS else 1.0
    return metric if scale == 1 else f"{metric}_x{scale:g}"


def write_summary_csv(path: str | os.PathLike[str], table: ScoreTable, items: Sequence[PieItem]) -> None:
    """scope ("all" or an editing type id), method, then per metric its scaled mean and valid count."""
    header = ["scope", "method"] + [c for m in table.metrics for c in (_column(m), f"{m}_n")]
    scopes = {"all": summarize(table), **by_type(table, items)}
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for scope, summary in scopes.items():
                for method, cells in summary.items():
                    row = [scope, method]
                    for metric in table.metrics:
                        row += [repr(cells[metric].mean), cells[metric].valid]
                    writer.writerow(row)
