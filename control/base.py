"""What the editing controllers share: step windows, site selection, row helpers, cross-attention maps.

docs/architecture.md "The controller contract": a controller decides per `AttnSite` (static) and per `ctx.step` which rows' Q/K/V
feed which output row. Self-attention rules go through `fused_attention_rows` and never build a
probability map; `attention_probs` is only for cross-attention (N x 77), the maps P2P edits and
LocalBlend reads. Rules the references state at 512 px ("<= 32x32", "16x16") are expressed by
level (0 = full latent resolution): at 512 px they select the same layers, at other sizes they
follow the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.context import AttnContext, AttnSite, Place, ResSite, RunInfo


@dataclass(frozen=True)
class StepWindow:
    """Denoising steps start <= i < end."""

    start: int
    end: int

    @classmethod
    def of(cls, fraction: float | tuple[float, float], num_steps: int) -> "StepWindow":
        """The references' int(num_steps * f) bounds; a float f means (0, f)."""
        lo, hi = (0.0, fraction) if isinstance(fraction, (int, float)) else fraction
        return cls(int(num_steps * lo), int(num_steps * hi))

    def __contains__(self, step: int) -> bool:
        return self.start <= step < self.end


def parse_window(text: str) -> float | tuple[float, float]:
    """A step window from the command line: "END" (from the start) or "START:END", fractions of the run."""
    bounds = [float(v) for v in text.split(":")]
    if len(bounds) == 1:
        return bounds[0]
    if len(bounds) == 2:
        return bounds[0], bounds[1]
    raise ValueError("expected END or START:END, fractions of the run, e.g. 0.4 or 0.2:0.6")


@dataclass(frozen=True)
class SiteRule:
    """Which attention sites a rule applies to, by static site data only."""

    kind: str | None = None  # "self", "cross" or None for both
    places: tuple[Place, ...] = ("down", "mid", "up")
    min_level: int = 0
    max_level: int | None = None
    min_index: int = 0

    def matches(self, site: AttnSite) -> bool:
        return (
            (self.kind is None or site.kind == self.kind)
            and site.place in self.places
            and site.level >= self.min_level
            and (self.max_level is None or site.level <= self.max_level)
            and site.index >= self.min_index
        )


def attention_probs(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) in float32: (..., N, d), (..., M, d) -> (..., N, M). Cross maps only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q.float() @ k.float().transpose(-1, -2) * scale).softmax(dim=-1)


def replace_rows(out: Tensor, new: dict[int, Tensor]) -> Tensor:
    """`out` with the given batch rows swapped for new values, built out of place (autograd-safe)."""
    return torch.stack([new[i].to(out.dtype) if i in new else out[i] for i in range(out.shape[0])])


class ControllerBase:
    """The no-op default of every Controller method (ldm/context.py), plus the record of which
    sites a controller edited.

    `attend` returns None (leave the call to the next controller, or plain attention), `features`
    and `end_step` return their input. `touched` is a report for users and tests (the references'
    commonest silent failure is an edit that changes nothing); decisions never depend on it.
    Subclasses that keep state clear it in `start`, calling `super().start(run)`.

    `reads_uncond_rows`: whether the controller reads or edits any unconditional row. A controller
    that only touches conditional rows says False, which lets the editing API drop an uncond row
    whose prediction nothing uses (evaluation.api.lean_layout); the safe default is True.
    """

    reads_uncond_rows: bool = True

    def __init__(self) -> None:
        self.touched: set[tuple[str, int, str]] = set()

    def start(self, run: RunInfo) -> None:
        self.touched.clear()

    def begin_step(self, ctx: AttnContext) -> None:
        pass

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor | None:
        return None

    def features(self, h: Tensor, site: ResSite, ctx: AttnContext) -> Tensor:
        return h

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        return latents

    def _touch(self, site: AttnSite | ResSite) -> None:
        kind = site.kind if isinstance(site, AttnSite) else "res"
        self.touched.add((kind, site.index, site.name))

    @property
    def sites_touched(self) -> int:
        return len(self.touched)
