"""Structure distance: how far the edit moved the image's layout, by DINO self-similarity.

The metric of Tumanyan et al., "Splicing ViT Features for Semantic Appearance Transfer"
(CVPR 2022), as cure-lab/PnPInversion computes it (evaluation/matrics_calculator.py, `LossG`
with `VitExtractor`): take the keys of the last transformer block of DINO ViT-B/8 (Caron et al.,
"Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021) for every token, CLS
included, heads concatenated (T x 768 for T = 1 + 28 x 28 at 224 px); their cosine
self-similarity matrix (T x T, the norm product clamped at 1e-8); the distance is the mean squared
difference of the source's and the edit's matrices. Table 1 reports it x10^3.

The reference's quirk, kept so the numbers match: the image goes in as float 0..255, *not* divided
by 255, and is then normalised with ImageNet's mean/std for [0, 1] inputs, so the network sees
values about 250 times larger than in training. Before that it is resized like torchvision's
`Resize(224, max_size=480)`: short side to 224 (512x512 -> 224x224), bilinear. torchvision's
tensor resize switched antialiasing on by default in 0.17; the reference pins no version, and the
releases of its time did not antialias tensors, so `antialias=False` is the default here and the
setting is recorded with the scores.

The DINO model is transformers' ViTModel (e.g. facebook/dino-vitb8, the same weights as the
torch.hub `dino_vitb8` the reference loads). The keys are computed from the last block's input
(the second-to-last hidden state): key projection of its first layer norm, exactly what the
reference's hook on the fused qkv projection captures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StructureSettings:
    short_side: int = 224  # torchvision Resize(224, ...): the shorter side becomes this
    max_size: int = 480  # ... unless the longer side would pass this
    antialias: bool = False  # torchvision < 0.17 on tensors; True = torchvision >= 0.17's default
    eps: float = 1e-8  # clamp of the norm product in the cosine similarity


def resized_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """(height, width) after torchvision's Resize(short_side, max_size=max_size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _last_block(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(first layer norm, key projection) of the last ViT block, in transformers 5 or 4 naming."""
    layers = model.layers if hasattr(model, "layers") else model.encoder.layer
    block = layers[-1]
    attention = block.attention
    key = attention.k_proj if hasattr(attention, "k_proj") else attention.attention.key
    return block.layernorm_before, key


class StructureDistance:
    """`distance(source, edit)` for (H, W, 3) uint8 images of the same size."""

    def __init__(self, model: nn.Module, settings: StructureSettings = StructureSettings(), device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.settings = settings
        self.device = torch.device(device)
        self.norm, self.key = _last_block(self.model)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def pixel_values(self, image: np.ndarray) -> Tensor:
        """(H, W, 3) uint8 -> (1, 3, h, w) float32: resized, then "normalised" on the 0..255 scale."""
        x = torch.tensor(image).to(self.device, torch.float32)
        x = x.permute(2, 0, 1).unsqueeze(0)  # (H, W, 3) -> (1, 3, H, W), values 0..255 (the quirk)
        s = self.settings
        size = resized_size(x.shape[2], x.shape[3], s.short_side, s.max_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s.antialias)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def key_self_similarity(self, image: np.ndarray) -> Tensor:
        """(T, T) cosine similarity of the last block's keys, T = 1 + number of patches."""
        x = self.pixel_values(image)
        configured = getattr(self.model.config, "image_size", None)
        resize_positions = configured is not None and tuple(x.shape[2:]) != (configured, configured)
        hidden = self.model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=resize_positions).hidden_states
        keys = self.key(self.norm(hidden[-2]))[0]  # (T, heads x head dim): heads side by side, as the reference concatenates them
        norms = keys.norm(dim=1, keepdim=True)  # (T, 1)
        return (keys @ keys.T) / torch.clamp(norms @ norms.T, min=self.settings.eps)

    def distance(self, source_similarity: Tensor, edit: np.ndarray) -> float:
        """Mean squared difference of the edit's self-similarity and the source's (computed once
        per photo by `key_self_similarity`, then compared with every method's edit)."""
        edit_similarity = self.key_self_similarity(edit)
        if edit_similarity.shape != source_similarity.shape:
            raise ValueError(f"token counts differ: {tuple(source_similarity.shape)} vs {tuple(edit_similarity.shape)}")
        return float(F.mse_loss(edit_similarity, source_similarity))

    def __call__(self, source: np.ndarray, edit: np.ndarray) -> float:
        if source.shape != edit.shape:
            raise ValueError(f"image shapes differ: {source.shape} vs {edit.shape}")
        return self.distance(self.key_self_similarity(source), edit)
