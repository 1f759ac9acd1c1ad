"""One inversion interface: what every inversion method receives, and how a method declares itself.

Every method is a module of this package exporting `METHOD = InversionMethod(...)` and one function
`invert_<name>(sd, task, settings) -> Inversion`, with the same three arguments for every method:
- `sd`: the StableDiffusion model;
- `task`: an `InversionTask`, the inputs every method may read (the VAE latent, the prompt and
  null embeddings as the editing loop will use them, the grid, the editing loop's guidance scale,
  a DDIM trajectory already computed, the pixels, the seed);
- `settings`: the method's own frozen `Settings` (samplers/settings.py), defaults = the reference's.
The registry (evaluation/registry.py) lists the METHODs; the command line, `--help`, inversion
files and the benchmark runner are generated from these declarations (docs/architecture.md
"Adding a method").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from torch import Tensor

from ldm.model import StableDiffusion
from samplers.inversion import Inversion
from samplers.loop import Denoised
from samplers.schedule import Schedule
from samplers.settings import Alias, Settings


@dataclass(frozen=True)
class InversionTask:
    """The inputs of every inversion method.

    z0: (1, 4, h, w) float32 VAE latent (posterior mean x scale factor).
    prompt: (1, 77, C) embedding the image is inverted with (the source prompt, or "" for MasaCtrl).
    null: (1, 77, C) E(""), the very tensor the editing loop puts on its uncond rows (methods that
        record against the loop's CFG step need bit-identical inputs).
    schedule: the editing loop's DDIM grid; guidance: the editing loop's CFG scale.
    target: (1, 77, C) E(target) when known: DirectInversion's offset form records in the edit's own
        batch, as the reference does.
    trajectory: z0 .. z_T of a plain DDIM inversion of z0 under `prompt`, when already computed
        (the benchmark runner shares it between methods; an inversion file may supply it).
    image: (1, 3, H, W) pixels in [-1, 1], for methods that read them.
    seed: for stochastic methods, seeded before the method's random draws.
    """

    z0: Tensor
    prompt: Tensor
    null: Tensor
    schedule: Schedule
    guidance: float = 7.5
    target: Tensor | None = None
    trajectory: tuple[Tensor, ...] | None = None
    image: Tensor | None = None
    seed: int = 1234
    progress: bool = False

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def with_trajectory(self, trajectory: tuple[Tensor, ...]) -> "InversionTask":
        return replace(self, trajectory=tuple(trajectory))


InvertFn = Callable[[StableDiffusion, InversionTask, Any], Inversion]
SamplerFn = Callable[..., Denoised]  # samplers.loop.denoise's signature
RestoreFn = Callable[[InversionTask, Any, Mapping[str, Tensor]], Inversion]


@dataclass(frozen=True)
class InversionMethod:
    """An inversion method as the registry, the command line and inversion files see it.

    name: the command-line name (`--inversion NAME`); aliases: the reference's index names.
    summary: one line for `--help` and `invedit methods`.
    settings: the method's Settings class (its defaults are the reference's).
    invert: `invert_<name>(sd, task, settings) -> Inversion`.
    ddim_trajectory: the method's trajectory is the plain DDIM inversion (so a file holding only a
        DDIM trajectory, or the trajectory shared by the runner, is a valid start for it).
    state_keys: per-step tensors an inversion file must hold beyond `trajectory` for `restore`
        (Inversion.state_tensors() names them); without them the method is re-run on the file's
        trajectory when `ddim_trajectory` allows it.
    restore: rebuild the Inversion from a file's trajectory (in `task`) and state tensors.
    sampler: for an inversion only its own sampler can denoise (EDICT's coupled pair), that sampler,
        with `samplers.loop.denoise`'s arguments; `reconstruct` and `edit` use it instead of the loop.
    edits: the editing methods it works with (None: any).
    """

    name: str
    summary: str
    settings: type[Settings]
    invert: InvertFn
    aliases: tuple[Alias, ...] = ()
    ddim_trajectory: bool = True
    state_keys: tuple[str, ...] = ()
    restore: RestoreFn | None = None
    sampler: SamplerFn | None = None
    edits: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.state_keys and self.restore is None:
            raise ValueError(f"inversion {self.name!r} declares state keys {self.state_keys} but no restore")
