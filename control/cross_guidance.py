"""pix2pix-zero's two step hooks (Parmar et al., "Zero-shot Image-to-Image Translation", SIGGRAPH
2023; docs/methods/pix2pix-zero.md), run by the editing loop before each UNet call
(samplers.loop.StepHook):

- `EditDirection`: the edited branch's conditional text embedding is c + Δ, Δ = mean E(target
  sentences) - mean E(source sentences), every token position (the paper's edit direction);
- `CrossAttentionGuidance`: one gradient step on the edited branch's latent that pulls its
  cross-attention maps toward the reconstruction's at the same step (the paper's cross-attention guidance):

      x_t <- x_t - λ ∇_x sum over every cross-attention site of ||M_edit(x_t) - M_rec||^2

  M_rec comes from the reconstruction latent of this step (`StepState.pivot`, which the plan's
  `prepare` makes the reconstruction) under the caption, recomputed here rather than stored for
  every step (the reference keeps all 50 steps' maps, 13 GB at 512 px). As the reference
  (pix2pixzero/pix2pix-zero `edit_pipeline.py`, unchanged in cure-lab/PnPInversion): the loss of a
  site is the squared difference summed over pixels and tokens, averaged over the heads of both
  CFG rows; λ is SGD's learning rate (0.1); each CFG row is moved by the gradient of its own maps,
  the UNet call then reads each row at its own moved latent, and the unconditional row's moved
  latent is the one the DDIM step continues from.

Gradients are taken with respect to the latent only (torch.autograd.grad, the UNet frozen), one CFG
row at a time (backward at batch 1), optionally with gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor

from control.record import CallMaps
from ldm.context import AttnContext, BatchLayout, Role, Row, RunInfo
from ldm.model import StableDiffusion
from samplers.loop import StepState
from samplers.noise import frozen_weights, predict_noise

EMBED_BATCH = 64  # sentences per text-encoder call (files may hold hundreds)


def sentence_direction(sd: StableDiffusion, source: Sequence[str], target: Sequence[str]) -> Tensor:
    """Δ = mean E(target sentences) - mean E(source sentences), (1, 77, C) float32. Each distinct
    sentence is embedded once, so identical sides give exactly zero."""
    unique = list(dict.fromkeys([*source, *target]))
    rows = torch.cat([sd.embed(unique[i : i + EMBED_BATCH]).float() for i in range(0, len(unique), EMBED_BATCH)])
    index = {s: i for i, s in enumerate(unique)}

    def mean(sentences: Sequence[str]) -> Tensor:
        return rows[[index[s] for s in sentences]].mean(dim=0)  # (77, C)

    return (mean(target) - mean(source)).unsqueeze(0)


class EditDirection:
    """Adds the sentence direction Δ to one row's text embedding at every step; Δ is computed at
    the first step of a run (it needs the text encoder)."""

    def __init__(self, source: Sequence[str], target: Sequence[str], row: Row = Row("target", "cond")) -> None:
        self.source, self.target, self.row = tuple(source), tuple(target), row
        self.direction: Tensor | None = None

    def start(self, run: RunInfo) -> None:
        self.direction = None
        self.index = run.layout.index(self.row.role, self.row.branch)

    def before_unet(self, sd: StableDiffusion, state: StepState) -> StepState:
        if self.direction is None:
            with torch.no_grad():
                self.direction = sentence_direction(sd, self.source, self.target)
        context = state.context.clone()
        k = self.index
        context[k : k + 1] = (context[k : k + 1].float() + self.direction.to(context.device)).to(context.dtype)
        return replace(state, context=context)


def maps_loss(maps: dict[int, Tensor], reference: dict[int, Tensor], rows: int) -> Tensor:
    """sum over sites of ||M - M_rec||^2 summed over pixels and tokens, divided by rows x heads
    (the reference's per-site mean over the heads of its `rows`-row CFG batch). maps: (1, heads, N, 77)."""
    total = torch.zeros((), device=next(iter(maps.values())).device)
    for s, ref in reference.items():
        m = maps[s][0]
        total = total + (m - ref).pow(2).sum() / (rows * m.shape[0])
    return total


class CrossAttentionGuidance:
    """The gradient step on `role`'s latent; `amount` = λ. `losses[i]`: the map loss at step i,
    before the step (both rows); `unet_rows`: the batch rows of its own UNet calls; `touched`: the
    sites whose maps steer it (ControllerBase's report, for `invedit edit`)."""

    def __init__(self, amount: float, role: Role = "target", checkpoint: bool = False) -> None:
        self.amount = amount
        self.role: Role = role
        self.checkpoint = checkpoint
        self.losses: list[float] = []
        self.unet_rows = 0
        self.touched: set[tuple[str, int, str]] = set()

    def start(self, run: RunInfo) -> None:
        self.losses, self.unet_rows = [], 0
        self.touched = set()
        layout = run.layout
        self.rows = (layout.index(self.role, "uncond"), layout.index(self.role, "cond"))
        self.latent = layout.latent_index(self.role)

    def before_unet(self, sd: StableDiffusion, state: StepState) -> StepState:
        if state.pivot is None:
            raise ValueError("cross-attention guidance compares with the reconstruction latent: run it with an inversion")
        recorder = CallMaps()
        x = state.latents[self.latent : self.latent + 1]
        uncond, cond = self.rows

        def call(z: Tensor, row: int) -> dict[int, Tensor]:
            recorder.clear()
            ctx = AttnContext(state.step, state.timestep, state.num_steps, _one(state.layout, row), (recorder,),
                              checkpoint=self.checkpoint)
            predict_noise(sd, z, state.timestep, state.context[row : row + 1], ctx)
            self.unet_rows += 1
            self.touched |= recorder.touched
            return recorder.maps

        with frozen_weights(sd):
            with torch.no_grad():
                # both reconstruction rows read the caption, which is the edited branch's negative prompt
                reference = {s: m[0] for s, m in call(state.pivot, uncond).items()}
            moved, total = {}, 0.0
            for row in (uncond, cond):
                z = x.detach().clone().requires_grad_(True)
                loss = maps_loss(call(z, row), reference, rows=2)
                (grad,) = torch.autograd.grad(loss, z)
                moved[row] = z.detach() - self.amount * grad  # SGD, lr = amount
                total += loss.item()
        self.losses.append(total)
        latents = state.latents.clone()
        latents[self.latent : self.latent + 1] = moved[uncond]  # the reference steps the uncond row's latent
        inputs = _row_inputs(state.layout, latents, state.pivot)
        for row, z in moved.items():
            inputs[row : row + 1] = z
        return replace(state, latents=latents, inputs=inputs)


def _one(layout: BatchLayout, row: int) -> BatchLayout:
    return BatchLayout((layout.rows[row],))


def _row_inputs(layout: BatchLayout, latents: Tensor, pivot: Tensor) -> Tensor:
    """(B, 4, h, w): each layout row's role latent (reference rows: the pivot, as the loop feeds them)."""
    return torch.cat([pivot if r.role == "reference" else latents[layout.latent_index(r.role)][None] for r in layout.rows])
