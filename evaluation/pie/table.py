"""A scoring run's values, and the per-image CSV the reference writes.

CSV (cure-lab/PnPInversion evaluation/evaluate.py): a header `file_id, <method>|<metric>, ...`,
then one row per item in the mapping file's order. NaN is written "nan" as the reference does; a
cell left empty means "not scored" (no edit for that method, left out with --skip-bad).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ldm.errors import DataError
from ldm.files import atomic_path

Key = tuple[str, str, str]  # (item id, method, metric)


@dataclass(frozen=True)
class ScoreTable:
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    ids: tuple[str, ...]
    values: Mapping[Key, float | None] = field(default_factory=dict)  # None: not scored

    def value(self, item_id: str, method: str, metric: str) -> float | None:
        return self.values.get((item_id, method, metric))

    def columns(self) -> list[tuple[str, str]]:
        """(method, metric) in the reference's column order: methods outer, metrics inner."""
        return [(method, metric) for method in self.methods for metric in self.metrics]


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else repr(float(value))


def write_scores_csv(path: str | os.PathLike[str], table: ScoreTable) -> None:
    """The reference's per-image CSV, written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_id"] + [f"{method}|{metric}" for method, metric in table.columns()])
            for item_id in table.ids:
                writer.writerow([item_id] + [_cell(table.value(item_id, m, k)) for m, k in table.columns()])


def read_scores_csv(path: str | os.PathLike[str]) -> ScoreTable:
    """A per-image CSV (ours or the reference's) back into a table."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no scores file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "file_id":
        raise DataError(f"{path}: not a scores CSV (expected a header starting with file_id)")
    columns: list[tuple[str, str]] = []
    for name in rows[0][1:]:
        method, bar, metric = name.rpartition("|")
        if not bar or not method:
            raise DataError(f"{path}: column {name!r} is not <method>|<metric>")
        columns.append((method, metric))
    values: dict[Key, float | None] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns) + 1:
            raise DataError(f"{path}: line {n} has {len(row)} cells, the header {len(columns) + 1}")
        for (method, metric), text in zip(columns, row[1:]):
            try:
                values[(row[0], method, metric)] = float(text) if text else None
            except ValueError:
                raise DataError(f"{path}: line {n}: {text!r} is not a number") from None
    return ScoreTable(
        tuple(dict.fromkeys(m for m, _ in columns)), tuple(dict.fromkeys(k for _, k in columns)),
        tuple(row[0] for row in rows[1:]), values,
    )


def valid_values(table: ScoreTable, method: str, metric: str, ids: Iterable[str]) -> list[float]:
    """The scored, non-NaN values of one column over `ids` (NaN and unscored cells excluded)."""
    found = (table.value(i, method, metric) for i in ids)
    return [v for v in found if v is not None and not math.isnan(v)]
