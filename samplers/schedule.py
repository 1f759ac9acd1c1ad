"""The SD-1.x noise schedule and the DDIM inference grid.

docs/methods/README.md "The schedule and the grid".

alphas_cumprod is the "scaled_linear" schedule of Stable Diffusion (DDPM, Ho et al. 2020, eq. 4
with betas linear in sqrt-space), computed in float32 exactly as diffusers does, so every
downstream number matches the reference to float rounding. The inference grid is diffusers'
"leading" spacing with `steps_offset` (1 for the P2P/MasaCtrl/PnP paths, whose pipelines force it;
0 for EDICT's own scheduler): 50 steps -> 981, 961, ..., 1. Because the reference builds its
scheduler with `set_alpha_to_one=False`, a timestep below 0 reads `ab[0] = 0.99915`, not 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(num_train_timesteps,) alpha-bar of the scaled_linear schedule, float32 as diffusers computes it
    (float64 for EDICT, whose bundled scheduler computes its betas in numpy float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def inference_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, offset: int = 1) -> tuple[int, ...]:
    """Denoising-order grid, "leading" spacing: (arange(steps) * (N // steps))[::-1] + offset."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps // steps
    return tuple(int(i * ratio + offset) for i in reversed(range(steps)))


@dataclass(frozen=True)
class Schedule:
    """The DDIM grid of one sampling run and the alpha-bar table it reads.

    timesteps: denoising order (index i = step of the editing loop); inversion walks it backwards.
    step_ratio: the gap between consecutive grid points, `N // steps` (20 for 50 steps).
    final_alpha_cumprod: alpha-bar used whenever a "previous" timestep is negative.
    """

    steps: int = 50
    offset: int = 1
    set_alpha_to_one: bool = False
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    alphas_cumprod: Tensor = field(default_factory=alphas_cumprod, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.alphas_cumprod.shape != (self.num_train_timesteps,):
            raise ValueError(f"alphas_cumprod must have shape ({self.num_train_timesteps},)")
        if self.offset + (self.steps - 1) * self.step_ratio >= self.num_train_timesteps:
            raise ValueError(f"offset {self.offset} puts the grid past timestep {self.num_train_timesteps - 1}")

    @classmethod
    def edict(cls, steps: int = 50) -> "Schedule":
        """EDICT's grid (980, 960, ..., 0) and alpha-bars: its bundled scheduler uses no steps_offset
        and float64 betas."""
        return cls(steps=steps, offset=0, alphas_cumprod=alphas_cumprod(dtype=torch.float64))

    @property
    def step_ratio(self) -> int:
        return self.num_train_timesteps // self.steps

    @property
    def timesteps(self) -> tuple[int, ...]:
        return inference_timesteps(self.steps, self.num_train_timesteps, self.offset)

    @property
    def final_alpha_cumprod(self) -> Tensor:
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def alpha(self, t: int) -> Tensor:
        """0-d float32 alpha-bar at timestep t; t < 0 reads final_alpha_cumprod (set_alpha_to_one)."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def prev(self, t: int) -> int:
        """The grid point one denoising step after t (may be negative at the last step)."""
        return t - self.step_ratio
