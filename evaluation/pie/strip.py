"""The reference's result picture: one strip of four panels, [prompts | source | reconstruction | edit].

cure-lab/PnPInversion's runners (run_editing_p2p.py, run_editing_masactrl.py, run_editing_pnp.py)
return this strip and save it at the mapping file's .jpg name; its evaluation script crops the
right-most square (the edit), and a commented-out line crops the one left of it (the
reconstruction). The runner's reference mode writes the same strip so that script, and anything
built on its files, reads them unchanged. The first panel is text for people: the reference draws
"source prompt: ...\\ntarget prompt: ..." with matplotlib; we draw the same two lines with PIL's
bitmap font (no metric reads this panel).
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE = 14  # pixel height of a line of PIL's default bitmap font
CHAR = 7  # about the width of one of its characters
MARGIN = 8


def text_panel(text: str, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: `text` wrapped in black on white, top-left aligned."""
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    y = MARGIN
    for paragraph in text.split("\n"):
        for line in textwrap.wrap(paragraph, max(8, (width - 2 * MARGIN) // CHAR)) or [""]:
            draw.text((MARGIN, y), line, fill="black", font=font)
            y += LINE
    return np.asarray(canvas)


def reference_strip(source_prompt: str, target_prompt: str, source: np.ndarray, reconstruction: np.ndarray,
                    edited: np.ndarray) -> np.ndarray:
    """(H, 4W, 3) uint8 from three (H, W, 3) uint8 panels, the prompts' panel first."""
    if not source.shape == reconstruction.shape == edited.shape:
        raise ValueError(f"panel shapes differ: {source.shape}, {reconstruction.shape}, {edited.shape}")
    height, width = source.shape[:2]
    words = text_panel(f"source prompt: {source_prompt}\ntarget prompt: {target_prompt}", height, width)
    return np.concatenate([words, source, reconstruction, edited], axis=1)
