"""LPIPS on SqueezeNet 1.1 (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018), in plain torch: the network behind the background LPIPS.

The reference scores with torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`,
which asks torchvision for the SqueezeNet layers; this is the same computation without torchvision
(whose PyPI wheel does not import beside a CPU-only torch):

- the backbone is SqueezeNet 1.1's `features` (Iandola et al., arXiv 1602.07360, torchvision's
  `squeezenet1_1`), with torchvision's layer names, so its ImageNet checkpoint
  (squeezenet1_1-b8a52dc0.pth) loads unchanged (its classifier is not used);
- LPIPS as torchmetrics computes it: inputs in [-1, 1] shifted and scaled per channel; the
  activations at the end of seven stages (after features 1, 4, 7, 9, 10, 11 and 12, i.e. 64, 128,
  256, 384, 384, 512, 512 channels); each divided by its norm over channels, sqrt(sum x^2 + 1e-8);
  the squared difference of the two images' normalised activations through a 1x1 linear head per
  stage (no bias; the heads ship inside torchmetrics as lpips_models/squeeze.pth); the mean over
  positions; the sum over stages.

tests/test_pie_lpips.py checks it against torchmetrics' own network built with torchvision.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STAGE_ENDS = (2, 5, 8, 10, 11, 12, 13)  # features[previous end:end] is one stage
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-8
HEADS_FILE = ("functional", "image", "lpips_models", "squeeze.pth")  # inside the torchmetrics package


class Fire(nn.Module):
    """SqueezeNet's module: a 1x1 squeeze, then 1x1 and 3x3 expansions side by side, ReLU after each."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


def squeezenet_features() -> nn.Sequential:
    """SqueezeNet 1.1's feature layers, indexed as torchvision indexes them (0..12)."""

    def pool() -> nn.Module:
        return nn.MaxPool2d(3, 2, ceil_mode=True)

    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )


class SqueezeLpips(nn.Module):
    """net(a, b) on (N, 3, H, W) images in [-1, 1] -> (N, 1, 1, 1) LPIPS distances."""

    shift: Tensor
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.features = squeezenet_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)
        self.requires_grad_(False)

    def stages(self, x: Tensor) -> list[Tensor]:
        out, start = [], 0
        for end in STAGE_ENDS:
            x = self.features[start:end](x)
            out.append(x)
            start = end
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        stages_a = self.stages((a - self.shift) / self.scale)
        stages_b = self.stages((b - self.shift) / self.scale)
        terms = [head((unit(fa) - unit(fb)) ** 2).mean((2, 3), keepdim=True)
                 for head, fa, fb in zip(self.heads, stages_a, stages_b)]
        return torch.stack(terms).sum(0)


def unit(x: Tensor) -> Tensor:
    """x divided by its norm over channels, as torchmetrics' _normalize_tensor."""
    return x / torch.sqrt(NORM_EPS + (x**2).sum(1, keepdim=True))


def heads_path() -> Path | None:
    """The linear heads torchmetrics ships, or None without torchmetrics."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]).joinpath(*HEADS_FILE)


def backbone_state(checkpoint: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The `features.*` tensors of a torchvision SqueezeNet checkpoint, named as in SqueezeLpips."""
    return {k: v for k, v in checkpoint.items() if k.startswith("features.")}


def heads_state(bundled: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchmetrics' `lin<k>.model.1.weight` (a dropout precedes each conv there) as `heads.<k>.weight`."""
    out = {}
    for key, value in bundled.items():
        name, _, rest = key.partition(".")
        if name.startswith("lin") and name[3:].isdigit() and rest == "model.1.weight":
            out[f"heads.{name[3:]}.weight"] = value
    return out
