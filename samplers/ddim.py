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


def ddpm_variance(t: int, schedule: Schedule) -> Tensor:
    """sigma_t^2 / eta^2 of eq. 16: (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev), float32 0-d."""
    a_t, a_prev = schedule.alpha(t), schedule.alpha(schedule.prev(t))
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


def ddpm_mean(sample: Tensor, eps: Tensor, t: int, schedule: Schedule, eta: float) -> Tensor:
    """The stochastic step's mean (eq. 12 with eta > 0): sqrt(ab_prev) x0 + sqrt(1 - ab_prev - eta var) eps.

    `eta var`, not eta^2 var, as the edit-friendly reference writes it (the same for its eta = 1)."""
    dtype = torch.promote_types(sample.dtype, torch.float32)
    a_t = schedule.alpha(t).to(sample.device, dtype)
    a_prev = schedule.alpha(schedule.prev(t)).to(sample.device, dtype)
    var = ddpm_variance(t, schedule).to(sample.device, dtype)
    x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev - eta * var) ** 0.5 * eps


def ddpm_sigma(t: int, schedule: Schedule, eta: float) -> Tensor:
    """eta * sqrt(var): the scale of the noise map added after the mean."""
    return eta * ddpm_variance(t, schedule) ** 0.5


def ddpm_step(sample: Tensor, eps: Tensor, t: int, schedule: Schedule, eta: float, noise: Tensor) -> Tensor:
    """One stochastic denoising step with a given noise map: mean + eta sqrt(var) noise (eq. 12, 16)."""
    sigma = ddpm_sigma(t, schedule, eta).to(sample.device, torch.promote_types(sample.dtype, torch.float32))
    return ddpm_mean(sample, eps, t, schedule, eta) + sigma * noise.to(sample)
