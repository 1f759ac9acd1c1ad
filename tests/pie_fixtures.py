"""A synthetic PIE-Bench root for the tests: real folder layout, real mapping-file format.

Four 512x512 JPEG photos in the reference's folders, each with a mask written as (start, length)
runs over the row-major flattening, which the tests decode and compare with the rectangles here.
Photo 911000000000 (a style edit) is masked everywhere inside, so its background is empty and the
preservation metrics must be NaN for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 512

# id -> (relative path, type, source prompt, target prompt, blended_word, mask rectangle (top, left, bottom, right))
ENTRIES = {
    "000000000000": ("0_random_140/000000000000.jpg", "0", "a slanted mountain bicycle on the road",
                     "a slanted [rusty] mountain bicycle on the road", "bicycle bicycle", (100, 150, 300, 400)),
    "111000000000": ("1_change_object_80/1_artificial/1_animal/111000000000.jpg", "1", "a [cat] sitting  on a mat",
                     "a [dog] sitting  on a mat", "cat dog", (200, 40, 260, 120)),
    "211000000001": ("2_add_object_80/1_artificial/1_animal/211000000001.jpg", "2", "a bowl on a table",
                     "a bowl [of apples] on a table", "", (10, 10, 60, 500)),
    "911000000000": ("9_change_style_80/1_artificial/1_animal/911000000000.jpg", "9", "a photo of a fox",
                     "a [watercolor painting] of a fox", "photo painting", (1, 1, SIZE - 1, SIZE - 1)),
}


def rectangle_runs(top: int, left: int, bottom: int, right: int, width: int = SIZE) -> list[int]:
    """One (start, length) run per row of the rectangle rows top..bottom-1, columns left..right-1."""
    runs: list[int] = []
    for row in range(top, bottom):
        runs += [row * width + left, right - left]
    return runs


def photo(seed: int) -> np.ndarray:
    """A smooth 512x512 RGB picture with some texture (JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    channels = [np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 3.0, size=(3, 3))]
    image = (np.stack(channels, -1) * 0.4 + 0.5 + rng.normal(0, 0.03, (SIZE, SIZE, 3))) * 255
    return np.clip(image, 0, 255).astype(np.uint8)


def make_root(root: Path, entries: dict[str, tuple] = ENTRIES) -> Path:
    """Write annotation_images/ and mapping_file.json under `root` and return it."""
    mapping = {}
    for n, (key, (rel, kind, src, tgt, blend, rect)) in enumerate(entries.items()):
        path = root / "annotation_images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(n)).save(path, quality=95)
        mapping[key] = {
            "image_path": rel, "original_prompt": src, "editing_prompt": tgt,
            "editing_instruction": f"instruction {key}", "editing_type_id": kind, "blended_word": blend,
            "mask": rectangle_runs(*rect),
        }
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


def expected_mask(key: str) -> np.ndarray:
    """The rectangle of ENTRIES[key] plus the one-pixel border, built by slicing."""
    top, left, bottom, right = ENTRIES[key][5]
    mask = np.zeros((SIZE, SIZE), bool)
    mask[top:bottom, left:right] = True
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask
