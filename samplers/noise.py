"""The UNet's noise prediction as every sampler and inversion reads it, and the pieces shared around it.

- `predict_noise(sd, x, t, context, ctx)`: eps(x, t, c) in float32 with the UNet's own dtype
  inside. This is the one place a network output becomes a noise prediction, for the editing loop
  and for every inversion method alike: a v-prediction model's output (SD-2.x 768-v,
  `UNetConfig.prediction_type`) is converted here, so DDIM steps, guidance, proximal guidance and
  every inversion only ever see eps.
- `v_to_noise(v, x, alpha_bar)`: that conversion, eps = sqrt(abar) v + sqrt(1 - abar) x. With
  x = sqrt(abar) x0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans &
  Ho 2022, "Progressive distillation", §4, with alpha = sqrt(abar), sigma =
  sqrt(1 - abar)), sqrt(abar) v + sqrt(1 - abar) x = (abar + 1 - abar) eps.
- `predict_inversion_noise(sd, z, t, context, schedule)`: the eps of a DDIM inversion step, whose
  latent lives one grid point below the label it is queried at.
- `cfg(uncond, cond, scale)`: the classifier-free-guidance combine eps_u + w (eps_c - eps_u)
  (Ho & Salimans 2022, eq. 6).
- `predict_guided(sd, z, t, uncond, cond, scale)`: both predictions of one latent in one batched
  call, [uncond, cond] as the references batch them, combined by `cfg`.
- `frozen_weights(module)`: a block in which no parameter requires grad, for the methods that
  take gradients through the UNet (null-text inversion and the other optimisations): autograd
  then builds input gradients only, never weight gradients.
- `unet_dtype(sd, dtype)`: a block in which the UNet computes in another floating type (EDICT runs
  it in float64, as its reference does); its weights are converted back exactly afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from ldm.context import AttnContext
from ldm.model import StableDiffusion
from samplers.ddim import inversion_start
from samplers.schedule import Schedule, alphas_cumprod


def v_to_noise(v: Tensor, x: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps = sqrt(abar) v + sqrt(1 - abar) x for a sample x at noise level abar (float32 0-d).

    Written as diffusers' DDIMScheduler writes its `pred_epsilon`, so the two round alike."""
    alpha_bar = alpha_bar.to(x.device, torch.promote_types(x.dtype, torch.float32))
    return alpha_bar**0.5 * v + (1 - alpha_bar) ** 0.5 * x


def predict_noise(
    sd: StableDiffusion, x: Tensor, t: int, context: Tensor, ctx: AttnContext | None = None,
    *, alpha_bar: Tensor | None = None,
) -> Tensor:
    """eps(x, t, context) as float32 (float64 from a float64 UNet); x (B, 4, h, w), context (B, 77, C) or (1, 77, C).

    A single latent is repeated to the context's batch as a real copy per row, not a stride-0 view:
    convolutions then round exactly as they do on the editing loop's batch, which keeps
    DirectInversion's recorded offsets exact there.

    A v-prediction UNet's output is turned into eps at the noise level x lives at: `alpha_bar`
    when given, else the alpha-bar of the label t in the training schedule, the one the label
    indexes. Only a caller that queries a latent at another label than its own level passes it
    (the DDIM inversion step: `predict_inversion_noise`). An epsilon UNet ignores it.
    """
    dtype = sd.dtype
    if x.shape[0] == 1 and context.shape[0] > 1:
        x = x.repeat(context.shape[0], 1, 1, 1)
    elif context.shape[0] == 1 and x.shape[0] > 1:
        context = context.expand(x.shape[0], *context.shape[1:])
    timestep = torch.full((), t, dtype=torch.long, device=x.device)  # a fill on the device, no host copy
    out = sd.unet(x.to(dtype), timestep, context.to(dtype), ctx)
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    if sd.config.unet.prediction_type == "epsilon":
        return out
    return v_to_noise(out, x.to(out.dtype), alphas_cumprod()[t] if alpha_bar is None else alpha_bar)


def predict_inversion_noise(sd: StableDiffusion, z: Tensor, t: int, context: Tensor, schedule: Schedule) -> Tensor:
    """The eps `ddim_inverse_step(z, eps, t, schedule)` takes: the UNet is asked about z, which
    lives one grid point below t (at `inversion_start(t)`), with the noisier label t (the
    references' approximation eps(z_{t-1}, t) ~ eps(z_t, t)).

    A v output is converted at z's own level, not at t's: diffusers' DDIMInverseScheduler does so
    (its `alpha_prod_t` is the start's), and tests/test_v_prediction.py holds us to it. Converting
    at t instead would read the same v as the noise of a sample at t's level."""
    return predict_noise(sd, z, t, context, alpha_bar=schedule.alpha(inversion_start(t, schedule)))


def cfg(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: uncond + scale (cond - uncond); scale 1 gives cond."""
    return uncond + scale * (cond - uncond)


def predict_guided(sd: StableDiffusion, z: Tensor, t: int, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """CFG noise of one latent z (1, 4, h, w): one UNet call on [uncond, cond]."""
    e_u, e_c = predict_noise(sd, z, t, torch.cat([uncond, cond])).chunk(2)
    return cfg(e_u, e_c, scale)


@contextlib.contextmanager
def frozen_weights(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` do not require grad inside the block; their flags are restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def unet_dtype(sd: StableDiffusion, dtype: torch.dtype) -> Iterator[None]:
    """The UNet's parameters and buffers in `dtype` inside the block, in their own dtype after.

    Widening (fp16/fp32 -> fp64) and narrowing back are exact, so the model the rest of a run sees
    is bit for bit the one it had; converting in place costs no second copy of the weights."""
    own = sd.dtype
    if dtype == own:
        yield
        return
    sd.unet.to(dtype)
    try:
        yield
    finally:
        sd.unet.to(own)
