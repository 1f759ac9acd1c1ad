"""Negative-prompt inversion (Miyake et al., arXiv 2305.16807; ALGORITHMS.md part A §4).

NTI's optimised null embedding is close to the source-prompt embedding, so use E(src) itself as
the "unconditional" embedding of every editing step: the source branch then reproduces the
guidance-1 DDIM reconstruction, the target branch uses the source prompt as a negative prompt.
`interp` > 0 slerps E(src) towards E("") on the flattened (1, 77*C) vectors, as the reference's
`npi_interp` does (default 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inversion.ddim import InversionConfig, ddim_trajectory
from samplers.trajectory import Inversion


@dataclass(frozen=True)
class NegativePromptConfig(InversionConfig):
    interp: float = 0.0


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation between low (val 0) and high (val 1), per row of the flattened tensors."""
    a, b = low.flatten(1), high.flatten(1)  # (B, 77*C)
    cos = ((a / a.norm(dim=1, keepdim=True)) * (b / b.norm(dim=1, keepdim=True))).sum(1)
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    so = torch.sin(omega)
    out = (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * a + (torch.sin(val * omega) / so).unsqueeze(1) * b
    return out.reshape(low.shape)


def invert_negative_prompt(
    sd: torch.nn.Module,
    z0: Tensor,
    c_src: Tensor,
    cfg: NegativePromptConfig = NegativePromptConfig(),
    *,
    trajectory: list[Tensor] | None = None,
) -> Inversion:
    """trajectory: a DDIM inversion of z0 under c_src already computed (skips that pass)."""
    if trajectory is None:
        trajectory = ddim_trajectory(sd, z0, c_src, cfg.schedule, cfg.progress)
    u = c_src if cfg.interp == 0 else slerp(cfg.interp, c_src, sd.embed([""]).to(c_src))
    # the same tensor for every step: the reference's list of copies without the copies
    return Inversion(trajectory[-1], trajectory, null_embeddings=[u] * cfg.steps, unet_rows=cfg.steps, method="negative-prompt")
