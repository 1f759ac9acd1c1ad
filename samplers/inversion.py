"""What an inversion hands the editing loop: the `Inversion` record (docs/architecture.md).

An inversion carries the whole inversion trajectory L[0..T] (L[0] = z0, L[-1] = z_T; denoising
step i ideally reads L[-1-i] and produces L[-2-i], docs/methods/README.md ("Notation")) and, depending on
the method, per-step state the loop applies:
- `null_embeddings`: one unconditional embedding per step (null-text's optimised ones, or
  negative-prompt inversion's E(src)), put on the uncond rows of `null_roles` (all roles when None);
- `corrections`: a per-step fix of one role's latent after its DDIM step (DirectInversion);
- `values`: a per-step value input of cross-attention for the conditional rows (StyleDiffusion's
  learned mapping, as an affine modulation of each row's own text embedding);
- `partner`: EDICT's second sequence at z_T (its coupled pair is (trajectory[-1], partner), which
  only EDICT's own sampler, samplers/edict.py, denoises);
- `noise`: per-step noise maps for a stochastic (DDPM, eta > 0) step of every stepped row
  (edit-friendly DDPM inversion), with `start`, the first denoising step the loop runs, and
  `source_guidance`, the CFG scale the source branch must be stepped with to follow the trajectory.
It also records what it cost (`InversionCost`) and its settings, for run.json and inversion files.

`state_tensors()` names the per-step state as stacked tensors, the keys an inversion file holds
besides `trajectory` (evaluation/inversion_file.py, docs/methods/inversion-files.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from ldm.context import BatchLayout, Role, ValueInput


@dataclass(frozen=True)
class Correction:
    """A per-step fix applied to one role's latent right after its DDIM step (before end_step).

    kind "offset": z += values[i] (DirectInversion as the reference runs it, offsets recorded in a
        separate pass, docs/methods/direct-inversion.md).
    kind "pivot": z = values[i] (DirectInversion fused into the loop: adding the offset
        target - z_rec computed in the editing batch itself lands exactly on the pivot L[-2-i]).
    values: one (1, C, h, w) tensor per denoising step.
    weights: for "pivot", a per-step pull z + w_i (values[i] - z) instead of the full pin (w = 1);
        DirectInversion's ablations scale the offsets (w = 0.4) or keep one step in s (w = 0 else).
    others: offsets added to other roles' latents after the same step (DirectInversion's
        add-target / add-source ablations), role -> one (1, C, h, w) tensor per step.
    pinned: the role lands on the inversion trajectory after every step (False for the ablations
        that pull it only part of the way, or onto null-text's reconstruction instead).
    """

    kind: Literal["offset", "pivot"]
    values: tuple[Tensor, ...]
    role: Role = "source"
    weights: tuple[float, ...] | None = None
    others: Mapping[Role, tuple[Tensor, ...]] = field(default_factory=dict)
    pinned: bool = True

    @property
    def replaces_step(self) -> bool:
        """True when the role's latent after every step is values[i], whatever its step computed
        (the full pin): the role's own noise prediction is then never used."""
        return self.kind == "pivot" and self.weights is None

    def apply(self, step: int, latent: Tensor) -> Tensor:
        value = self.values[step].to(latent.device, latent.dtype)
        if self.kind == "offset":
            return latent + value
        w = 1.0 if self.weights is None else self.weights[step]
        if w == 1.0:
            return value.expand_as(latent).clone()
        return latent + w * (value - latent)


@dataclass(frozen=True)
class StepNoise:
    """Noise maps for the stochastic DDIM step (Song et al. 2021, eq. 12 with eta > 0): denoising
    step i adds eta * sigma_i * maps[i - start] to every stepped row, after the step's mean
    (samplers.ddim.ddpm_step). Edit-friendly DDPM inversion extracts the maps so that the source
    branch lands on its noised latents (docs/methods/edit-friendly.md).

    eta: the reference's eta (1: DDPM's variance); maps: one (1, C, h, w) tensor per step run.
    """

    eta: float
    maps: tuple[Tensor, ...]


@dataclass(frozen=True)
class ValueModulation:
    """StyleDiffusion's learned value input of cross-attention, per denoising step.

    At step i the conditional row of a modulated role attends, at every cross-attention layer, with
    V = to_v(c * scale[i] + shift[i]), c the row's own text embedding: the reference's mapping
    network output (docs/methods/stylediffusion.md), stored as what it is, a per-token affine map.
    scale, shift: one (1, 77, C) float32 tensor per step.
    until: role -> the first step at which that role's cond row is no longer modulated (StyleDiffusion's
        editing schedule tau_v keeps the target's own values after a fraction of the run); None
        modulates every cond row at every step (a reconstruction).
    """

    scale: tuple[Tensor, ...]
    shift: tuple[Tensor, ...]
    until: Mapping[Role, int] | None = None

    def __post_init__(self) -> None:
        if len(self.scale) != len(self.shift):
            raise ValueError(f"{len(self.scale)} scales for {len(self.shift)} shifts")

    def modulated(self, role: Role, step: int) -> bool:
        return self.until is None or step < self.until.get(role, 0)

    def value_input(self, step: int, layout: BatchLayout, context: Tensor) -> ValueInput | None:
        """The call's ValueInput: context (B, 77, C) with the modulated cond rows mapped; None if no row is."""
        rows = [i for i, row in enumerate(layout.rows) if row.branch == "cond" and self.modulated(row.role, step)]
        if not rows:
            return None
        scale, shift = self.scale[step].to(context.device), self.shift[step].to(context.device)
        mapped = {i: (context[i : i + 1].float() * scale + shift).to(context.dtype) for i in rows}
        values = torch.cat([mapped.get(i, context[i : i + 1]) for i in range(context.shape[0])])  # (B, 77, C)
        return ValueInput(values)


@dataclass(frozen=True)
class InversionCost:
    """What an inversion spent: UNet batch-row evaluations (a batch of 2 counts 2) forward, and
    how many of them also ran backward; optimisation rounds per step where the method optimises,
    and the wall time of the optimisation in seconds."""

    unet_rows: int = 0
    unet_rows_backward: int = 0
    rounds_per_step: tuple[int, ...] | None = None
    seconds: float | None = None

    def __add__(self, other: "InversionCost") -> "InversionCost":
        rounds = self.rounds_per_step or other.rounds_per_step
        times = [s for s in (self.seconds, other.seconds) if s is not None]
        return InversionCost(self.unet_rows + other.unet_rows, self.unet_rows_backward + other.unet_rows_backward, rounds,
                             sum(times) if times else None)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unet_rows": self.unet_rows, "unet_rows_backward": self.unet_rows_backward}
        if self.rounds_per_step is not None:
            out["rounds_per_step"] = list(self.rounds_per_step)
            out["rounds_total"] = sum(self.rounds_per_step)
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
        return out


@dataclass(frozen=True)
class Inversion:
    """The result of an inversion method (`inversion/`), consumed by `samplers.loop.denoise`.

    method: the registry name of the method that made it ("ddim", "direct", ...).
    trajectory: z_0 .. z_T, each (1, 4, h, w) float32, index = inversion step.
    settings: the method's settings as a dict (run.json, inversion-file metadata).
    losses: the optimisation loss per denoising step and inner iteration (null-text).
    partner: (1, 4, h, w) EDICT's second latent of the pair at z_T, in the method's dtype (float64
        by default; the trajectory then is float64 too).
    """

    method: str
    trajectory: tuple[Tensor, ...]
    null_embeddings: tuple[Tensor, ...] | None = None
    null_roles: tuple[Role, ...] | None = None
    corrections: Correction | None = None
    values: ValueModulation | None = None
    noise: StepNoise | None = None
    start: int = 0
    source_guidance: float | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    cost: InversionCost = InversionCost()
    losses: tuple[tuple[float, ...], ...] | None = None
    partner: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.steps
        if n < 1:
            raise ValueError("an inversion needs a trajectory of at least two latents")
        if not 0 <= self.start < n:
            raise ValueError(f"start step {self.start} outside 0..{n - 1}")
        if self.noise is not None and len(self.noise.maps) != n - self.start:
            raise ValueError(f"{len(self.noise.maps)} noise maps for the {n - self.start} steps run")
        for name, values in (("null_embeddings", self.null_embeddings),
                             ("corrections", None if self.corrections is None else self.corrections.values),
                             ("values", None if self.values is None else self.values.scale)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} steps")

    @property
    def steps(self) -> int:
        return len(self.trajectory) - 1

    @property
    def grid_steps(self) -> int:
        """The number of steps of the grid it was made on: its own length, or, for EDICT, which
        walks part of its grid, the grid's (recorded in its settings as "steps")."""
        return int(self.settings.get("steps", self.steps))

    @property
    def z0(self) -> Tensor:
        return self.trajectory[0]

    @property
    def z_T(self) -> Tensor:
        """(1, 4, h, w) start latent of the editing loop: L[-1], or L[-1-start] when the loop
        starts later (edit-friendly's skip)."""
        return self.trajectory[-1 - self.start]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.trajectory[0].shape)

    @property
    def exact_source(self) -> bool:
        """True when the source branch is pinned to the trajectory at every step (DirectInversion)."""
        c = self.corrections
        return c is not None and c.role == "source" and c.pinned

    @property
    def unpredicted_role(self) -> Role | None:
        """The role whose noise prediction the loop never uses, as the correction replaces its every
        step (fused DirectInversion's source), or None."""
        c = self.corrections
        return c.role if c is not None and c.replaces_step else None

    def pivot(self, step: int) -> Tensor:
        """The latent denoising step `step` should start from: L[-1-step]."""
        return self.trajectory[len(self.trajectory) - 1 - step]

    def state_tensors(self) -> dict[str, Tensor]:
        """The per-step state as stacked float32 tensors, by inversion-file key.

        null_embeddings (steps, 1, 77, C); offsets (steps, 1, 4, h, w) for an offset correction
        (target_offsets for the target's, DirectInversion's add-target / add-source ablations);
        value_scale, value_shift (steps, 1, 77, C) for a value modulation; noise_maps
        (steps - start, 1, 4, h, w) for a stochastic step. A pivot correction is
        the trajectory itself and is not stored again.
        """
        out: dict[str, Tensor] = {}
        if self.null_embeddings is not None:
            out["null_embeddings"] = torch.stack([u.detach().float().cpu() for u in self.null_embeddings])
        if self.corrections is not None and self.corrections.kind == "offset":
            out["offsets"] = torch.stack([d.detach().float().cpu() for d in self.corrections.values])
        if self.corrections is not None and "target" in self.corrections.others:
            out["target_offsets"] = torch.stack([d.detach().float().cpu() for d in self.corrections.others["target"]])
        if self.values is not None:
            out["value_scale"] = torch.stack([a.detach().float().cpu() for a in self.values.scale])
            out["value_shift"] = torch.stack([b.detach().float().cpu() for b in self.values.shift])
        if self.noise is not None:
            out["noise_maps"] = torch.stack([z.detach().float().cpu() for z in self.noise.maps])
        return out
