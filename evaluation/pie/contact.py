"""Contact sheets: for a few photos, the source then each method's edit of it, side by side.

One row per photo (evaluation/outputs.py `grid`: images in a row, captions under them): the source
captioned with its id and target prompt, then one edit per method captioned with the method's
name. Rows are stacked top to bottom. Thumbnails keep the photo's aspect; a missing edit is a
grey tile captioned "(missing)", so the columns stay aligned.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from evaluation.pictures import grid
from evaluation.pie.dataset import PieItem
from evaluation.pie.layout import find_edit, read_edit
from evaluation.images import read_rgb, save_png

MISSING_GREY = 200
ROW_GAP = 12  # white pixels between photos


def thumbnail(image: np.ndarray, width: int) -> np.ndarray:
    """(H, W, 3) uint8 resized to `width` columns, aspect kept (PIL bicubic)."""
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def sheet_row(item: PieItem, runs: str | os.PathLike[str], methods: Sequence[str], width: int) -> np.ndarray:
    """[source | edit per method] of one photo, captioned."""
    source = read_rgb(item.image_path, orient=False)
    tiles, captions = [thumbnail(source, width)], [f"{item.id}: {item.target_prompt}"]
    for method in methods:
        path = find_edit(runs, method, item)
        if path is None:
            tiles.append(np.full_like(tiles[0], MISSING_GREY))
            captions.append(f"{method} (missing)")
        else:
            tiles.append(thumbnail(read_edit(path, source.shape[:2]), width))
            captions.append(method)
    return grid(tiles, captions)


def stack(rows: Sequence[np.ndarray], gap: int = ROW_GAP) -> np.ndarray:
    """Rows of (h_i, w_i, 3) uint8 top to bottom on white, left-aligned."""
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for row in rows:
        canvas[y : y + row.shape[0], : row.shape[1]] = row
        y += row.shape[0] + gap
    return canvas


def contact_sheet(
    path: str | os.PathLike[str], items: Sequence[PieItem], runs: str | os.PathLike[str], methods: Sequence[str],
    width: int = 256,
) -> Path:
    """Write the sheet of `items` (one row each) as PNG, atomically; returns its path."""
    if not items:
        raise ValueError("a contact sheet needs at least one photo")
    save_png(path, stack([sheet_row(item, runs, methods, width) for item in items]))
    return Path(path)
