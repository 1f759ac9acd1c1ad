"""The one editing loop (DESIGN.md §6): deterministic DDIM sampling (Song et al. 2021, eq. 12,
eta = 0) with classifier-free guidance over named rows, attention control and inversion
corrections; ALGORITHMS.md part A §6.2 gives the reference's order of operations.

Per step i (timestep t = schedule.timesteps[i]):
  1. controller.begin_step(ctx), ctx = AttnContext(i, t, steps, layout, controller)
  2. one UNet call on all rows of `layout` (rows of role "reference" are fed the inversion
     latent at the same timestep, inversion.trajectory[-1-i]: Plug-and-Play's source branch,
     part B §5.3; their prediction is discarded)
  3. guidance over each stepped role's uncond/cond rows (samplers/guidance.py)
  4. ddim_step of every stepped role
  5. inversion.corrections on its role (DirectInversion: source rows only)
  6. latents = controller.end_step(ctx, latents)   (LocalBlend)
Null-text / negative-prompt inversion: the uncond rows (of every role by default, as the
reference does, part B §1.2) take inversion.null_embeddings[i] instead of their own embedding.

Latents of the stepped roles travel as one tensor (R, 4, h, w), rows in `layout.stepped_roles`
order; that is also what controller.end_step receives and what `denoise` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.context import AttnContext, BatchLayout, Controller, NoControl, Role, Row
from samplers.ddim import ddim_step
from samplers.guidance import ClassifierFree, Guidance, guided_eps
from samplers.schedule import Schedule
from samplers.trajectory import Inversion

Embeddings = Tensor | Mapping[Row, Tensor]


def row_embeddings(layout: BatchLayout, embeddings: Embeddings) -> Tensor:
    """(len(layout), 77, C): one text embedding per row, from a per-row tensor or a Row -> (1|77..) map."""
    if isinstance(embeddings, Tensor):
        if embeddings.shape[0] != len(layout):
            raise ValueError(f"{embeddings.shape[0]} embeddings for the {len(layout)} rows of {layout}")
        return embeddings
    missing = [row for row in layout.rows if row not in embeddings]
    if missing:
        raise ValueError(f"no embedding for rows {missing} of {layout}")
    return torch.cat([embeddings[row].reshape(1, *embeddings[row].shape[-2:]) for row in layout.rows])


@dataclass(frozen=True)
class Denoised:
    """Output of `denoise`.

    latents: (R, 4, h, w) final latent of each stepped role, rows in `roles` order.
    unet_calls: batched UNet calls made (one per step); unet_rows: batch-row evaluations
    (calls x batch size), the unit of ALGORITHMS.md part A §11.
    """

    latents: Tensor
    roles: tuple[Role, ...]
    unet_calls: int
    unet_rows: int

    def role(self, role: Role) -> Tensor:
        """(1, 4, h, w) final latent of one role."""
        i = self.roles.index(role)
        return self.latents[i : i + 1]


@torch.no_grad()
def denoise(
    sd: torch.nn.Module,
    z_T: Tensor | None,
    embeddings: Embeddings,
    layout: BatchLayout,
    controller: Controller | None = None,
    guidance: Guidance | float = 7.5,
    inversion: Inversion | None = None,
    steps: int | None = None,
    *,
    schedule: Schedule | None = None,
    null_roles: Sequence[Role] | None = None,
    progress: bool = True,
    desc: str = "denoise",
) -> Denoised:
    """Run DDIM sampling from z_T over the rows of `layout`; see the module docstring for the step.

    sd: a StableDiffusion (uses sd.unet only). z_T: (1, 4, h, w) shared by every stepped role, or
    (R, 4, h, w) one per stepped role; None starts from inversion.z_T. embeddings: per-row text
    embeddings (tensor aligned with layout.rows, or a Row -> embedding map). guidance: a Guidance or
    a CFG scale. steps: defaults to the inversion's length, else 50; `schedule` overrides both.
    null_roles: roles whose uncond row takes inversion.null_embeddings[i] (default: all roles).
    """
    controller = controller if controller is not None else NoControl()
    guidance = ClassifierFree(float(guidance)) if isinstance(guidance, (int, float)) else guidance
    if schedule is None:
        n = steps if steps is not None else (inversion.steps if inversion is not None else 50)
        schedule = Schedule(steps=n)
    elif steps is not None and steps != schedule.steps:
        raise ValueError(f"steps={steps} disagrees with the schedule's {schedule.steps}")
    roles = layout.stepped_roles
    if not roles:
        raise ValueError(f"layout {layout} has no role to step")
    if inversion is not None and inversion.steps != schedule.steps:
        raise ValueError(f"the inversion has {inversion.steps} steps, the loop {schedule.steps}")
    reference_rows = layout.indices("reference")
    if reference_rows and inversion is None:
        raise ValueError("rows of role 'reference' are fed from an inversion trajectory; pass inversion=")

    if z_T is None:
        if inversion is None:
            raise ValueError("pass z_T or an inversion to start from")
        z_T = inversion.z_T
    # the DDIM arithmetic runs in float32 whatever the UNet's dtype (fp16 steps would drift)
    latents = z_T.float().expand(len(roles), *z_T.shape[1:]).clone() if z_T.shape[0] == 1 else z_T.float().clone()
    if latents.shape[0] != len(roles):
        raise ValueError(f"z_T has {z_T.shape[0]} rows for the {len(roles)} stepped roles {roles}")

    unet_dtype = next(sd.unet.parameters()).dtype
    context = row_embeddings(layout, embeddings).to(latents.device, unet_dtype)
    null_rows = [layout.index(r, "uncond") for r in (null_roles or layout.roles) if layout.has(r, "uncond")]
    # row -> index into `latents` of the stepped role it shows
    feed = [roles.index(row.role) if row.role != "reference" else -1 for row in layout.rows]
    corrections = inversion.corrections if inversion is not None else None
    if corrections is not None and corrections.role not in roles:
        corrections = None  # e.g. a reconstruction of the target only: nothing to correct

    calls = 0
    for i, t in enumerate(tqdm(schedule.timesteps, desc=desc, disable=not progress, leave=False)):
        ctx = AttnContext(step=i, timestep=t, num_steps=schedule.steps, layout=layout, controller=controller)
        controller.begin_step(ctx)
        x = latents[[max(j, 0) for j in feed]]  # (B, 4, h, w), one latent per layout row
        if reference_rows:
            x[reference_rows] = inversion.pivot(i).to(x)  # type: ignore[union-attr]
        c = context
        if inversion is not None and inversion.null_embeddings is not None and null_rows:
            c = context.clone()
            c[null_rows] = inversion.null_embeddings[i].to(c)
        eps = sd.unet(x.to(unet_dtype), torch.tensor(t, device=x.device), c, ctx).float()
        calls += 1
        e = guided_eps(eps, layout, roles, guidance, ctx)  # (R, 4, h, w)
        latents = ddim_step(latents, e, t, schedule)
        if corrections is not None:
            k = roles.index(corrections.role)
            latents[k : k + 1] = corrections.apply(i, latents[k : k + 1])
        latents = controller.end_step(ctx, latents)
    return Denoised(latents=latents, roles=roles, unet_calls=calls, unet_rows=calls * len(layout))
