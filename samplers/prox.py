"""Proximal guidance (ProxEdit; Han et al. 2023, arXiv 2306.05414, §3.2) as a `Guidance`.

As PIE-Bench runs it (`proximal_guidance_forward`, l0, quantile 0.75; docs/methods.md "Proximal
guidance"): d = eps_c - eps_u over every guided row at once, tau = the q-quantile of |d| over the
whole batch (one scalar for source and target together), d <- d - clamp(d, -tau, tau) (soft
shrinkage: small entries of the guidance direction are dropped, large ones shrunk by tau); "l1"
shrinks by tau once more. eps = eps_u + w d. With PIE's defaults the reference's
inversion-guidance pull-back never runs (its ref_image is None), so thresholding is all there is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from ldm.context import AttnContext, Role


@dataclass(frozen=True)
class Proximal:
    scale: float = 7.5
    quantile: float = 0.75  # a value <= 0 is a fixed threshold -quantile, as in the reference
    mode: Literal["l0", "l1"] = "l0"

    def combine(self, uncond: Tensor, cond: Tensor, roles: Sequence[Role] = (), ctx: AttnContext | None = None) -> Tensor:
        d = cond - uncond
        tau = d.abs().quantile(self.quantile) if self.quantile > 0 else -self.quantile
        d = d - d.clamp(-tau, tau)
        if self.mode == "l1":
            d = torch.where(d > 0, d - tau, d)
            d = torch.where(d < 0, d + tau, d)
        return uncond + self.scale * d
