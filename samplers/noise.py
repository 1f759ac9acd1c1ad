"""The UNet's noise prediction as every sampler and inversion reads it, and the pieces shared around it.

- `predict_noise(sd, x, t, context, ctx)`: eps(x, t, c) in float32 with the UNet's own dtype
  inside. This is the one place a network output becomes a noise prediction, for the editing loop
  and for every inversion method alike.
- `cfg(uncond, cond, scale)`: the classifier-free-guidance combine eps_u + w (eps_c - eps_u)
  (Ho & Salimans 2022, eq. 6).
- `predict_guided(sd, z, t, uncond, cond, scale)`: both predictions of one latent in one batched
  call, [uncond, cond] as the references batch them, combined by `cfg`.
- `frozen_weights(module)`: a block in which no parameter requires grad, for the methods that
  take gradients through the UNet (null-text inversion and the other optimisations): autograd
  then builds input gradients only, never weight gradients.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from ldm.context import AttnContext
from ldm.model import StableDiffusion


def predict_noise(sd: StableDiffusion, x: Tensor, t: int, context: Tensor, ctx: AttnContext | None = None) -> Tensor:
    """eps(x, t, context) as float32; x (B, 4, h, w), context (B, 77, C) or (1, 77, C).

    A single latent is repeated to the context's batch as a real copy per row, not a stride-0 view:
    convolutions then round exactly as they do on the editing loop's batch, which keeps
    DirectInversion's recorded offsets exact there.
    """
    dtype = sd.dtype
    if x.shape[0] == 1 and context.shape[0] > 1:
        x = x.repeat(context.shape[0], 1, 1, 1)
    elif context.shape[0] == 1 and x.shape[0] > 1:
        context = context.expand(x.shape[0], *context.shape[1:])
    timestep = torch.tensor(t, device=x.device)
    return sd.unet(x.to(dtype), timestep, context.to(dtype), ctx).float()


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
