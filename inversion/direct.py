"""DirectInversion / PnP Inversion (Ju et al., ICLR 2024; ALGORITHMS.md part A §6).

Invert with plain DDIM, then during editing force the source branch back onto the inversion
trajectory after every step, leaving the target branch alone. Two equivalent forms:

- "fused" (default): the loop overwrites the source latent with the pivot L[-2-i] after each step
  (§6.3). No extra pass: 50 UNet rows for the inversion.
- "offset": the reference's form. A separate 50-step pass records D[i] = L[-2-i] - z_rec, where
  z_rec is one CFG step (scale cfg.guidance, uncond E("")) from the pivot L[-1-i]; the loop adds
  D[i] to the source latent. The reference runs this pass on the edit's batch of 4 (§6.1), whose
  target half it never uses; we do the same when given the target embedding, else run the source
  pair [E(""), E(src)] only (enough for a reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from inversion.ddim import InversionConfig, ddim_trajectory, unet_eps
from samplers.ddim import ddim_step
from samplers.trajectory import Correction, Inversion


@dataclass(frozen=True)
class DirectConfig(InversionConfig):
    form: Literal["fused", "offset"] = "fused"


@torch.no_grad()
def source_offsets(
    sd: torch.nn.Module,
    trajectory: list[Tensor],
    c_null: Tensor,
    c_src: Tensor,
    cfg: InversionConfig,
    c_tgt: Tensor | None = None,
) -> list[Tensor]:
    """D[i] = L[-2-i] - ddim_step(L[-1-i], CFG(eps(L[-1-i], t_i, [E(""), E(src)]))), i = 0..steps-1.

    With c_tgt the UNet batch is the edit's own [E(""), E(""), E(src), E(tgt)] (the reference's
    choice): CPU and GPU kernels may round a row differently at another batch position or size,
    and the add-offset form carries any such difference forward, amplified by the guidance.
    """
    schedule = cfg.schedule
    if c_tgt is None:
        context, rows = torch.cat([c_null, c_src]), (0, 1)  # (2, 77, C): uncond row first
    else:
        context, rows = torch.cat([c_null, c_null, c_src, c_tgt]), (0, 2)  # (4, 77, C)
    offsets = []
    z = trajectory[-1]
    for i, t in enumerate(tqdm(schedule.timesteps, desc="DirectInversion offsets", disable=not cfg.progress, leave=False)):
        eps = unet_eps(sd, z, t, context)
        e_u, e_c = eps[rows[0] : rows[0] + 1], eps[rows[1] : rows[1] + 1]
        z_rec = ddim_step(z, e_u + cfg.guidance * (e_c - e_u), t, schedule)
        d = trajectory[-2 - i] - z_rec
        offsets.append(d)
        z = z_rec + d  # back on the pivot, as the reference does
    return offsets


def invert_direct(
    sd: torch.nn.Module,
    z0: Tensor,
    c_src: Tensor,
    cfg: DirectConfig = DirectConfig(),
    *,
    trajectory: list[Tensor] | None = None,
    c_null: Tensor | None = None,
    c_tgt: Tensor | None = None,
) -> Inversion:
    """trajectory: a DDIM inversion of z0 under c_src already computed (skips that pass).

    c_null: the uncond embedding the editing loop will use (offset form only; default E("")).
    Pass the very tensor the loop gets: the offsets cancel the loop's CFG step exactly only if
    they were recorded with bit-identical inputs, and guidance 7.5 amplifies any rounding
    difference (an E("") from a batch-3 text-encoder call differs by 2e-7 and ends 1e-3 off).
    c_tgt: offset form only: record in the edit's batch [E(""), E(""), E(src), E(tgt)] (layout
    BatchLayout.cfg()), as the reference does, so the source rows round exactly as in the edit.
    """
    if trajectory is None:
        trajectory = ddim_trajectory(sd, z0, c_src, cfg.schedule, cfg.progress)
    if cfg.form == "fused":
        pivots = tuple(trajectory[-2 - i] for i in range(cfg.steps))
        return Inversion(trajectory[-1], trajectory, corrections=Correction("pivot", pivots), unet_rows=cfg.steps, method="direct")
    if cfg.form != "offset":
        raise ValueError(f"DirectInversion form must be 'fused' or 'offset', got {cfg.form!r}")
    if c_null is None:
        c_null = sd.embed([""])
    c_null = c_null.to(c_src)
    offsets = source_offsets(sd, trajectory, c_null, c_src, cfg, c_tgt)
    rows = cfg.steps * (1 + (2 if c_tgt is None else 4))
    return Inversion(trajectory[-1], trajectory, corrections=Correction("offset", tuple(offsets)), unet_rows=rows, method="direct")
