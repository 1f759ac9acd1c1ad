"""What an inversion hands the editing loop (DESIGN.md §4).

`Inversion` carries the start latent, the whole DDIM-inversion trajectory L[0..T] (ALGORITHMS.md
part A §0: L[0] = z0, L[-1] = z_T; denoising step i ideally reads L[-1-i] and produces L[-2-i]),
optional per-step unconditional embeddings (null-text's optimised ones, or negative-prompt
inversion's copies of E(src)) and an optional per-step latent `Correction` (DirectInversion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from ldm.context import Role


@dataclass(frozen=True)
class Correction:
    """A per-step fix applied to one role's latent right after its DDIM step (before end_step).

    kind "offset": z += values[i] (DirectInversion as the reference runs it, offsets recorded in a
        separate pass, part A §6.1-§6.2).
    kind "pivot": z = values[i] (DirectInversion fused into the loop, §6.3: adding the offset
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
class Inversion:
    """Result of `invert_<method>(sd, z0, c_src, cfg)`.

    z_T: (1, 4, h, w) start latent of the editing loop (= trajectory[-1]).
    trajectory: z_0 .. z_T, each (1, 4, h, w), index = inversion step.
    null_embeddings: one (1, 77, C) per denoising step, replacing the embedding of the uncond rows.
    corrections: DirectInversion's per-step fix of the source latent.
    losses: null-text's loss per denoising step and inner iteration (for tests and run.json).
    unet_rows: UNet batch-row evaluations the inversion spent (a batch of 2 counts 2).
    method: the inversion's name as the CLI spells it ("ddim", "direct", ...).
    """

    z_T: Tensor
    trajectory: list[Tensor]
    null_embeddings: list[Tensor] | None = None
    corrections: Correction | None = None
    losses: list[list[float]] | None = None
    unet_rows: int = 0
    method: str = ""

    @property
    def steps(self) -> int:
        return len(self.trajectory) - 1

    def pivot(self, step: int) -> Tensor:
        """The latent denoising step `step` should start from: L[-1-step]."""
        return self.trajectory[len(self.trajectory) - 1 - step]
