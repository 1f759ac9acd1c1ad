"""The PIE-Bench metrics: names, regions, reporting scales and NaN rules of cure-lab/PnPInversion.

Names are the reference's (evaluation/evaluate.py `--metrics`), so our per-image CSV has its
columns. Seven are the columns of Table 1 of "PnP Inversion" (Ju et al., arXiv 2310.01506); the
eighth, CLIP of the source image with its prompt, is in the reference's default list but not in
the table. Regions:

- "whole": the full images, no mask.
- "background": both images multiplied by (1 - mask), the metric then taken over the full frame
  (the zeroed pixels stay in the averages). NaN when (1 - mask) is empty.
- "edit": the edited image multiplied by the mask (outside set to black, the forced border kept).
  NaN when the mask is empty (never for PIE-Bench, whose border is always masked).

A set without masks (TI2I) has no background or edited part: those metrics are NaN there.
Reported means are over the non-NaN values times `scale` (Table 1: structure distance x10^3,
LPIPS x10^3, MSE x10^4, SSIM x10^2; PSNR in dB and CLIP scores, already x100, as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Region = Literal["whole", "background", "edit"]


@dataclass(frozen=True)
class Metric:
    name: str  # the reference's name, also the CSV column suffix
    label: str  # Table 1 column heading
    scale: float  # reporting factor
    higher_is_better: bool
    region: Region
    network: Literal["dino", "clip", "lpips", None]  # which model it needs


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("structure_distance", "Structure distance x10^3", 1e3, False, "whole", "dino"),
        Metric("psnr_unedit_part", "PSNR", 1.0, True, "background", None),
        Metric("lpips_unedit_part", "LPIPS x10^3", 1e3, False, "background", "lpips"),
        Metric("mse_unedit_part", "MSE x10^4", 1e4, False, "background", None),
        Metric("ssim_unedit_part", "SSIM x10^2", 1e2, True, "background", None),
        Metric("clip_similarity_source_image", "CLIP source", 1.0, True, "whole", "clip"),
        Metric("clip_similarity_target_image", "CLIP whole", 1.0, True, "whole", "clip"),
        Metric("clip_similarity_target_image_edit_part", "CLIP edited", 1.0, True, "edit", "clip"),
    )
}
DEFAULT_METRICS = tuple(METRICS)  # the reference's default list, in its order
TABLE1 = tuple(name for name in METRICS if name != "clip_similarity_source_image")


def kept_pixels(metric: Metric, mask: np.ndarray | None) -> np.ndarray | None:
    """For a "background" or "edit" metric, the (H, W) bool pixels it keeps; None where the metric
    is NaN by the reference's rules (that part is empty) or because the item has no mask."""
    if metric.region == "whole":
        raise ValueError(f"{metric.name} uses the whole image, not a masked part")
    if mask is None:
        return None
    keep = ~mask if metric.region == "background" else mask
    return keep if keep.any() else None
