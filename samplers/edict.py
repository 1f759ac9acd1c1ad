"""EDICT's coupled, exactly invertible DDIM steps (Wallace, Gokul & Naik, "EDICT: Exact Diffusion
Inversion via Coupled Transformations", CVPR 2023, eqs. 14-15 for denoising and 16 for the
inversion; docs/methods/edict.md).

Two latent sequences (x, y) are carried together. A denoising step at timestep t (s = t - the
grid's step) updates each sequence with an affine DDIM step whose noise is predicted from the
*other* sequence, then mixes them:

    step(v, e) = a v + b e,   a = sqrt(ab[s] / ab[t]),   b = sqrt(1 - ab[s]) - a sqrt(1 - ab[t])
    x <- step(x, eps(y));  y <- step(y, eps(x))          (the order alternates per step: leapfrog)
    x <- p x + (1 - p) y;  y <- (1 - p) x + p y          (y reads the new x)

Every operation is an affine map of one sequence given the other, so the inversion undoes them in
reverse order with the same noise predictions: un-mix, then v = (v' - b e) / a for the two
sequences in the opposite order. The arithmetic is written as the reference writes it
(cure-lab/PnPInversion `models/edict/edict_functions.py` `forward_step` / `reverse_step`), with
EDICT's float64 alpha-bars, in the latents' dtype.

`edict_denoise` is a drop-in for `samplers.loop.denoise` (same arguments, same `Denoised`) for the
inversions whose latents only EDICT can denoise: each stepped role of the layout carries its own
pair, both started from the inversion's pair, and every half-step is one UNet call on all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.context import AttnContext, BatchLayout, Controller, RunInfo
from ldm.model import StableDiffusion
from samplers.guidance import ClassifierFree, Guidance, GuidedRows
from samplers.inversion import Inversion
from samplers.loop import Denoised, Embeddings, StepHook, row_embeddings
from samplers.noise import predict_noise, unet_dtype
from samplers.schedule import Schedule

NoiseFn = Callable[[Tensor, int], Tensor]  # eps(latent, t): the guided prediction for a latent


@dataclass(frozen=True)
class Coupling:
    """EDICT's pairing: mixing weight p and whether the update order alternates (leapfrog)."""

    mix: float = 0.93
    leapfrog: bool = True


def active_timesteps(schedule: Schedule, strength: float) -> tuple[int, ...]:
    """The denoising-order grid EDICT walks: the reference's T[steps - int(steps * strength):]."""
    return schedule.timesteps[schedule.steps - int(schedule.steps * strength):]


def _alphas(t: int, schedule: Schedule, like: Tensor) -> tuple[Tensor, Tensor]:
    """ab[t] and ab[t - step] (the final alpha-bar below 0) in the latent's dtype and device."""
    a_t = schedule.alpha(t).to(like.device, like.dtype)
    a_s = schedule.alpha(schedule.prev(t)).to(like.device, like.dtype)
    return a_t, a_s


def forward_step(sample: Tensor, eps: Tensor, t: int, schedule: Schedule) -> Tensor:
    """One affine DDIM step from t to t - step: a sample + b eps, written as the reference does."""
    a_t, a_s = _alphas(t, schedule, sample)
    quotient = (a_t / a_s) ** 0.5
    return (1.0 / quotient) * sample - (1.0 / quotient) * (1 - a_t) ** 0.5 * eps + (1 - a_s) ** 0.5 * eps


def reverse_step(sample: Tensor, eps: Tensor, t: int, schedule: Schedule) -> Tensor:
    """The inverse of `forward_step` with the same eps: (sample - b eps) / a."""
    a_t, a_s = _alphas(t, schedule, sample)
    quotient = (a_t / a_s) ** 0.5
    return quotient * sample + (1 - a_t) ** 0.5 * eps - quotient * (1 - a_s) ** 0.5 * eps


def update_order(step: int, leapfrog: bool) -> tuple[int, int]:
    """Which sequence denoising step `step` updates first (0 = x): x then y, every other step y then x."""
    return (1, 0) if leapfrog and step % 2 else (0, 1)


def denoise_pair(x: Tensor, y: Tensor, step: int, t: int, eps: NoiseFn, schedule: Schedule,
                 coupling: Coupling) -> tuple[Tensor, Tensor]:
    """Denoising step `step` (at timestep t) of the pair: two half-updates, then the mixing layer."""
    pair = [x, y]
    for m in update_order(step, coupling.leapfrog):
        pair[m] = forward_step(pair[m], eps(pair[1 - m], t), t, schedule)
    p = coupling.mix
    x = p * pair[0] + (1 - p) * pair[1]
    y = (1 - p) * x + p * pair[1]
    return x, y


def invert_pair(x: Tensor, y: Tensor, step: int, t: int, eps: NoiseFn, schedule: Schedule,
                coupling: Coupling) -> tuple[Tensor, Tensor]:
    """Undo `denoise_pair(.., step, t, ..)`: un-mix, then the half-updates in the opposite order."""
    p = coupling.mix
    y = (y - (1 - p) * x) / p
    x = (x - (1 - p) * y) / p
    pair = [x, y]
    for m in reversed(update_order(step, coupling.leapfrog)):
        pair[m] = reverse_step(pair[m], eps(pair[1 - m], t), t, schedule)
    return pair[0], pair[1]


@torch.no_grad()
def edict_denoise(
    sd: StableDiffusion,
    layout: BatchLayout,
    embeddings: Embeddings,
    *,
    inversion: Inversion | None = None,
    z_T: Tensor | None = None,
    controllers: Sequence[Controller] = (),
    guidance: Guidance | float = 3.0,
    steps: int | None = None,
    schedule: Schedule | None = None,
    hooks: Sequence[StepHook] = (),
    progress: bool = False,
    desc: str = "EDICT",
) -> Denoised:
    """Denoise every stepped role of `layout` from an EDICT inversion's pair (samplers.loop.denoise's
    arguments). The inversion's settings fix the rest: the grid and strength, the coupling, the
    guidance scale and the dtype the UNet runs in; `guidance`, `steps` and `schedule` are not read.

    Controllers observe (the cross-attention recorder) and may edit attention, twice per step (one
    call per half-update); their end_step is not called, a role having two latents. Hooks and
    reference rows are refused: EDICT's reference edits by re-denoising with the target prompt alone.
    """
    if inversion is None or inversion.partner is None:
        raise ValueError("EDICT denoises the coupled pair of an EDICT inversion; pass inversion=")
    if hooks or layout.indices("reference") or z_T is not None:
        raise ValueError("EDICT's sampler takes neither step hooks, reference rows nor another start latent")
    settings = inversion.settings
    coupling = Coupling(float(settings["mix"]), bool(settings["leapfrog"]))
    dtype = torch.float64 if settings["dtype"] == "float64" else torch.float32
    grid = Schedule.edict(int(settings["steps"]))
    timesteps = active_timesteps(grid, float(settings["strength"]))
    cfg = ClassifierFree(float(settings["guidance"]))
    roles = layout.stepped_roles
    x = inversion.z_T.to(dtype).expand(len(roles), *inversion.z_T.shape[1:]).clone()  # (R, 4, h, w)
    y = inversion.partner.to(x).expand_as(x).clone()
    context = row_embeddings(layout, embeddings).to(x.device)
    feed = torch.tensor([roles.index(r.role) for r in layout.rows], device=x.device)
    rows = GuidedRows.of(layout, x.device)
    controllers = tuple(controllers)
    run = RunInfo(layout=layout, num_steps=len(timesteps), device=x.device, latent_hw=tuple(x.shape[-2:]))
    for controller in controllers:
        controller.start(run)
    calls = 0
    with unet_dtype(sd, dtype):
        context = context.to(dtype)
        for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
            ctx = AttnContext(step=i, timestep=t, num_steps=len(timesteps), layout=layout, controllers=controllers)
            for controller in controllers:
                controller.begin_step(ctx)

            def eps(latents: Tensor, t: int) -> Tensor:
                nonlocal calls
                calls += 1
                return rows.eps(predict_noise(sd, latents.index_select(0, feed), t, context, ctx), cfg, ctx)

            x, y = denoise_pair(x, y, i, t, eps, grid, coupling)
    return Denoised(latents=x, roles=roles, unet_calls=calls, unet_rows=calls * len(layout))
