"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024,
arXiv 2304.06140, §3, eqs. 3-5; docs/methods/edit-friendly.md).

Sample the noised latents independently, x_k = sqrt(ab_k) z0 + sqrt(1 - ab_k) n_k (eq. 3, one
Gaussian draw n_k per grid point, t ascending, seeded before the image as the reference seeds),
then extract per denoising step the noise map that makes the stochastic DDIM step (eta = 1: DDPM's
variance) from x_{k+1} land exactly on x_k (eq. 5):

    z_i = (x_k - mu(x_{k+1}, eps)) / (eta sigma_i),   x_k := mu + eta sigma_i z_i

with eps = CFG(E(""), E(src), w_src = 1) and mu the step's mean (samplers/ddim.py ddpm_mean); the
re-assignment keeps the latents what the step reproduces in floating point. The last step's map is
zero, as the reference sets it (so the source branch ends at that step's mean, not at z0). Editing
(the one loop, samplers/loop.py) starts at grid step `skip` (timestep 741 of 50 steps) from x there,
adds the same maps to both branches, and steps the source at w_src (`Inversion.source_guidance`),
which reproduces x_k along the way.

As cure-lab/PnPInversion `models/edit_friendly_ddm/inversion_utils.py` (`sample_xts_from_x0`,
`inversion_forward_process`) run by `run_editing_edit_friendly_p2p.py`, except that the maps of the
`skip` steps the edit never runs are not computed (76 UNet rows instead of 100).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from inversion.method import InversionMethod, InversionTask
from ldm.errors import UsageError
from ldm.model import StableDiffusion
from samplers.ddim import ddpm_mean, ddpm_sigma
from samplers.inversion import Inversion, InversionCost, StepNoise
from samplers.noise import predict_guided
from samplers.schedule import Schedule
from samplers.settings import Alias, Settings, setting


@dataclass(frozen=True)
class EditFriendlySettings(Settings):
    """The reference's defaults (`run_editing_edit_friendly_p2p.py`: ETA, SKIP, source_guidance_scale)."""

    eta: float = setting(1.0, "the stochastic step's eta (1: DDPM's variance)", flag="--ef-eta", low=0.0)
    skip: int = setting(12, "denoising steps the edit skips: it starts at grid step SKIP (timestep 741 of 50)",
                        flag="--ef-skip", low=0)
    source_guidance: float = setting(1.0, "CFG scale of the source branch, in the inversion and in the edit",
                                     flag="--ef-source-guidance")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta <= 0:
            raise UsageError(f"--ef-eta {self.eta:g}: the noise maps divide by eta; expected > 0")


def noised_latents(z0: Tensor, schedule: Schedule, draws: Tensor) -> list[Tensor]:
    """[z0, x_1, ..., x_T]: x_k = sqrt(ab) z0 + sqrt(1 - ab) draws[k-1] at the k-th grid point from the
    clean end; draws (T, 1, C, h, w) in that order (t ascending)."""
    ab = schedule.alphas_cumprod
    ascending = tuple(reversed(schedule.timesteps))
    return [z0, *(z0 * ab[t] ** 0.5 + draws[k].to(z0) * (1 - ab[t]) ** 0.5 for k, t in enumerate(ascending))]


def seeded_draws(z0: Tensor, steps: int, seed: int) -> Tensor:
    """(steps, 1, C, h, w) standard normal draws from a CPU generator seeded with `seed`: the
    reference's `setup_seed(seed)` then one randn_like per grid point, t ascending (the same stream
    on every device, because it is drawn on the CPU)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.stack([torch.randn(z0.shape, generator=g) for _ in range(steps)])


def noise_maps(
    sd: StableDiffusion, z0: Tensor, draws: Tensor, prompt: Tensor, null: Tensor, schedule: Schedule,
    settings: EditFriendlySettings, progress: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """The noised latents x_0..x_T (re-assigned to what each step reproduces) and the maps of the
    denoising steps skip..T-1 (the last one zero)."""
    xs = noised_latents(z0.float(), schedule, draws)
    steps = schedule.steps
    maps: list[Tensor] = []
    for i in tqdm(range(settings.skip, steps), desc="edit-friendly", disable=not progress, leave=False):
        t, k = schedule.timesteps[i], steps - 1 - i  # step i goes from x_{k+1} to x_k
        with torch.no_grad():
            eps = predict_guided(sd, xs[k + 1], t, null, prompt, settings.source_guidance)
        mu = ddpm_mean(xs[k + 1], eps, t, schedule, settings.eta)
        sigma = ddpm_sigma(t, schedule, settings.eta).to(mu)
        z = (xs[k] - mu) / sigma
        xs[k] = mu + sigma * z  # what the step will reproduce, bit for bit
        maps.append(z)
    maps[-1] = torch.zeros_like(maps[-1])  # the reference's zs[0] = 0: no noise at the last step
    return xs, maps


def invert_edit_friendly(sd: StableDiffusion, task: InversionTask,
                         settings: EditFriendlySettings = EditFriendlySettings()) -> Inversion:
    if settings.skip >= task.steps:
        raise UsageError(f"--ef-skip {settings.skip}: the run has {task.steps} steps; expected fewer")
    started = time.perf_counter()
    draws = seeded_draws(task.z0, task.steps, task.seed)
    xs, maps = noise_maps(sd, task.z0, draws, task.prompt, task.null, task.schedule, settings, task.progress)
    cost = InversionCost(unet_rows=2 * (task.steps - settings.skip), seconds=time.perf_counter() - started)
    return Inversion("edit-friendly", tuple(xs), noise=StepNoise(settings.eta, tuple(maps)), start=settings.skip,
                     source_guidance=settings.source_guidance, settings=settings.as_dict(), cost=cost)


def restore_edit_friendly(task: InversionTask, settings: EditFriendlySettings, state: Mapping[str, Tensor]) -> Inversion:
    """From a file: the noised latents and the noise maps."""
    assert task.trajectory is not None
    maps = tuple(z for z in state["noise_maps"])  # (steps - skip, 1, C, h, w) -> one map per step run
    return Inversion("edit-friendly", task.trajectory, noise=StepNoise(settings.eta, maps), start=settings.skip,
                     source_guidance=settings.source_guidance, settings=settings.as_dict())


METHOD = InversionMethod(
    name="edit-friendly",
    summary="edit-friendly DDPM inversion: noise maps (eta 1) from independently noised latents; the edit "
            "starts at step 12 with the same maps on both branches, the source at guidance 1",
    settings=EditFriendlySettings,
    invert=invert_edit_friendly,
    aliases=(Alias("edit-friendly-inversion"), Alias("ddpm-inversion")),
    ddim_trajectory=False,
    state_keys=("noise_maps",),
    restore=restore_edit_friendly,
)
