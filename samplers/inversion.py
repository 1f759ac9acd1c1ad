"""What an inversion hands the editing loop: the `Inversion` record (docs/architecture.md).

An inversion carries the whole inversion trajectory L[0..T] (L[0] = z0, L[-1] = z_T; denoising
step i ideally reads L[-1-i] and produces L[-2-i], docs/methods.md "Notation") and, depending on
the method, per-step state the loop applies:
- `null_embeddings`: one unconditional embedding per step (null-text's optimised ones, or
  negative-prompt inversion's E(src)), put on the uncond rows of `null_roles` (all roles when None);
- `corrections`: a per-step fix of one role's latent after its DDIM step (DirectInversion).
It also records what it cost (`InversionCost`) and its settings, for run.json and inversion files.

`state_tensors()` names the per-step state as stacked tensors, the keys an inversion file holds
besides `trajectory` (evaluation/inversion_file.py, docs/methods.md "Inversion files").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from ldm.context import Role


@dataclass(frozen=True)
class Correction:
    """A per-step fix applied to one role's latent right after its DDIM step (before end_step).

    kind "offset": z += values[i] (DirectInversion as the reference runs it, offsets recorded in a
        separate pass, docs/methods.md "DirectInversion").
    kind "pivot": z = values[i] (DirectInversion fused into the loop: adding the offset
        target - z_rec computed in the editing batch itself lands exactly on the pivot L[-2-i]).
    values: one (1, C, h, w) tensor per denoising step.
    """

    kind: Literal["offset", "pivot"]
    values: tuple[Tensor, ...]
    role: Role = "source"

    def apply(self, step: int, latent: Tensor) -> Tensor:
        value = self.values[step].to(latent.device, latent.dtype)
        if self.kind == "offset":
            return latent + value
        return value.expand_as(latent).clone()


@dataclass(frozen=True)
class InversionCost:
    """What an inversion spent: UNet batch-row evaluations (a batch of 2 counts 2) forward, and
    how many of them also ran backward; optimisation rounds per step where the method optimises."""

    unet_rows: int = 0
    unet_rows_backward: int = 0
    rounds_per_step: tuple[int, ...] | None = None

    def __add__(self, other: "InversionCost") -> "InversionCost":
        rounds = self.rounds_per_step or other.rounds_per_step
        return InversionCost(self.unet_rows + other.unet_rows, self.unet_rows_backward + other.unet_rows_backward, rounds)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unet_rows": self.unet_rows, "unet_rows_backward": self.unet_rows_backward}
        if self.rounds_per_step is not None:
            out["rounds_per_step"] = list(self.rounds_per_step)
            out["rounds_total"] = sum(self.rounds_per_step)
        return out


@dataclass(frozen=True)
class Inversion:
    """The result of an inversion method (`inversion/`), consumed by `samplers.loop.denoise`.

    method: the registry name of the method that made it ("ddim", "direct", ...).
    trajectory: z_0 .. z_T, each (1, 4, h, w) float32, index = inversion step.
    settings: the method's settings as a dict (run.json, inversion-file metadata).
    losses: the optimisation loss per denoising step and inner iteration (null-text).
    """

    method: str
    trajectory: tuple[Tensor, ...]
    null_embeddings: tuple[Tensor, ...] | None = None
    null_roles: tuple[Role, ...] | None = None
    corrections: Correction | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    cost: InversionCost = InversionCost()
    losses: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        n = self.steps
        if n < 1:
            raise ValueError("an inversion needs a trajectory of at least two latents")
        for name, values in (("null_embeddings", self.null_embeddings),
                             ("corrections", None if self.corrections is None else self.corrections.values)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} steps")

    @property
    def steps(self) -> int:
        return len(self.trajectory) - 1

    @property
    def z0(self) -> Tensor:
        return self.trajectory[0]

    @property
    def z_T(self) -> Tensor:
        """(1, 4, h, w) start latent of the editing loop."""
        return self.trajectory[-1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.trajectory[0].shape)

    @property
    def exact_source(self) -> bool:
        """True when the source branch is pinned to the trajectory at every step (DirectInversion)."""
        return self.corrections is not None and self.corrections.role == "source"

    def pivot(self, step: int) -> Tensor:
        """The latent denoising step `step` should start from: L[-1-step]."""
        return self.trajectory[len(self.trajectory) - 1 - step]

    def state_tensors(self) -> dict[str, Tensor]:
        """The per-step state as stacked float32 tensors, by inversion-file key.

        null_embeddings (steps, 1, 77, C); offsets (steps, 1, 4, h, w) for an offset correction.
        A pivot correction is the trajectory itself and is not stored again.
        """
        out: dict[str, Tensor] = {}
        if self.null_embeddings is not None:
            out["null_embeddings"] = torch.stack([u.detach().float().cpu() for u in self.null_embeddings])
        if self.corrections is not None and self.corrections.kind == "offset":
            out["offsets"] = torch.stack([d.detach().float().cpu() for d in self.corrections.values])
        return out
