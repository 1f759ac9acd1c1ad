"""Score every method's edit of every item into a ScoreTable (table.py).

For each item the source photo, its mask and the source-only values (CLIP of the source, DINO
self-similarity of the source) are computed once, then each method's edit is read from the runs
folder (layout.py) and scored with the chosen metrics (metrics.py for names and NaN rules).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from evaluation.pie.clip import ClipScore
from evaluation.pie.dataset import PieItem
from evaluation.pie.layout import find_edit, read_edit
from evaluation.pie.metrics import METRICS, kept_pixels
from evaluation.pie.pixels import LpipsNetwork, lpips, mse, psnr, ssim
from evaluation.pie.structure import StructureDistance
from evaluation.pie.table import Key, ScoreTable
from ldm.errors import DataError, InveditError
from evaluation.images import read_rgb

T = TypeVar("T")


@dataclass(frozen=True)
class Scorers:
    """The networks the chosen metrics need; None where no chosen metric needs it."""

    clip: ClipScore | None = None
    structure: StructureDistance | None = None
    lpips: LpipsNetwork | None = None
    device: str = "cpu"


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
    image = read_rgb(item.image_path, orient=False)  # as the runner and the reference read it
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
