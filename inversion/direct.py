"""DirectInversion / PnP Inversion (Ju et al., ICLR 2024; docs/methods/direct-inversion.md).

Invert with plain DDIM, then during editing force the source branch back onto the inversion
trajectory after every step, leaving the target branch alone. Two equivalent forms:

- "fused" (default): the loop overwrites the source latent with the pivot L[-2-i] after each step.
  No extra pass: 50 UNet rows for the inversion.
- "offset": the reference's form. A separate 50-step pass records D[i] = L[-2-i] - z_rec, where
  z_rec is one CFG step (the loop's scale, uncond E("")) from the pivot L[-1-i]; the loop adds
  D[i] to the source latent. The reference runs this pass on the edit's batch of 4, whose target
  half it never uses; we do the same when the task has the target embedding, else run the source
  pair [E(""), E(src)] only (enough for a reconstruction).

The reference runner's ablation rows are settings of this method (docs/methods/direct-inversion.md
"Ablations"): the inversion under CFG (`inversion_guidance`, `directinversion+p2p_guidance_{i}_{f}`
with the run's guidance f), offsets scaled (`offset_scale`, `ablation_directinversion_04`) or kept on
every s-th step only (`interval`), both in either form (the fused form pulls the source part of the
way: z + w (L - z), which is what adding the scaled offset does), and offsets added to the target
too (`target_offset`, `add-target` / `add-source`, offset form only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from inversion.ddim import ddim_trajectory, guided_trajectory, trajectory_cost
from inversion.method import InversionMethod, InversionTask
from ldm.context import Role
from ldm.errors import UsageError
from ldm.model import StableDiffusion
from samplers.ddim import ddim_step
from samplers.inversion import Correction, Inversion, InversionCost
from samplers.noise import cfg, predict_noise
from samplers.settings import Alias, Settings, setting


@dataclass(frozen=True)
class DirectSettings(Settings):
    form: str = setting("fused", "fused: pin the source to the pivot inside the loop (no extra pass); "
                        "offset: the reference's separate offset pass", flag="--direct-form", choices=("fused", "offset"))
    inversion_guidance: float = setting(1.0, "CFG scale of the DDIM inversion over E(\"\") and the source prompt (1: the "
                                        "conditional prediction alone; the reference's guidance ablation)",
                                        flag="--direct-inversion-guidance")
    offset_scale: float = setting(1.0, "pull the source this fraction of the way back to the trajectory at each step "
                                  "(the reference's ablation_directinversion_04 / _08)", flag="--direct-offset-scale",
                                  low=0.0)
    interval: int = setting(1, "correct the source only at every s-th step (the steps i with i mod s = 0; the "
                            "reference's ablation_directinversion_interval_s)", flag="--direct-interval", low=1)
    target_offset: str = setting("none", "also add an offset to the target: its own ('target', recorded with the target "
                                 "prompt) or the source's ('source'); needs --direct-form offset (the reference's "
                                 "add-target / add-source ablations)", flag="--direct-target-offset",
                                 choices=("none", "target", "source"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_offset != "none" and self.form != "offset":
            raise UsageError(f"--direct-target-offset {self.target_offset} needs --direct-form offset (the target's "
                             "offsets come from the separate offset pass)")

    def weights(self, steps: int) -> tuple[float, ...] | None:
        """Per-step weight of the source correction: offset_scale on steps i % interval == 0, else 0."""
        if self.offset_scale == 1.0 and self.interval == 1:
            return None
        return tuple(self.offset_scale if i % self.interval == 0 else 0.0 for i in range(steps))


@torch.no_grad()
def offsets(sd: StableDiffusion, task: InversionTask, trajectory: tuple[Tensor, ...],
            weights: tuple[float, ...] | None = None) -> tuple[list[Tensor], list[Tensor] | None]:
    """D[i] = w_i (L[-2-i] - ddim_step(z_i, CFG(eps(z_i, t_i, [E(""), E(src)])))), z_{i+1} = z_rec + D[i],
    from z_0 = L[-1], for i = 0..steps-1; w_i = 1 (the default) puts z_{i+1} back on the pivot.

    With the target embedding the UNet batch is the edit's own [E(""), E(""), E(src), E(tgt)] (the
    reference's choice): CPU and GPU kernels may round a row differently at another batch position
    or size, and the add-offset form carries any such difference forward, amplified by the guidance.
    The target rows then give the target's offsets too (recorded from a latent of their own, as the
    reference's batch of two does; the add-target ablation adds them to the target), else None.
    """
    schedule = task.schedule
    null, src = task.null.to(task.prompt), task.prompt
    if task.target is None:
        context, feed = torch.cat([null, src]), [0, 0]  # (2, 77, C): uncond row first
    else:
        context, feed = torch.cat([null, null, src, task.target.to(src)]), [0, 1, 0, 1]  # (4, 77, C)
    branches = max(feed) + 1  # one latent per prompt: [src] or [src, tgt]
    rows = torch.tensor(feed)
    z = trajectory[-1].expand(branches, *trajectory[-1].shape[1:]).clone()  # (branches, 4, h, w)
    out: list[Tensor] = []
    for i, t in enumerate(tqdm(schedule.timesteps, desc="DirectInversion offsets", disable=not task.progress, leave=False)):
        x = z.index_select(0, rows.to(z.device)) if branches > 1 else z  # (4 | 1, 4, h, w)
        e_u, e_c = predict_noise(sd, x, t, context).chunk(2)
        z_rec = ddim_step(z, cfg(e_u, e_c, task.guidance), t, schedule)
        d = trajectory[-2 - i] - z_rec
        if weights is not None:
            d = d * weights[i]
        out.append(d)
        z = z_rec + d  # back on the pivot (w = 1), as the reference does
    source = [d[:1] for d in out]
    return source, [d[1:] for d in out] if branches > 1 else None


def direct_trajectory(sd: StableDiffusion, task: InversionTask, settings: "DirectSettings") -> tuple[Tensor, ...]:
    """The pivots: the plain DDIM trajectory (the task's when given), or the guided one."""
    if settings.inversion_guidance == 1.0:
        return ddim_trajectory(sd, task)
    return guided_trajectory(sd, task, settings.inversion_guidance)


def invert_direct(sd: StableDiffusion, task: InversionTask, settings: DirectSettings = DirectSettings()) -> Inversion:
    """The offset form needs task.null to be the very tensor the loop gets: the offsets cancel the
    loop's CFG step exactly only if they were recorded with bit-identical inputs, and guidance 7.5
    amplifies any rounding difference (an E("") from a batch-3 text-encoder call differs by 2e-7
    and ends 1e-3 off)."""
    trajectory = direct_trajectory(sd, task, settings)
    cost = trajectory_cost(task, settings.inversion_guidance)
    weights = settings.weights(task.steps)
    if settings.form == "fused":
        pivots = tuple(trajectory[-2 - i] for i in range(task.steps))
        return Inversion("direct", trajectory, corrections=Correction("pivot", pivots, weights=weights, pinned=weights is None),
                         settings=settings.as_dict(), cost=cost)
    source, target = offsets(sd, task, trajectory, weights)
    rows = task.steps * (2 if task.target is None else 4)
    return Inversion("direct", trajectory, corrections=correction(settings, source, target, weights is None),
                     settings=settings.as_dict(), cost=cost + InversionCost(unet_rows=rows))


def correction(settings: DirectSettings, source: Sequence[Tensor], target: Sequence[Tensor] | None,
               pinned: bool) -> Correction:
    """The offset correction of the source, with the ablations' offsets of the target."""
    others: dict[Role, tuple[Tensor, ...]] = {}
    if settings.target_offset == "source":
        others["target"] = tuple(source)
    elif settings.target_offset == "target" and target is not None:
        others["target"] = tuple(target)
    return Correction("offset", tuple(source), others=others, pinned=pinned)


def restore_direct(task: InversionTask, settings: DirectSettings, state: Mapping[str, Tensor]) -> Inversion:
    """From a file: the fused form needs the trajectory only; the offset form reads `offsets` (and
    `target_offsets` for the add-target ablation)."""
    assert task.trajectory is not None
    if settings.form == "fused":
        pivots = tuple(task.trajectory[-2 - i] for i in range(task.steps))
        weights = settings.weights(task.steps)
        return Inversion("direct", task.trajectory, settings=settings.as_dict(),
                         corrections=Correction("pivot", pivots, weights=weights, pinned=weights is None))
    source = tuple(d for d in state["offsets"])  # (steps, 1, 4, h, w) -> one (1, 4, h, w) per step
    target = tuple(d for d in state["target_offsets"]) if "target_offsets" in state else None
    pinned = settings.weights(task.steps) is None
    return Inversion("direct", task.trajectory, corrections=correction(settings, source, target, pinned),
                     settings=settings.as_dict())


METHOD = InversionMethod(
    name="direct",
    summary="DirectInversion (PnP Inversion): DDIM inversion, the source branch pinned to the trajectory while editing",
    settings=DirectSettings,
    invert=invert_direct,
    aliases=(Alias("directinversion"), Alias("direct-inversion"), Alias("pnp-inversion"),
             # the reference runner's ablation rows (`ablation_directinversion_*+p2p`)
             Alias(r"ablation_directinversion_0(\d)", lambda m: {"offset_scale": int(m[1]) / 10}, pattern=True),
             Alias(r"ablation_directinversion_interval_([1-9]\d*)", lambda m: {"interval": int(m[1])}, pattern=True),
             Alias("ablation_directinversion_add-target", {"target_offset": "target", "form": "offset"}),
             Alias("ablation_directinversion_add-source", {"target_offset": "source", "form": "offset"})),
    state_keys=("offsets",),
    restore=restore_direct,
)
