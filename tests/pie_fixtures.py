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


def make_tiny_clip(folder: Path) -> Path:
    """A random-weight CLIP saved as a transformers folder (what --clip points at): 1-layer towers
    32 wide, a 32 px image tower, the real CLIP vocabulary (ldm's bundled BPE)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    from ldm.tokenizer import write_bundled_tokenizer

    write_bundled_tokenizer(folder)
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    images = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def make_tiny_dino(folder: Path) -> Path:
    """A random-weight ViT (DINO's architecture, 2 blocks 32 wide, 16 px patches at 224 px)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=224, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder
