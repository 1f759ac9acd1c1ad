"""Proximal guidance (ProxEdit; Han et al. 2023, arXiv 2306.05414, §3.2) as a `Guidance`.

As PIE-Bench runs it (`proximal_guidance_forward`, l0, quantile 0.75; docs/methods/proximal-guidance.md): d = eps_c - eps_u over every guided row at once, tau = the q-quantile of |d| over the
whole batch (one scalar for source and target together), d <- d - clamp(d, -tau, tau) (soft
shrinkage: small entries of the guidance direction are dropped, large ones shrunk by tau); "l1"
shrinks by tau once more. eps = eps_u + w d. With PIE's defaults the reference's
inversion-guidance pull-back never runs (its ref_image is None), so thresholding is all there is.

Inversion guidance (`recon_t` > 0; ProxEdit §3.2, as SPDInv's editing runs it: leeruibin/SPDInv
`P2P/ptp_utils.py` `diffusion_step`): at timesteps t < recon_t, after the step, every guided row is
pulled toward the inversion trajectory where the guidance direction is small,
z <- z - recon_lr (z - L) (1 - dilate(|d| > tau)), with d the shrunk direction above, the dilation
a 3x3 max over each channel and L the trajectory latent the step should reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.context import AttnContext, Role


@dataclass(frozen=True)
class Proximal:
    scale: float = 7.5
    quantile: float = 0.75  # a value <= 0 is a fixed threshold -quantile, as in the reference
    mode: Literal["l0", "l1"] = "l0"
    recon_t: int = 0  # inversion guidance below this timestep; 0: none
    recon_lr: float = 1.0

    def shrunk(self, uncond: Tensor, cond: Tensor) -> tuple[Tensor, Tensor | float]:
        """The thresholded direction d and the threshold tau."""
        d = cond - uncond
        tau = d.abs().quantile(self.quantile) if self.quantile > 0 else -self.quantile
        d = d - d.clamp(-tau, tau)
        if self.mode == "l1":
            d = torch.where(d > 0, d - tau, d)
            d = torch.where(d < 0, d + tau, d)
        return d, tau

    def combine(self, uncond: Tensor, cond: Tensor, roles: Sequence[Role] = (), ctx: AttnContext | None = None) -> Tensor:
        d, _ = self.shrunk(uncond, cond)
        return uncond + self.scale * d

    def pull_back(self, uncond: Tensor, cond: Tensor, ctx: AttnContext, latents: Tensor, pivot: Tensor) -> Tensor:
        if not (self.recon_t > 0 and ctx.timestep < self.recon_t):
            return latents
        d, tau = self.shrunk(uncond, cond)
        edit = F.max_pool2d((d.abs() > tau).float(), 3, 1, 1)  # (R, C, h, w): dilated by one pixel, per channel
        return latents - self.recon_lr * (latents - pivot.to(latents)) * (1 - edit)
