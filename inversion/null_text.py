"""Null-text inversion (Mokady et al., CVPR 2023; docs/methods/null-text.md).

Keep the guidance-1 DDIM trajectory L as pivots and, for each denoising step i, optimise the
unconditional embedding u so that one CFG step (scale w) from the current reconstruction lands on
L[-2-i]: minimise ||ddim_step(z_i, eps_u + w (eps_c - eps_u)) - L[-2-i]||^2 over u (the paper's
eq. 4 with DDIM eq. 12). As the reference port (cure-lab/PnPInversion `NullInversion`): a fresh
Adam per step with lr 0.01 (1 - i/100), at most 10 iterations, stopping once the loss computed
before an update falls below 1e-5 + 2e-5 i (the updated u is kept), warm start from the previous
step's u, and the reconstruction z_{i+1} recomputed with the final u. The editing loop then uses
U[i] for every uncond row.

The reference runner's two ablations of it are the setting `apply`: "source" puts U[i] on the
source branch's uncond row only (`ablation_null-text-inversion_single_branch`); "source-offset"
leaves E("") on every row and adds to the source, after each step, the offset
D[i] = z_{i+1} - ddim_step(z_i, CFG(E(""), E(src))) that U[i] causes
(`ablation_null-latent-inversion`, the reference's `null_latent_calculate`): the same source
trajectory, reached as DirectInversion reaches it.

Only u receives gradients: the UNet's parameters are frozen for the duration
(samplers.noise.frozen_weights), so no weight gradients are ever built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from inversion.ddim import ddim_trajectory, trajectory_cost
from inversion.method import InversionMethod, InversionTask
from ldm.model import StableDiffusion
from ldm.errors import UsageError
from samplers.ddim import ddim_step
from samplers.inversion import Correction, Inversion, InversionCost
from samplers.noise import cfg, frozen_weights, predict_guided, predict_noise
from samplers.schedule import Schedule
from samplers.settings import Alias, Settings, setting


@dataclass(frozen=True)
class NullTextSettings(Settings):
    inner_steps: int = setting(10, "Adam iterations per denoising step (at most)", flag="--nti-inner-steps", low=0)
    lr: float = setting(1e-2, "Adam learning rate at step 0, decayed as lr (1 - i/100)", flag="--nti-lr", low=0.0)
    early_stop: float = setting(1e-5, "stop a step's optimisation below this loss (+ the slope x step)",
                                flag="--nti-early-stop", low=0.0)
    early_stop_slope: float = setting(2e-5, "per-step growth of the early-stop threshold", flag="--nti-early-stop-slope",
                                      low=0.0)
    apply: str = setting("both", "where the optimised null embeddings act while editing: both: the uncond rows of both "
                         "branches; source: the source branch's only, the target keeps E(\"\") (the reference's "
                         "single-branch ablation); source-offset: neither, the source instead gets the latent offset "
                         "they cause (the reference's null-latent ablation)", flag="--nti-apply",
                         choices=("both", "source", "source-offset"))


def optimize_null_step(
    sd: StableDiffusion, z: Tensor, i: int, u: Tensor, c_src: Tensor, pivot: Tensor, schedule: Schedule,
    guidance: float, settings: NullTextSettings,
) -> tuple[Tensor, Tensor, list[float]]:
    """Denoising step i of null-text inversion from the reconstruction z (1, 4, h, w).

    Returns the optimised u (1, 77, C), the next reconstruction ddim_step(z, CFG(u)) and the loss of
    each inner iteration. The caller freezes the UNet (samplers.noise.frozen_weights).
    """
    t = schedule.timesteps[i]
    u = u.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=settings.lr * (1.0 - i / 100.0))  # fresh moments every step
    with torch.no_grad():
        e_c = predict_noise(sd, z, t, c_src)
    losses: list[float] = []
    for _ in range(settings.inner_steps):
        e_u = predict_noise(sd, z, t, u)
        loss = F.mse_loss(ddim_step(z, cfg(e_u, e_c, guidance), t, schedule), pivot)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        # tested after the update, with the loss from before it: the updated u is kept
        if losses[-1] < settings.early_stop + i * settings.early_stop_slope:
            break
    u = u.detach()
    with torch.no_grad():
        z_next = ddim_step(z, predict_guided(sd, z, t, u, c_src, guidance), t, schedule)
    return u, z_next, losses


def invert_null_text(sd: StableDiffusion, task: InversionTask, settings: NullTextSettings = NullTextSettings()) -> Inversion:
    trajectory = ddim_trajectory(sd, task)
    u = task.null.float()
    c_src = task.prompt.float()
    null_embeddings: list[Tensor] = []
    offsets: list[Tensor] = []
    losses: list[tuple[float, ...]] = []
    z = trajectory[-1]
    with frozen_weights(sd):
        for i in tqdm(range(task.steps), desc="null-text", disable=not task.progress, leave=False):
            z_prev = z
            u, z, step_losses = optimize_null_step(sd, z, i, u, c_src, trajectory[-2 - i], task.schedule, task.guidance, settings)
            null_embeddings.append(u)
            losses.append(tuple(step_losses))
            if settings.apply == "source-offset":
                with torch.no_grad():  # what the step with E("") misses of the step with u
                    t = task.schedule.timesteps[i]
                    plain = ddim_step(z_prev, predict_guided(sd, z_prev, t, task.null.float(), c_src, task.guidance), t,
                                      task.schedule)
                offsets.append(z - plain)
    rounds = tuple(len(l) for l in losses)
    # per step: the conditional prediction, one forward+backward per round, the final 2-row step
    # (and the 2-row step with E("") of the null-latent form)
    extra = 2 * task.steps if offsets else 0
    cost = trajectory_cost(task) + InversionCost(
        unet_rows=sum(1 + r + 2 for r in rounds) + extra, unet_rows_backward=sum(rounds), rounds_per_step=rounds
    )
    return applied(Inversion("null-text", trajectory, null_embeddings=tuple(null_embeddings), settings=settings.as_dict(),
                             cost=cost, losses=tuple(losses)), settings, offsets)


def applied(inversion: Inversion, settings: NullTextSettings, offsets: Sequence[Tensor] = ()) -> Inversion:
    """The inversion with its null embeddings acting where `settings.apply` says: on every uncond row,
    on the source's only (null_roles), or on none, the source then corrected by the offsets the
    embeddings cause (kept in the record for inversion files)."""
    if settings.apply == "both":
        return inversion
    if settings.apply == "source":
        return replace(inversion, null_roles=("source",))
    return replace(inversion, null_roles=(), corrections=Correction("offset", tuple(offsets), pinned=False))


def restore_null_text(task: InversionTask, settings: NullTextSettings, state: Mapping[str, Tensor]) -> Inversion:
    assert task.trajectory is not None
    nulls = tuple(u for u in state["null_embeddings"])  # (steps, 1, 77, C) -> one (1, 77, C) per step
    if settings.apply == "source-offset" and "offsets" not in state:
        raise UsageError("--nti-apply source-offset needs the inversion file's offsets; invert with it again")
    offsets = tuple(d for d in state["offsets"]) if settings.apply == "source-offset" else ()  # one (1, 4, h, w) per step
    return applied(Inversion("null-text", task.trajectory, null_embeddings=nulls, settings=settings.as_dict()), settings,
                   offsets)


METHOD = InversionMethod(
    name="null-text",
    summary="null-text inversion: optimise the null embedding of every step (Adam, <= 10 rounds) onto the DDIM pivots",
    settings=NullTextSettings,
    invert=invert_null_text,
    aliases=(Alias("null-text-inversion"), Alias("nti"),
             # the reference runner's ablation rows
             Alias("ablation_null-text-inversion_single_branch", {"apply": "source"}),
             Alias("ablation_null-latent-inversion", {"apply": "source-offset"})),
    state_keys=("null_embeddings",),
    restore=restore_null_text,
)
