"""Pictures a run writes: image grids with captions, and cross-attention maps as heat maps.

- `grid(images, captions, columns)`: images on white, each caption wrapped under its image, in
  rows of at most `columns` images (so a long prompt's maps fit a screen).
- `heat_overlay(photo, heat)`: a map in [0, 1] coloured (black-red-yellow-white) and laid over the
  photo, as attention maps are shown in the Prompt-to-Prompt paper (Hertz et al. 2022, fig. 4).
- `attention_sheet(photo, maps, words)`: one heat map per word of a prompt, the word underneath.
"""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

CAPTION_LINE = 14  # pixel height of one caption line with PIL's default bitmap font
PAD = 4
# heat colours from cold to hot: black, dark red, red, orange, yellow, white (anchors at equal steps)
HEAT = np.array([[0, 0, 0], [110, 0, 0], [220, 30, 0], [255, 140, 0], [255, 230, 40], [255, 255, 255]], np.float64)


def grid(images: Sequence[np.ndarray], captions: Sequence[str] | None = None, *, columns: int | None = None,
         pad: int = PAD) -> np.ndarray:
    """Place (H, W, 3) uint8 images on white, left to right then in rows of `columns`; each
    caption is wrapped below its image, captions of a row share one baseline under its tallest
    image. Returns (H', W', 3) uint8."""
    if not images:
        raise ValueError("grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    captions = list(captions or [""] * len(images))
    columns = columns or len(images)
    rows = [list(range(i, min(i + columns, len(images)))) for i in range(0, len(images), columns)]
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(c, max(8, im.shape[1] // 7)) if c else [] for c, im in zip(captions, images)]  # ~7 px a character
    heights = []
    for row in rows:
        text_h = max(len(wrapped[i]) for i in row) * CAPTION_LINE
        heights.append(max(images[i].shape[0] for i in row) + (text_h + pad if text_h else 0))
    width = max(sum(images[i].shape[1] for i in row) + pad * (len(row) - 1) for row in rows)
    canvas = Image.new("RGB", (width, sum(heights) + pad * (len(rows) - 1)), "white")
    draw = ImageDraw.Draw(canvas)
    y0 = 0
    for row, height in zip(rows, heights):
        top = max(images[i].shape[0] for i in row)
        x = 0
        for i in row:
            canvas.paste(Image.fromarray(np.asarray(images[i], dtype=np.uint8)), (x, y0))
            y = y0 + top + pad
            for line in wrapped[i]:
                draw.text((x + 2, y), line, fill="black", font=font)
                y += CAPTION_LINE
            x += images[i].shape[1] + pad
        y0 += height + pad
    return np.asarray(canvas)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 through the HEAT colour ramp."""
    x = np.clip(heat, 0.0, 1.0) * (len(HEAT) - 1)
    lo = np.floor(x).astype(int).clip(0, len(HEAT) - 2)
    frac = (x - lo)[..., None]
    return (HEAT[lo] * (1 - frac) + HEAT[lo + 1] * frac).astype(np.uint8)


def heat_overlay(photo: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Colour `heat` ((H, W) in [0, 1], the photo's size) and blend it over a dimmed photo."""
    coloured = colorize(heat).astype(np.float64)
    base = photo.astype(np.float64) * 0.5
    weight = alpha * np.clip(heat, 0.0, 1.0)[..., None] + (1 - alpha) * 0.3
    return np.clip(base * (1 - weight) + coloured * weight, 0, 255).astype(np.uint8)


def upsample_map(m: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) attention map -> (H, W) in [0, 1], bilinear, min-max normalised."""
    up = F.interpolate(m.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]  # (H, W)
    up = (up - up.min()) / (up.max() - up.min() + 1e-12)
    return up.cpu().numpy()


def attention_sheet(photo: np.ndarray, maps: Tensor, words: Sequence[tuple[str, Sequence[int]]], *,
                    tile: int = 192, columns: int = 6) -> np.ndarray | None:
    """One heat-map tile per word: the mean of the word's token maps over the photo.

    photo: (H, W, 3) uint8; maps: (77, h, w) per-token maps; words: (word, token positions) pairs.
    Tiles are `tile` pixels wide, `columns` to a row. None when no word has a token.
    """
    height = max(1, round(tile * photo.shape[0] / photo.shape[1]))
    small = np.asarray(Image.fromarray(photo).resize((tile, height), Image.BICUBIC))
    tiles, captions = [], []
    for word, positions in words:
        if not positions:
            continue
        m = maps[list(positions)].mean(0)  # (h, w)
        tiles.append(heat_overlay(small, upsample_map(m, (height, tile))))
        captions.append(word)
    if not tiles:
        return None
    return grid(tiles, captions, columns=columns)
