"""DDIM inversion (Song et al. 2021, eq. 12 run backwards; docs/methods/ddim-inversion.md).

The trajectory L[0..T] is computed with the inversion prompt only (guidance 1, no unconditional
pass) and each step queries the UNet with the less-noisy latent L[k] at the noisier label t, as
every reference inversion does (a v-prediction output is read at L[k]'s own level,
samplers.noise.predict_inversion_noise). Most other inversion methods start from this trajectory
(`ddim_trajectory` returns the task's when the caller already computed it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from inversion.method import InversionMethod, InversionTask
from ldm.model import StableDiffusion
from samplers.ddim import ddim_inverse_step
from samplers.inversion import Inversion, InversionCost
from samplers.noise import cfg, predict_inversion_noise
from samplers.settings import Alias, Settings


@dataclass(frozen=True)
class DDIMSettings(Settings):
    """Plain DDIM inversion has no options of its own."""


@torch.no_grad()
def ddim_trajectory(sd: StableDiffusion, task: InversionTask) -> tuple[Tensor, ...]:
    """[L0 = z0, L1, ..., L_steps = z_T], each (1, 4, h, w) float32; L[k+1] from eps(L[k], t_k).

    The task's trajectory when it has one (computed once, shared by every method that needs it)."""
    if task.trajectory is not None:
        return task.trajectory
    return guided_trajectory(sd, task, 1.0)


@torch.no_grad()
def guided_trajectory(sd: StableDiffusion, task: InversionTask, scale: float) -> tuple[Tensor, ...]:
    """The DDIM inversion with eps = CFG(E(""), prompt, scale) at every step, as DirectInversion's
    guidance ablation inverts (the reference's `ddim_with_guidance_scale_loop`); scale 1 is the
    plain inversion, with the conditional prediction alone (one row per step, not two)."""
    schedule = task.schedule
    context = task.prompt if scale == 1.0 else torch.cat([task.null.to(task.prompt), task.prompt])  # (1|2, 77, C)
    z = task.z0.float()
    trajectory = [z]
    for t in tqdm(tuple(reversed(schedule.timesteps)), desc="DDIM inversion", disable=not task.progress, leave=False):
        eps = predict_inversion_noise(sd, z, t, context, schedule)
        if scale != 1.0:
            eps = cfg(eps[:1], eps[1:], scale)
        z = ddim_inverse_step(z, eps, t, schedule)
        trajectory.append(z)
    return tuple(trajectory)


def trajectory_cost(task: InversionTask, scale: float = 1.0) -> InversionCost:
    """The DDIM pass's cost: one row per step (two under guidance), nothing when the plain
    trajectory was given."""
    if scale != 1.0:
        return InversionCost(unet_rows=2 * task.steps)
    return InversionCost(unet_rows=0 if task.trajectory is not None else task.steps)


def invert_ddim(sd: StableDiffusion, task: InversionTask, settings: DDIMSettings = DDIMSettings()) -> Inversion:
    """Plain DDIM inversion: editing starts from z_T with E("") as the uncond embedding."""
    trajectory = ddim_trajectory(sd, task)
    return Inversion("ddim", trajectory, settings=settings.as_dict(), cost=trajectory_cost(task))


METHOD = InversionMethod(
    name="ddim",
    summary="DDIM inversion under the source prompt at guidance 1 (the baseline every method starts from)",
    settings=DDIMSettings,
    invert=invert_ddim,
    aliases=(Alias("ddim-inversion"),),
)
