"""Null-text inversion (Mokady et al., CVPR 2023; ALGORITHMS.md part A §3).

Keep the guidance-1 DDIM trajectory L as pivots and, for each denoising step i, optimise the
unconditional embedding u so that one CFG step (scale w) from the current reconstruction lands on
L[-2-i]: minimise ||ddim_step(z_i, eps_u + w (eps_c - eps_u)) - L[-2-i]||^2 over u (the paper's
eq. 4 with DDIM eq. 12). As the reference port (cure-lab/PnPInversion `NullInversion`): a fresh
Adam per step with lr 0.01 (1 - i/100), at most 10 iterations, stopping once the loss computed
before an update falls below 1e-5 + 2e-5 i (the updated u is kept), warm start from the previous
step's u, and the reconstruction z_{i+1} recomputed with the final u. The editing loop then uses
U[i] for every uncond row.

Only u receives gradients: the UNet's parameters are frozen for the duration (requires_grad
False), so no weight gradients are ever built.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from inversion.ddim import InversionConfig, ddim_trajectory, unet_eps
from samplers.ddim import ddim_step
from samplers.trajectory import Inversion


@dataclass(frozen=True)
class NullTextConfig(InversionConfig):
    inner_steps: int = 10
    lr: float = 1e-2
    early_stop: float = 1e-5
    early_stop_slope: float = 2e-5  # the threshold grows by this much per step


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters of `module` do not require grad inside the block; their flags are restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def optimize_null_step(
    sd: torch.nn.Module, z: Tensor, i: int, u: Tensor, c_src: Tensor, pivot: Tensor, cfg: NullTextConfig
) -> tuple[Tensor, Tensor, list[float]]:
    """Denoising step i of null-text inversion from the reconstruction z (1, 4, h, w).

    Returns the optimised u (1, 77, C), the next reconstruction ddim_step(z, CFG(u)) and the loss of
    each inner iteration. The caller freezes the UNet (see `frozen`).
    """
    schedule = cfg.schedule
    t = schedule.timesteps[i]
    w = cfg.guidance
    u = u.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=cfg.lr * (1.0 - i / 100.0))  # fresh moments every step
    with torch.no_grad():
        e_c = unet_eps(sd, z, t, c_src)
    losses: list[float] = []
    for _ in range(cfg.inner_steps):
        e_u = unet_eps(sd, z, t, u)
        loss = F.mse_loss(ddim_step(z, e_u + w * (e_c - e_u), t, schedule), pivot)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        # tested after the update, with the loss from before it: the updated u is kept
        if losses[-1] < cfg.early_stop + i * cfg.early_stop_slope:
            break
    u = u.detach()
    with torch.no_grad():
        e_u, e_c = unet_eps(sd, z, t, torch.cat([u, c_src])).chunk(2)
        z_next = ddim_step(z, e_u + w * (e_c - e_u), t, schedule)
    return u, z_next, losses


def invert_null_text(
    sd: torch.nn.Module,
    z0: Tensor,
    c_src: Tensor,
    cfg: NullTextConfig = NullTextConfig(),
    *,
    trajectory: list[Tensor] | None = None,
) -> Inversion:
    """trajectory: a DDIM inversion of z0 under c_src already computed (skips that pass)."""
    if trajectory is None:
        trajectory = ddim_trajectory(sd, z0, c_src, cfg.schedule, cfg.progress)
    with torch.no_grad():
        u = sd.embed([""]).float()
    c_src = c_src.float()
    null_embeddings: list[Tensor] = []
    losses: list[list[float]] = []
    rows = cfg.steps  # the DDIM pass
    z = trajectory[-1]
    with frozen(sd):
        for i in tqdm(range(cfg.steps), desc="null-text", disable=not cfg.progress, leave=False):
            u, z, step_losses = optimize_null_step(sd, z, i, u, c_src, trajectory[-2 - i], cfg)
            null_embeddings.append(u)
            losses.append(step_losses)
            rows += 1 + len(step_losses) + 2
    return Inversion(
        trajectory[-1], trajectory, null_embeddings=null_embeddings, losses=losses, unet_rows=rows, method="null-text"
    )
