"""DirectInversion / PnP Inversion (Ju et al., ICLR 2024; docs/methods.md "DirectInversion").

Invert with plain DDIM, then during editing force the source branch back onto the inversion
trajectory after every step, leaving the target branch alone. Two equivalent forms:

- "fused" (default): the loop overwrites the source latent with the pivot L[-2-i] after each step.
  No extra pass: 50 UNet rows for the inversion.
- "offset": the reference's form. A separate 50-step pass records D[i] = L[-2-i] - z_rec, where
  z_rec is one CFG step (the loop's scale, uncond E("")) from the pivot L[-1-i]; the loop adds
  D[i] to the source latent. The reference runs this pass on the edit's batch of 4, whose target
  half it never uses; we do the same when the task has the target embedding, else run the source
  pair [E(""), E(src)] only (enough for a reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from inversion.ddim import ddim_trajectory, trajectory_cost
from inversion.method import InversionMethod, InversionTask
from ldm.model import StableDiffusion
from samplers.ddim import ddim_step
from samplers.inversion import Correction, Inversion, InversionCost
from samplers.noise import cfg, predict_noise
from samplers.settings import Alias, Settings, setting


@dataclass(frozen=True)
class DirectSettings(Settings):
    form: str = setting("fused", "fused: pin the source to the pivot inside the loop (no extra pass); "
                        "offset: the reference's separate offset pass", flag="--direct-form", choices=("fused", "offset"))


@torch.no_grad()
def source_offsets(sd: StableDiffusion, task: InversionTask, trajectory: tuple[Tensor, ...]) -> list[Tensor]:
    """D[i] = L[-2-i] - ddim_step(L[-1-i], CFG(eps(L[-1-i], t_i, [E(""), E(src)]))), i = 0..steps-1.

    With the target embedding the UNet batch is the edit's own [E(""), E(""), E(src), E(tgt)] (the
    reference's choice): CPU and GPU kernels may round a row differently at another batch position
    or size, and the add-offset form carries any such difference forward, amplified by the guidance.
    """
    schedule = task.schedule
    null, src = task.null.to(task.prompt), task.prompt
    if task.target is None:
        context, rows = torch.cat([null, src]), (0, 1)  # (2, 77, C): uncond row first
    else:
        context, rows = torch.cat([null, null, src, task.target.to(src)]), (0, 2)  # (4, 77, C)
    offsets = []
    z = trajectory[-1]
    for i, t in enumerate(tqdm(schedule.timesteps, desc="DirectInversion offsets", disable=not task.progress, leave=False)):
        eps = predict_noise(sd, z, t, context)
        z_rec = ddim_step(z, cfg(eps[rows[0] : rows[0] + 1], eps[rows[1] : rows[1] + 1], task.guidance), t, schedule)
        d = trajectory[-2 - i] - z_rec
        offsets.append(d)
        z = z_rec + d  # back on the pivot, as the reference does
    return offsets


def invert_direct(sd: StableDiffusion, task: InversionTask, settings: DirectSettings = DirectSettings()) -> Inversion:
    """The offset form needs task.null to be the very tensor the loop gets: the offsets cancel the
    loop's CFG step exactly only if they were recorded with bit-identical inputs, and guidance 7.5
    amplifies any rounding difference (an E("") from a batch-3 text-encoder call differs by 2e-7
    and ends 1e-3 off)."""
    trajectory = ddim_trajectory(sd, task)
    cost = trajectory_cost(task)
    if settings.form == "fused":
        pivots = tuple(trajectory[-2 - i] for i in range(task.steps))
        return Inversion("direct", trajectory, corrections=Correction("pivot", pivots), settings=settings.as_dict(), cost=cost)
    offsets = source_offsets(sd, task, trajectory)
    rows = task.steps * (2 if task.target is None else 4)
    return Inversion("direct", trajectory, corrections=Correction("offset", tuple(offsets)), settings=settings.as_dict(),
                     cost=cost + InversionCost(unet_rows=rows))


def restore_direct(task: InversionTask, settings: DirectSettings, state: Mapping[str, Tensor]) -> Inversion:
    """From a file: the fused form needs the trajectory only; the offset form reads `offsets`."""
    assert task.trajectory is not None
    if settings.form == "fused":
        pivots = tuple(task.trajectory[-2 - i] for i in range(task.steps))
        return Inversion("direct", task.trajectory, corrections=Correction("pivot", pivots), settings=settings.as_dict())
    offsets = tuple(d for d in state["offsets"])  # (steps, 1, 4, h, w) -> one (1, 4, h, w) per step
    return Inversion("direct", task.trajectory, corrections=Correction("offset", offsets), settings=settings.as_dict())


METHOD = InversionMethod(
    name="direct",
    summary="DirectInversion (PnP Inversion): DDIM inversion, the source branch pinned to the trajectory while editing",
    settings=DirectSettings,
    invert=invert_direct,
    aliases=(Alias("directinversion"), Alias("direct-inversion"), Alias("pnp-inversion")),
    state_keys=("offsets",),
    restore=restore_direct,
)
