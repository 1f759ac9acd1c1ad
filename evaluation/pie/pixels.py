"""Background PSNR, MSE, SSIM and LPIPS of an edit against its source, as cure-lab/PnPInversion
computes them (evaluation/matrics_calculator.py), with torchmetrics as the reference does.

Both uint8 images are scaled to [0, 1] float32 and multiplied by the same 0/1 mask of kept pixels;
the metric is then taken over the whole frame, zeroed pixels included:
- PSNR: 10 log10(1 / MSE) with data range 1 (torchmetrics `peak_signal_noise_ratio`); inf for
  identical images.
- MSE: mean over all 3 x H x W values (torchmetrics `mean_squared_error`).
- SSIM: torchmetrics `structural_similarity_index_measure`, data range 1, its defaults (Gaussian
  window 11, sigma 1.5, k1 0.01, k2 0.03, mean over the map).
- LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
  CVPR 2018) with the SqueezeNet backbone, on the masked images mapped to [-1, 1] (x * 2 - 1, so
  masked-out pixels become -1). The network is passed in (networks.py builds torchmetrics' one).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

# (img1, img2) in [-1, 1], (1, 3, H, W) each -> distance, any shape holding one value
LpipsNetwork = Callable[[Tensor, Tensor], Tensor]


def unit_masked(image: np.ndarray, keep: np.ndarray | None, device: str | torch.device = "cpu") -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1], times the (H, W) 0/1 mask `keep` if given."""
    x = torch.tensor(image).to(device=device, dtype=torch.float32) / 255
    if keep is not None:
        x = x * torch.from_numpy(keep).to(device=device, dtype=torch.float32)[..., None]  # (H, W, 1) broadcast
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()  # (H, W, 3) -> (1, 3, H, W); MSE needs a flat view


def _pair(source: np.ndarray, edit: np.ndarray, keep: np.ndarray | None, device: str | torch.device) -> tuple[Tensor, Tensor]:
    if source.shape != edit.shape:
        raise ValueError(f"image shapes differ: {source.shape} vs {edit.shape}")
    return unit_masked(source, keep, device), unit_masked(edit, keep, device)


@torch.no_grad()
def psnr(source: np.ndarray, edit: np.ndarray, keep: np.ndarray | None = None, device: str | torch.device = "cpu") -> float:
    a, b = _pair(source, edit, keep, device)
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


@torch.no_grad()
def mse(source: np.ndarray, edit: np.ndarray, keep: np.ndarray | None = None, device: str | torch.device = "cpu") -> float:
    a, b = _pair(source, edit, keep, device)
    return float(mean_squared_error(a, b))


@torch.no_grad()
def ssim(source: np.ndarray, edit: np.ndarray, keep: np.ndarray | None = None, device: str | torch.device = "cpu") -> float:
    a, b = _pair(source, edit, keep, device)
    return float(structural_similarity_index_measure(a, b, data_range=1.0))


@torch.no_grad()
def lpips(
    source: np.ndarray, edit: np.ndarray, network: LpipsNetwork, keep: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> float:
    a, b = _pair(source, edit, keep, device)
    return float(network(a * 2 - 1, b * 2 - 1).reshape(()))
