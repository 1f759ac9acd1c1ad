"""DDIM inversion (Song et al. 2021, eq. 12 run backwards; ALGORITHMS.md part A §1.3 and §2).

The trajectory L[0..T] is computed with the source prompt only (guidance 1, no unconditional
pass) and each step queries the UNet with the less-noisy latent L[k] at the noisier label t, as
every reference inversion does. Every other inversion method starts from this trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from samplers.ddim import ddim_inverse_step
from samplers.schedule import Schedule
from samplers.trajectory import Inversion


@dataclass(frozen=True)
class InversionConfig:
    """Settings shared by the inversion methods.

    steps: DDIM steps of the grid (50 -> 981..1).
    guidance: the CFG scale the *editing* loop will use; null-text and DirectInversion's offset
        form optimise / record against it, so it must equal the editing scale (7.5).
    progress: show a tqdm bar.
    """

    steps: int = 50
    guidance: float = 7.5
    progress: bool = False

    @property
    def schedule(self) -> Schedule:
        return Schedule(steps=self.steps)


def unet_eps(sd: torch.nn.Module, z: Tensor, t: int, context: Tensor) -> Tensor:
    """eps(z, t, context) in float32 with the UNet's own dtype inside; z is repeated to context's batch."""
    dtype = next(sd.unet.parameters()).dtype
    # a real copy per row, not a stride-0 view: convolutions then round exactly as they do on the
    # editing loop's batch, which keeps DirectInversion's recorded offsets exact there
    x = z.repeat(context.shape[0], 1, 1, 1) if z.shape[0] == 1 else z
    return sd.unet(x.to(dtype), torch.tensor(t, device=z.device), context.to(dtype)).float()


@torch.no_grad()
def ddim_trajectory(
    sd: torch.nn.Module, z0: Tensor, context: Tensor, schedule: Schedule, progress: bool = False
) -> list[Tensor]:
    """[L0 = z0, L1, ..., L_steps = z_T], each (1, 4, h, w) float32; L[k+1] from eps(L[k], t_k)."""
    z = z0.float()
    trajectory = [z]
    for t in tqdm(tuple(reversed(schedule.timesteps)), desc="DDIM inversion", disable=not progress, leave=False):
        z = ddim_inverse_step(z, unet_eps(sd, z, t, context), t, schedule)
        trajectory.append(z)
    return trajectory


def invert_ddim(
    sd: torch.nn.Module,
    z0: Tensor,
    c_src: Tensor,
    cfg: InversionConfig = InversionConfig(),
    *,
    trajectory: list[Tensor] | None = None,
) -> Inversion:
    """Plain DDIM inversion: editing starts from z_T with E("") as the uncond embedding.

    trajectory: a DDIM inversion of z0 under c_src already computed (every method accepts one, so
    several methods on one image share the pass).
    """
    if trajectory is None:
        trajectory = ddim_trajectory(sd, z0, c_src, cfg.schedule, cfg.progress)
    return Inversion(z_T=trajectory[-1], trajectory=trajectory, unet_rows=cfg.steps, method="ddim")
