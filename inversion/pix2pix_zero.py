"""pix2pix-zero's own DDIM inversion (Parmar et al., "Zero-shot Image-to-Image Translation",
SIGGRAPH 2023, its "regularized" DDIM inversion; docs/methods/pix2pix-zero.md), the inversion behind the
reference's ddim+pix2pix-zero and directinversion+pix2pix-zero (cure-lab/PnPInversion
`models/pix2pix_zero/ddim_inv.py` and `scheduler.py`, as pix2pixzero/pix2pix-zero).

Per step, at label t = 1, 21, ..., 981, under the caption at guidance 1:
1. eps = eps(L[k], t, E(caption));
2. the noise is pushed toward white Gaussian noise, 5 times: 5 rounds of
   eps <- eps - (20 / 5) grad L_ac(eps) (L_ac: the squared means of eps times itself rolled by a
   random shift along height and width, summed over channels and over the pyramid of 2x2 average
   poolings down to 8x8), then eps <- eps - 20 grad L_kl(eps) (L_kl: the KL divergence of
   N(mean, var) of eps from N(0, 1));
3. L[k+1] = the DDIM step (Song et al. 2021, eq. 12) from alpha-bar ab[t-1] to ab[t+19] (ab[999] at the last step): the reference's
   inverse scheduler reads the alpha-bars one timestep below the grid's, so z_T lives at ab[999]
   while the edit starts at the label 981.
The start latent is a sample of the VAE posterior (the reference calls latent_dist.sample()), drawn
with the run's seed; the random shifts come from Python's `random.Random(seed)`, which gives the
reference's own shifts (its setup_seed seeds `random` with 1234 right before each image).

`--p2pz-direct` makes it a DirectInversion (the source pinned onto the trajectory while editing):
the reference's directinversion+pix2pix-zero inverts exactly like ddim+pix2pix-zero and only then
pins the reconstruction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from inversion.method import InversionMethod, InversionTask
from ldm.model import StableDiffusion
from samplers.ddim import ddim_move
from samplers.inversion import Correction, Inversion, InversionCost
from samplers.noise import predict_noise
from samplers.settings import Alias, Settings, setting


@dataclass(frozen=True)
class Pix2PixZeroInversionSettings(Settings):
    """The reference's DDIMInversion.__call__ defaults."""

    ac_weight: float = setting(20.0, "weight of the auto-correlation regulariser of the noise (lambda_ac)",
                               flag="--p2pz-ac", low=0.0)
    kl_weight: float = setting(20.0, "weight of the KL regulariser of the noise (lambda_kl)", flag="--p2pz-kl", low=0.0)
    reg_steps: int = setting(5, "regularisation rounds per inversion step", flag="--p2pz-reg-steps", low=0)
    ac_rolls: int = setting(5, "random shifts per auto-correlation round", flag="--p2pz-ac-rolls", low=1)
    latent: str = setting("sample", "the start latent: a sample of the VAE posterior (the reference) or its mean",
                          flag="--p2pz-latent", choices=("sample", "mean"))
    direct: bool = setting(False, "pin the source onto the trajectory while editing (DirectInversion; the reference's "
                           "directinversion+pix2pix-zero)", flag="--p2pz-direct")


def auto_correlation_loss(noise: Tensor, rng: random.Random) -> Tensor:
    """L_ac of one (1, C, H, W) noise: per channel and pyramid level (2x2 average pooling down to
    8x8), (mean(n * roll(n, s, H)))^2 + (mean(n * roll(n, s, W)))^2 with s = randrange(level // 2)."""
    loss = torch.zeros((), device=noise.device)
    for c in range(noise.shape[1]):
        level = noise[:, c : c + 1]  # (1, 1, H, W)
        while True:
            shift = rng.randrange(level.shape[2] // 2)
            loss = loss + (level * torch.roll(level, shifts=shift, dims=2)).mean() ** 2
            loss = loss + (level * torch.roll(level, shifts=shift, dims=3)).mean() ** 2
            if level.shape[2] <= 8:
                break
            level = F.avg_pool2d(level, kernel_size=2)
    return loss


def kl_loss(noise: Tensor) -> Tensor:
    """KL(N(mean, var) || N(0, 1)) up to a factor: var + mean^2 - 1 - log(var), var unbiased."""
    mean, var = noise.mean(), noise.var()
    return var + mean**2 - 1 - torch.log(var + 1e-7)


def regularize_noise(eps: Tensor, settings: Pix2PixZeroInversionSettings, rng: random.Random) -> Tensor:
    """The reference's gradient steps on the predicted noise (step 2 of the module docstring)."""
    e = eps.detach().float()
    for _ in range(settings.reg_steps):
        if settings.ac_weight > 0:
            for _ in range(settings.ac_rolls):
                var = e.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(auto_correlation_loss(var, rng), var)
                e = e - settings.ac_weight * grad / settings.ac_rolls
        if settings.kl_weight > 0:
            var = e.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(kl_loss(var), var)
            e = e - settings.kl_weight * grad
        e = e.detach()
    return e


def invert_pix2pix_zero(sd: StableDiffusion, task: InversionTask,
                        settings: Pix2PixZeroInversionSettings = Pix2PixZeroInversionSettings()) -> Inversion:
    """Inverts from the photo; a DDIM trajectory in the task (another method's) is not this one's."""
    z = _start_latent(sd, task, settings)
    schedule = task.schedule
    ab, n = schedule.alphas_cumprod, schedule.num_train_timesteps
    rng = random.Random(task.seed)
    trajectory = [z]
    for t in tqdm(tuple(reversed(schedule.timesteps)), desc="pix2pix-zero inversion", disable=not task.progress, leave=False):
        with torch.no_grad():
            # z lives at ab[t - 1] on this shifted grid: a v output is read as noise there
            eps = predict_noise(sd, z, t, task.prompt, alpha_bar=ab[t - 1])
        with torch.enable_grad():
            eps = regularize_noise(eps, settings, rng)
        a_next = ab[t + schedule.step_ratio - 1] if t + schedule.step_ratio <= n else ab[n - 1]
        z = ddim_move(z, eps, ab[t - 1], a_next)
        trajectory.append(z)
    return _inversion(tuple(trajectory), settings, InversionCost(unet_rows=task.steps))


def _inversion(trajectory: tuple[Tensor, ...], settings: Pix2PixZeroInversionSettings, cost: InversionCost) -> Inversion:
    corrections = None
    if settings.direct:
        corrections = Correction("pivot", tuple(trajectory[-2 - i] for i in range(len(trajectory) - 1)))
    return Inversion("pix2pix-zero-inversion", trajectory, corrections=corrections, settings=settings.as_dict(), cost=cost)


def restore_pix2pix_zero(task: InversionTask, settings: Pix2PixZeroInversionSettings, state: Mapping[str, Tensor]) -> Inversion:
    """From a file written by this method: its trajectory is all the state there is."""
    assert task.trajectory is not None
    return _inversion(task.trajectory, settings, InversionCost())


@torch.no_grad()
def _start_latent(sd: StableDiffusion, task: InversionTask, settings: Pix2PixZeroInversionSettings) -> Tensor:
    if settings.latent == "mean" or task.image is None:
        return task.z0.float()
    generator = torch.Generator(device=task.image.device).manual_seed(task.seed)
    posterior = sd.vae.encode(task.image.to(sd.device, sd.dtype))
    return posterior.sample(generator).float() * sd.config.vae.scale_factor


METHOD = InversionMethod(
    name="pix2pix-zero-inversion",
    summary="pix2pix-zero's DDIM inversion: the noise regularised toward white noise (auto-correlation and KL), "
            "the reference's shifted alpha-bars, a posterior sample",
    settings=Pix2PixZeroInversionSettings,
    invert=invert_pix2pix_zero,
    aliases=(Alias("p2pzero-inversion"), Alias("regularized-ddim")),
    ddim_trajectory=False,
    restore=restore_pix2pix_zero,
)
