"""Score every method's edit of every item, and the per-image CSV the reference writes.

For each item the source photo, its mask and the source-only values (CLIP of the source, DINO
self-similarity of the source) are computed once, then each method's edit is read from the runs
folder (layout.py) and scored with the chosen metrics (metrics.py for names and NaN rules).

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
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from evaluation.pie.clip import ClipScore
from evaluation.pie.dataset import PieItem
from evaluation.pie.layout import find_edit, read_edit
from evaluation.pie.metrics import METRICS, kept_pixels
from evaluation.pie.pixels import LpipsNetwork, lpips, mse, psnr, ssim
from evaluation.pie.structure import StructureDistance
from ldm.errors import DataError, InveditError
from ldm.files import atomic_path
from ldm.image import read_rgb

Key = tuple[str, str, str]  # (item id, method, metric)
T = TypeVar("T")


@dataclass(frozen=True)
class Scorers:
    """The networks the chosen metrics need; None where no chosen metric needs it."""

    clip: ClipScore | None = None
    structure: StructureDistance | None = None
    lpips: LpipsNetwork | None = None
    device: str = "cpu"


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


@dataclass(frozen=True)
class _Source:
    """What one photo contributes to every method's scores."""

    item: PieItem
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) bool
    clip: float  # CLIP of the source with its prompt (NaN if not asked for)
    similarity: Tensor | None  # DINO key self-similarity of the source, if asked for


def _need(network: T | None, metric: str) -> T:
    if network is None:
        raise ValueError(f"{metric} needs a network the scorer was not given")
    return network


def _edit_metric(scorers: Scorers, source: _Source, edit: np.ndarray, metric: str) -> float:
    """One metric of one edit; NaN by the reference's rules where its part of the image is empty."""
    if metric == "structure_distance":
        return _need(scorers.structure, metric).distance(_need(source.similarity, metric), edit)
    if metric == "clip_similarity_source_image":
        return source.clip
    target = source.item.target_prompt
    if metric == "clip_similarity_target_image":
        return _need(scorers.clip, metric)(edit, target)
    keep = kept_pixels(METRICS[metric], source.mask)
    if keep is None:
        return math.nan
    pixel: dict[str, Callable[[], float]] = {
        "psnr_unedit_part": lambda: psnr(source.image, edit, keep, scorers.device),
        "mse_unedit_part": lambda: mse(source.image, edit, keep, scorers.device),
        "ssim_unedit_part": lambda: ssim(source.image, edit, keep, scorers.device),
        "lpips_unedit_part": lambda: lpips(source.image, edit, _need(scorers.lpips, metric), keep, scorers.device),
        "clip_similarity_target_image_edit_part": lambda: _need(scorers.clip, metric)(edit, target, keep),
    }
    return pixel[metric]()


def _source(item: PieItem, metrics: Sequence[str], scorers: Scorers) -> _Source:
    image = read_rgb(item.image_path)
    mask = item.mask()
    if mask is not None and mask.shape != image.shape[:2]:
        raise DataError(
            f"item {item.id}: {item.image_path} is {image.shape[1]}x{image.shape[0]}, its mask {mask.shape[1]}x{mask.shape[0]}"
        )
    clip = math.nan
    if "clip_similarity_source_image" in metrics:
        clip = _need(scorers.clip, "clip_similarity_source_image")(image, item.source_prompt)
    similarity = None
    if "structure_distance" in metrics:
        similarity = _need(scorers.structure, "structure_distance").key_self_similarity(image)
    return _Source(item, image, mask, clip, similarity)


def score_runs(
    items: Sequence[PieItem],
    runs: str | os.PathLike[str],
    methods: Sequence[str],
    metrics: Sequence[str],
    scorers: Scorers,
    *,
    skip_bad: bool = False,
    progress: bool = True,
) -> tuple[ScoreTable, list[str]]:
    """Score each method's edit of each item. Returns the table and, with skip_bad, one line per
    edit left unscored (missing or unreadable); without it the first such edit is a DataError."""
    values: dict[Key, float | None] = {}
    skipped: list[str] = []
    for item in tqdm(items, desc="scoring", unit="photo", disable=not progress):
        try:
            source = _source(item, metrics, scorers)
        except InveditError as err:
            if not skip_bad:
                raise
            skipped.append(f"item {item.id}: {err}")
            continue
        for method in methods:
            path = find_edit(runs, method, item)
            try:
                if path is None:
                    raise DataError(f"no edit of item {item.id} by {method} in {Path(runs) / method}")
                edit = read_edit(path, source.image.shape[:2])
            except InveditError as err:
                if not skip_bad:
                    raise DataError(f"{err} (--skip-bad scores the rest)") from None
                skipped.append(f"item {item.id}, {method}: {err}")
                continue
            for metric in metrics:
                values[(item.id, method, metric)] = _edit_metric(scorers, source, edit, metric)
    return ScoreTable(tuple(methods), tuple(metrics), tuple(item.id for item in items), values), skipped


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
