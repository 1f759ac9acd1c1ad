"""Where a benchmark run's edits live, shared by the runner that writes them and the scorer.

Layout (as cure-lab/PnPInversion's runners and evaluation/evaluate.py use it):
RUNS/<method>/annotation_images/<the item's path below annotation_images/>.

Two formats:
- "png" (default): the suffix becomes .png, lossless, so the metrics see the edit itself.
- "jpeg": exactly the name the reference's evaluation script opens (the mapping file's .jpg path),
  written as JPEG at quality 75. The reference saves its results with PIL's `.save(path)` on a .jpg
  path, i.e. PIL's default quality 75, so its published numbers are measured on JPEG-compressed
  edits; this mode reproduces that. What is saved is the caller's: the runner saves the
  reference's strip [prompts | source | reconstruction | edit] (strip.py), whose right-most square
  the reference's evaluator crops.

Reading accepts both formats and the reference's strips (the right-most square is the edit), so
outputs of the original repositories can be scored too.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from evaluation.pie.dataset import IMAGES_DIR, PieItem
from ldm.errors import DataError, UsageError
from ldm.files import atomic_path
from evaluation.images import read_rgb, save_png

JPEG_QUALITY = 75  # PIL's default, which the reference's .save(path) used


class EditFormat(str, Enum):
    PNG = "png"
    JPEG = "jpeg"  # the reference-compatible mode


def check_method(method: str) -> str:
    """A method name becomes a folder name: refuse anything that would leave RUNS."""
    if not method or method in (".", "..") or "/" in method or "\\" in method or method.startswith("."):
        raise UsageError(f"method name {method!r} cannot be a folder name below the runs folder")
    return method


def method_dir(runs: str | os.PathLike[str], method: str) -> Path:
    """RUNS/<method>/annotation_images."""
    return Path(runs) / check_method(method) / IMAGES_DIR


def edit_path(runs: str | os.PathLike[str], method: str, item: PieItem, fmt: EditFormat = EditFormat.PNG) -> Path:
    """Where `method`'s edit of `item` is written in format `fmt`."""
    name = PurePosixPath(item.output_name)
    if EditFormat(fmt) is EditFormat.PNG:
        name = name.with_suffix(".png")
    return method_dir(runs, method).joinpath(*name.parts)


def write_edit(path: str | os.PathLike[str], image: np.ndarray, fmt: EditFormat = EditFormat.PNG) -> None:
    """Write an (H, W, 3) uint8 edit atomically: a killed run leaves the old file or none, never half."""
    if EditFormat(fmt) is EditFormat.PNG:
        save_png(path, image)
        return
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=JPEG_QUALITY)


def find_edit(runs: str | os.PathLike[str], method: str, item: PieItem) -> Path | None:
    """The edit on disk, PNG first, then the reference's name; None if neither exists."""
    for fmt in (EditFormat.PNG, EditFormat.JPEG):
        path = edit_path(runs, method, item, fmt)
        if path.is_file():
            return path
    return None


def read_edit(path: str | os.PathLike[str], size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 edit of a source of size (H, W); from a wider strip of panels of that height
    the right-most H x W block, as the reference's evaluator crops its 4-panel results."""
    image = read_rgb(path, orient=False)  # our own outputs carry no orientation tag
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    if image.shape[0] == height and image.shape[1] > width:
        return image[:, -width:]
    raise DataError(f"{path}: edit is {image.shape[1]}x{image.shape[0]}, the source is {width}x{height}")
