"""The photo as CLIP image tokens, StyleDiffusion's input (Li et al. 2023).

The reference (cure-lab/PnPInversion `models/stylediffusion/`, after sen-mao/StyleDiffusion) encodes
the photo with OpenAI's CLIP ViT-B/16 and keeps *every* token of the last layer after the final
LayerNorm, the class token and the 14 x 14 patches (197 x 768), without the projection into the
joint embedding space. With transformers' `CLIPVisionModel` that is
`post_layernorm(last_hidden_state)`. The preprocessing is the reference's tensor pipeline: pixels
in [-1, 1] -> [0, 1], the short side resized to the model's input size (bicubic without
antialiasing, as torchvision 0.13 resized tensors), a center crop, CLIP's mean and std.

The encoder is a real, frozen component loaded offline (`--clip-vision`, ldm/pretrained.py); the
tokens are computed once per photo, without autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.pretrained import load_pretrained

DEFAULT_CLIP_VISION = "openai/clip-vit-base-patch16"  # OpenAI's ViT-B/16, the reference's encoder
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(image: Tensor, size: int) -> Tensor:
    """(1, 3, H, W) in [-1, 1] -> (1, 3, size, size), CLIP-normalised: short side to `size`
    (torchvision's rule: the long side truncated to int(size * long / short)), center crop."""
    x = (image.float() + 1) / 2
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    out_hw = (size, new_long) if h <= w else (new_long, size)
    x = F.interpolate(x, size=out_hw, mode="bicubic", align_corners=False, antialias=False)
    top, left = int(round((out_hw[0] - size) / 2.0)), int(round((out_hw[1] - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageTokens:
    """`tokens(image)`: (1, 3, H, W) pixels in [-1, 1] -> (1, T, D) float32 CLIP tokens, T = the
    class token plus the patches (197 for ViT-B/16), D = the vision tower's width (768)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model  # transformers CLIPVisionModel, frozen
        config = model.config
        self.size = int(config.image_size)
        self.count = (self.size // int(config.patch_size)) ** 2 + 1
        self.width = int(config.hidden_size)

    @torch.no_grad()
    def __call__(self, image: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        pixels = clip_pixels(image, self.size).to(device)
        vision = getattr(self.model, "vision_model", self.model)  # transformers 4 nests the tower, 5 does not
        hidden = vision(pixel_values=pixels).last_hidden_state  # (1, T, D), before the final LayerNorm
        return vision.post_layernorm(hidden).float()


def load_image_tokens(source: str | None, device: torch.device | str = "cpu") -> ImageTokens:
    """The CLIP vision tower from a folder or the hub cache (default: OpenAI's ViT-B/16)."""
    from transformers import CLIPVisionModel

    model = load_pretrained(
        lambda name: CLIPVisionModel.from_pretrained(name, local_files_only=True), source or DEFAULT_CLIP_VISION,
        what="CLIP vision model", option="--clip-vision", default=DEFAULT_CLIP_VISION,
        files="config.json and the weights",
    )
    return ImageTokens(model.to(device))
