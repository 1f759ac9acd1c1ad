"""Deterministic DDIM steps (Song et al. 2021, eq. 12 with eta = 0) and their inversion.

Both are pure functions of tensors and the `Schedule`; the arithmetic is written in the same
order as the reference (`prev_step` / `next_step` of cure-lab/PnPInversion
`models/p2p/inversion.py`; docs/methods/README.md "The DDIM step", "The inversion step") with
float32 alpha-bars, so results agree with diffusers' DDIMScheduler / DDIMInverseScheduler to float
rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samplers.schedule import Schedule


def _move(sample: Tensor, eps: Tensor, a_from: Tensor, a_to: Tensor) -> Tensor:
    """Predict x0 at alpha-bar a_from, then re-noise it to a_to with the same eps (eq. 12, eta 0)."""
    # float32 alpha-bars as the reference, but never rounded below the sample's precision (fp64 EDICT)
    dtype = torch.promote_types(sample.dtype, torch.float32)
    a_from = a_from.to(sample.device, dtype)
    a_to = a_to.to(sample.device, dtype)
    x0 = (sample - (1 - a_from) ** 0.5 * eps) / a_from**0.5
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def ddim_move(sample: Tensor, eps: Tensor, a_from: Tensor, a_to: Tensor) -> Tensor:
    """Eq. 12 between two given alpha-bars, for inversions that read other ones than the grid's
    (pix2pix-zero's inverse scheduler is shifted by one timestep)."""
    return _move(sample, eps, a_from, a_to)


def ddim_step(sample: Tensor, eps: Tensor, t: int, schedule: Schedule) -> Tensor:
    """One denoising step from timestep t to t - step_ratio (alpha-bar ab[0] past the end)."""
    return _move(sample, eps, schedule.alpha(t), schedule.alpha(schedule.prev(t)))


def inversion_start(t: int, schedule: Schedule) -> int:
    """The timestep the inversion step to t starts from (negative for the first: the clean latent)."""
    return min(schedule.prev(t), schedule.num_train_timesteps - 1)


def ddim_inverse_step(sample: Tensor, eps: Tensor, t: int, schedule: Schedule) -> Tensor:
    """One inversion step from t - step_ratio up to t.

    `t` is the *target* (noisier) timestep, and it is also the label the caller must give the UNet
    for `eps`, although `sample` lives at t - step_ratio: the reference's approximation
    eps(z_{t-1}, t) ~ eps(z_t, t) ("The inversion step": the timestep label). The first step starts
    from ab[0] = 0.99915, not 1, because set_alpha_to_one is False.
    """
    return _move(sample, eps, schedule.alpha(inversion_start(t, schedule)), schedule.alpha(t))
