"""Negative-prompt inversion (Miyake et al., arXiv 2305.16807; docs/methods.md "Negative-prompt inversion").

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

from inversion.ddim import ddim_trajectory, trajectory_cost
from inversion.method import InversionMethod, InversionTask
from ldm.model import StableDiffusion
from samplers.inversion import Inversion
from samplers.settings import Alias, Settings, setting


@dataclass(frozen=True)
class NegativePromptSettings(Settings):
    interp: float = setting(0.0, "slerp the null embedding from E(src) (0) towards E(\"\") (1), the reference's npi_interp",
                            flag="--npi-interp", low=0.0, high=1.0)


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation between low (val 0) and high (val 1), per row of the flattened tensors."""
    a, b = low.flatten(1), high.flatten(1)  # (B, 77*C)
    cos = ((a / a.norm(dim=1, keepdim=True)) * (b / b.norm(dim=1, keepdim=True))).sum(1)
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    so = torch.sin(omega)
    out = (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * a + (torch.sin(val * omega) / so).unsqueeze(1) * b
    return out.reshape(low.shape)


def invert_negative_prompt(
    sd: StableDiffusion, task: InversionTask, settings: NegativePromptSettings = NegativePromptSettings()
) -> Inversion:
    trajectory = ddim_trajectory(sd, task)
    u = task.prompt if settings.interp == 0 else slerp(settings.interp, task.prompt, task.null.to(task.prompt))
    # the same tensor for every step: the reference's list of copies without the copies
    return Inversion("negative-prompt", trajectory, null_embeddings=(u,) * task.steps, settings=settings.as_dict(),
                     cost=trajectory_cost(task))


METHOD = InversionMethod(
    name="negative-prompt",
    summary="negative-prompt inversion: E(src) as the null embedding of every editing step, no optimisation",
    settings=NegativePromptSettings,
    invert=invert_negative_prompt,
    aliases=(Alias("negative-prompt-inversion"), Alias("npi")),
)
