"""SPDInv: Source Prompt Disentangled Inversion (Li et al., ECCV 2024, arXiv 2403.11105, §3.2, the
fixed-point constraint of eq. 8 solved per step; docs/methods/spdinv.md).

DDIM inversion reads the UNet at the less noisy latent (eps(z_{k}, t) ~ eps(z_{k+1}, t)), which ties
the inverted noise to the source prompt. SPDInv instead makes every inversion step a fixed point:
at inversion step k (label t, from z_prev = z_k), find z with

    z = F(z),   F(z) = ddim_inverse_step(z_prev, eps(z, t, E(src)), t)

by gradient descent on z: start at the plain DDIM step z_ini = F-with-eps(z_prev); a fresh AdamW
(lr 1e-3, torch's defaults otherwise: weight decay 0.01) minimises mse(z, F(z)) with the gradient
through the UNet into z, up to 25 rounds, stopping after the round whose loss (computed before its
update) is below 5e-6. The editing loop then uses E(src) as the null embedding of every step, as
negative-prompt inversion does (the reference's `npi_interp` slerps it towards E("")).

As leeruibin/SPDInv `P2P/SPDInv.py` (`SPD_loop`). Its PnP script's copy (`P2P/SPDInv_for_PNP.py`)
evaluates the UNet at z_ini instead of z inside the rounds, so the target F(z_ini) is a constant and
the rounds never solve z = F(z); `unet_at_start` reproduces that, off by default.

Only the latent receives gradients: the UNet's parameters are frozen for the duration
(samplers.noise.frozen_weights), and every backward pass runs at batch 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from inversion.method import InversionMethod, InversionTask
from inversion.negative_prompt import slerp
from ldm.context import AttnContext, BatchLayout, Row
from ldm.model import StableDiffusion
from samplers.ddim import ddim_inverse_step
from samplers.inversion import Inversion, InversionCost
from samplers.noise import frozen_weights, predict_inversion_noise, predict_noise
from samplers.schedule import Schedule
from samplers.settings import Alias, Settings, setting

COND = BatchLayout((Row("source", "cond"),))


@dataclass(frozen=True)
class SPDInvSettings(Settings):
    """leeruibin/SPDInv's defaults (`run_SPDInv_P2P.py`, `SourcePromptDisentanglementInversion`)."""

    rounds: int = setting(25, "AdamW rounds per inversion step (at most), the reference's K_round", flag="--spd-rounds",
                          low=0)
    lr: float = setting(1e-3, "AdamW learning rate of the latent", flag="--spd-lr", low=0.0)
    threshold: float = setting(5e-6, "stop a step's rounds once the fixed-point loss is below this (0: never stop "
                               "early, the reference's enable_threshold=False)", flag="--spd-threshold", low=0.0)
    interp: float = setting(0.0, "slerp the editing loop's null embedding from E(src) (0) towards E(\"\") (1), the "
                            "reference's npi_interp", flag="--spd-npi-interp", low=0.0, high=1.0)
    unet_at_start: bool = setting(False, "evaluate the UNet at the step's plain DDIM latent inside the rounds, as the "
                                  "SPDInv project's PnP script does (a constant target, so the rounds never solve the "
                                  "fixed point; kept to reproduce that script); off = the method as published",
                                  flag="--spd-unet-at-start")
    checkpoint: bool = setting(False, "gradient checkpointing of the UNet in the backward passes (less activation "
                               "memory, one more forward pass per round)", flag="--spd-checkpoint")


def fixed_point_step(
    sd: StableDiffusion, z_prev: Tensor, k: int, t: int, prompt: Tensor, schedule: Schedule, settings: SPDInvSettings,
    bar: tqdm | None = None,
) -> tuple[Tensor, tuple[float, ...]]:
    """Inversion step k (label t) from z_prev (1, 4, h, w): the optimised z_{k+1} and the loss of each round.

    The caller freezes the UNet (samplers.noise.frozen_weights)."""
    with torch.no_grad():
        z_ini = ddim_inverse_step(z_prev, predict_inversion_noise(sd, z_prev, t, prompt, schedule), t, schedule)
    x = z_ini.clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=settings.lr)  # fresh moments every step
    ctx = AttnContext(k, t, schedule.steps, COND, checkpoint=settings.checkpoint)
    losses: list[float] = []
    for _ in range(settings.rounds):
        # x lives at t's noise level (it is the step's output), so the UNet reads it with its own label
        at = z_ini if settings.unet_at_start else x
        pred = ddim_inverse_step(z_prev, predict_noise(sd, at, t, prompt, ctx), t, schedule)
        loss = F.mse_loss(x, pred)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(step=k, loss=f"{losses[-1]:.3g}")
            bar.update()
        # tested after the update, with the loss from before it: the updated latent is kept
        if losses[-1] < settings.threshold:
            break
    return x.detach(), tuple(losses)


def invert_spdinv(sd: StableDiffusion, task: InversionTask, settings: SPDInvSettings = SPDInvSettings()) -> Inversion:
    schedule = task.schedule
    prompt = task.prompt.float()
    z = task.z0.float()
    trajectory = [z]
    losses: list[tuple[float, ...]] = []
    started = time.perf_counter()
    # the total is the most rounds possible; the bar jumps over the rounds an early stop saves
    bar = tqdm(total=task.steps * settings.rounds, desc="SPDInv", unit="round", disable=not task.progress, leave=False)
    with frozen_weights(sd):
        for k, t in enumerate(reversed(schedule.timesteps)):
            z, step_losses = fixed_point_step(sd, z, k, t, prompt, schedule, settings, bar)
            bar.update(settings.rounds - len(step_losses))
            trajectory.append(z)
            losses.append(step_losses)
    bar.close()
    rounds = tuple(len(l) for l in losses)
    # per step: the plain DDIM step, then one forward+backward per round (batch 1)
    cost = InversionCost(unet_rows=task.steps + sum(rounds), unet_rows_backward=sum(rounds), rounds_per_step=rounds,
                         seconds=time.perf_counter() - started)
    u = prompt if settings.interp == 0 else slerp(settings.interp, prompt, task.null.float())
    return Inversion("spdinv", tuple(trajectory), null_embeddings=(u,) * task.steps, settings=settings.as_dict(),
                     cost=cost, losses=tuple(losses))


def restore_spdinv(task: InversionTask, settings: SPDInvSettings, state: Mapping[str, Tensor]) -> Inversion:
    """From a file: SPDInv's own trajectory and its null embeddings."""
    assert task.trajectory is not None
    nulls = tuple(u for u in state["null_embeddings"])  # (steps, 1, 77, C) -> one (1, 77, C) per step
    return Inversion("spdinv", task.trajectory, null_embeddings=nulls, settings=settings.as_dict())


METHOD = InversionMethod(
    name="spdinv",
    summary="SPDInv: every inversion step made a fixed point by AdamW on the latent (<= 25 rounds, gradient through "
            "the UNet); E(src) as the editing null embedding",
    settings=SPDInvSettings,
    invert=invert_spdinv,
    aliases=(Alias("source-prompt-disentangled-inversion"),),
    ddim_trajectory=False,
    state_keys=("null_embeddings",),
    restore=restore_spdinv,
)
