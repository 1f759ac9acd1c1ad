"""The one editing loop: deterministic DDIM sampling (Song et al. 2021, eq. 12, eta = 0) with
classifier-free guidance over named rows, attention control and inversion corrections
(docs/architecture.md "One edit, step by step"; docs/methods/ for each method's order of operations).

Per run: every controller and hook is started (`start(run)`), so state from an earlier run is gone.
Per step i (timestep t = schedule.timesteps[i]):
  1. controller.begin_step(ctx), ctx = AttnContext(i, t, steps, layout, controllers)
  2. hooks (`StepHook.before_unet`), with autograd on: they may take gradients with respect to the
     latents or the text embeddings (and run UNet calls of their own) and return new ones
  3. one UNet call on all rows of `layout` (rows of role "reference" are fed the inversion latent
     at the same timestep, inversion.pivot(i): Plug-and-Play's source branch; their prediction is
     discarded), without autograd; with the inversion's value modulation (StyleDiffusion) on the
     cond rows it names
  4. guidance over each stepped role's uncond/cond rows (samplers/guidance.py)
  5. ddim_step of every stepped role, or, when the inversion supplies noise maps (edit-friendly
     DDPM inversion), the stochastic step with the step's map added to every stepped row;
     then a guidance that pulls back (ProxEdit's inversion guidance) pulls toward inversion.pivot(i+1)
  6. inversion.corrections on its role (DirectInversion: source rows only; its ablations may
     add offsets to other roles too)
  7. latents = controller.end_step(ctx, latents) for each controller in turn (LocalBlend)
An inversion with `start` > 0 begins at grid step `start` from its latent there; controllers, hooks
and `ctx.step` count the steps run from 0 (the reference's controllers count the calls they see),
while `num_steps` stays the grid's length. An inversion's `source_guidance` fixes the source role's
CFG scale (samplers.guidance.RoleScales).
Null-text / negative-prompt inversion: the uncond rows (of every role unless the inversion names
`null_roles`, as the reference does) take inversion.null_embeddings[i] instead of their own.

Latents of the stepped roles travel as one tensor (R, 4, h, w), rows in `layout.stepped_roles`
order; that is also what controller.end_step receives and what `denoise` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.context import AttnContext, BatchLayout, Controller, Role, Row, RunInfo
from ldm.model import StableDiffusion
from samplers.ddim import ddim_step, ddpm_step
from samplers.guidance import ClassifierFree, GuidedRows, Guidance, PullsBack, RoleScales
from samplers.inversion import Inversion
from samplers.noise import predict_noise
from samplers.schedule import Schedule

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
class StepState:
    """What a step hook sees and may replace before the step's UNet call.

    latents: (R, 4, h, w) float32, one per stepped role (layout.stepped_roles order).
    context: (B, 77, C) the text embedding of every layout row, in the UNet's dtype.
    pivot: (1, 4, h, w) the inversion latent of this step, inversion.pivot(step) (what reference
        rows are fed), when the loop has an inversion; a hook may compare against it.
    inputs: (B, 4, h, w) the latent each layout row is fed in this step's UNet call, when a hook
        moved the rows of one role apart (pix2pix-zero's reference steps each CFG row by its own
        gradient); None feeds every row its role's latent.
    """

    step: int
    timestep: int
    num_steps: int
    layout: BatchLayout
    latents: Tensor
    context: Tensor
    pivot: Tensor | None = None
    inputs: Tensor | None = None


class StepHook(Protocol):
    """A per-step extension of the loop that may take gradients (pix2pix-zero's cross-attention
    guidance, a gradient step on the latent). `before_unet` runs with autograd enabled; whatever it
    returns is detached before the loop goes on without autograd. A hook that runs UNet calls of
    its own may count their batch rows in an attribute `unet_rows` (reset by `start`), which the
    editing API adds to the edit's cost."""

    def start(self, run: RunInfo) -> None: ...

    def before_unet(self, sd: StableDiffusion, state: StepState) -> StepState: ...


@dataclass(frozen=True)
class Denoised:
    """Output of `denoise`.

    latents: (R, 4, h, w) final latent of each stepped role, rows in `roles` order.
    unet_calls: batched UNet calls made by the loop itself (one per step, hooks not counted);
    unet_rows: batch-row evaluations (calls x batch size), the unit of docs/performance.md.
    """

    latents: Tensor
    roles: tuple[Role, ...]
    unet_calls: int
    unet_rows: int

    def role(self, role: Role) -> Tensor:
        """(1, 4, h, w) final latent of one role."""
        i = self.roles.index(role)
        return self.latents[i : i + 1]


def _schedule(inversion: Inversion | None, steps: int | None, schedule: Schedule | None) -> Schedule:
    if schedule is None:
        n = steps if steps is not None else (inversion.steps if inversion is not None else 50)
        schedule = Schedule(steps=n)
    elif steps is not None and steps != schedule.steps:
        raise ValueError(f"steps={steps} disagrees with the schedule's {schedule.steps}")
    if inversion is not None and inversion.steps != schedule.steps:
        raise ValueError(f"the inversion has {inversion.steps} steps, the loop {schedule.steps}")
    return schedule


@torch.no_grad()
def denoise(
    sd: StableDiffusion,
    layout: BatchLayout,
    embeddings: Embeddings,
    *,
    inversion: Inversion | None = None,
    z_T: Tensor | None = None,
    controllers: Sequence[Controller] = (),
    guidance: Guidance | float = 7.5,
    steps: int | None = None,
    schedule: Schedule | None = None,
    hooks: Sequence[StepHook] = (),
    progress: bool = False,
    desc: str = "denoise",
) -> Denoised:
    """Run DDIM sampling over the rows of `layout`; see the module docstring for one step.

    embeddings: per-row text embeddings (tensor aligned with layout.rows, or a Row -> embedding map).
    inversion: supplies the start latent z_T, the reference rows' latents, per-step null embeddings
        and corrections. z_T: (1, 4, h, w) shared by every stepped role, or (R, 4, h, w) one per
        stepped role; overrides the inversion's. guidance: a Guidance or a CFG scale.
    steps: defaults to the inversion's length, else 50; `schedule` overrides both.
    """
    guidance = ClassifierFree(float(guidance)) if isinstance(guidance, (int, float)) else guidance
    if inversion is not None and inversion.source_guidance is not None and "source" in layout.stepped_roles:
        guidance = RoleScales(guidance, {"source": inversion.source_guidance})
    pulls = isinstance(guidance, PullsBack) and inversion is not None
    schedule = _schedule(inversion, steps, schedule)
    roles = layout.stepped_roles
    if not roles:
        raise ValueError(f"layout {layout} has no role to step")
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
    device = latents.device

    context = row_embeddings(layout, embeddings).to(device, sd.dtype)
    # everything that depends on the layout only, computed once: which latent feeds each row,
    # which rows take the null embeddings, which rows each role's guidance reads
    feed = torch.tensor([roles.index(r.role) if r.role != "reference" else 0 for r in layout.rows], device=device)
    null_roles = inversion.null_roles if inversion is not None and inversion.null_roles is not None else layout.roles
    null_rows = [layout.index(r, "uncond") for r in null_roles if layout.has(r, "uncond")]
    use_nulls = inversion is not None and inversion.null_embeddings is not None and bool(null_rows)
    rows = GuidedRows.of(layout, device)
    if pulls and rows.guided != roles:
        raise ValueError(f"{type(guidance).__name__} pulls back every stepped role; {layout} has unguided ones")
    corrections = inversion.corrections if inversion is not None else None
    if corrections is not None and corrections.role not in roles:
        corrections = None  # e.g. Plug-and-Play: the source is a reference row, fed the trajectory itself
    correct_row = roles.index(corrections.role) if corrections is not None else -1

    controllers = tuple(controllers)
    run = RunInfo(layout=layout, num_steps=schedule.steps, device=device, latent_hw=tuple(latents.shape[-2:]))
    for part in (*controllers, *hooks):
        part.start(run)

    start = inversion.start if inversion is not None else 0
    noise = inversion.noise if inversion is not None else None
    calls = 0
    for i, t in enumerate(tqdm(schedule.timesteps[start:], desc=desc, disable=not progress, leave=False), start):
        ran = i - start  # what controllers and hooks see as the step
        ctx = AttnContext(step=ran, timestep=t, num_steps=schedule.steps, layout=layout, controllers=controllers)
        for controller in controllers:
            controller.begin_step(ctx)
        c = context
        if use_nulls:
            c = context.clone()
            c[null_rows] = inversion.null_embeddings[i].to(c)  # type: ignore[union-attr]
        inputs = None
        if hooks:
            pivot = inversion.pivot(i) if inversion is not None else None
            state = StepState(ran, t, schedule.steps, layout, latents, c, pivot)
            with torch.enable_grad():
                for hook in hooks:
                    state = hook.before_unet(sd, state)
            latents, c = state.latents.detach(), state.context.detach()
            inputs = None if state.inputs is None else state.inputs.detach().float()
        x = latents.index_select(0, feed) if inputs is None else inputs.clone()  # (B, 4, h, w), one latent per row
        if reference_rows:
            x[reference_rows] = inversion.pivot(i).to(x)  # type: ignore[union-attr]
        if inversion is not None and inversion.values is not None:
            ctx = replace(ctx, values=inversion.values.value_input(i, layout, c))
        eps = predict_noise(sd, x, t, c, ctx)
        calls += 1
        e = rows.eps(eps, guidance, ctx)  # (R, 4, h, w)
        if noise is None:
            latents = ddim_step(latents, e, t, schedule)
        else:  # the same map on every stepped row
            latents = ddpm_step(latents, e, t, schedule, noise.eta, noise.maps[ran])
        if pulls:
            u, c_ = rows.split(eps)
            latents = guidance.pull_back(u, c_, ctx, latents, inversion.pivot(i + 1))  # type: ignore[union-attr]
        if corrections is not None:
            k = correct_row
            latents[k : k + 1] = corrections.apply(i, latents[k : k + 1])
            for role, offsets in corrections.others.items():  # DirectInversion's add-target ablations
                if role in roles:
                    r = roles.index(role)
                    latents[r : r + 1] += offsets[i].to(latents)
        for controller in controllers:
            latents = controller.end_step(ctx, latents)
    return Denoised(latents=latents, roles=roles, unet_calls=calls, unet_rows=calls * len(layout))
