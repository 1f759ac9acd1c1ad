"""Controllers that observe without editing: the target's cross-attention maps (for the per-word
picture of `invedit edit`) and the latents after each step (a denoising trajectory).

`CrossMapRecorder` wraps the controller that does the editing and hands every call on to it; at
the cross-attention sites of one level (16x16 at 512 px, the maps P2P's LocalBlend reads) it also
sums softmax(Q K^T) of one named row over heads, sites and steps. These are the row's own maps, as
its queries and keys produce them (before any P2P edit of the map).
"""

from __future__ import annotations

from torch import Tensor

from control.base import ControllerBase, SiteRule, attention_probs
from ldm.context import AttnContext, AttnSite, Controller, ResSite, Role


class CrossMapRecorder:
    def __init__(self, inner: Controller, role: Role = "target", level: int = 2) -> None:
        self.inner = inner
        self.role: Role = role
        self.rule = SiteRule(kind="cross", places=("down", "up"), min_level=level, max_level=level)
        self.level = level
        self.sum: Tensor | None = None  # (N, 77)
        self.count = 0

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor:
        if self.rule.matches(site) and ctx.layout.has(self.role, "cond"):
            row = ctx.layout.index(self.role, "cond")
            maps = attention_probs(q[row], k[row]).sum(0)  # (N, 77), summed over heads
            self.sum = maps if self.sum is None else self.sum + maps
            self.count += site.heads
        return self.inner.attend(q, k, v, site, ctx)

    def features(self, h: Tensor, site: ResSite, ctx: AttnContext) -> Tensor:
        return self.inner.features(h, site, ctx)

    def begin_step(self, ctx: AttnContext) -> None:
        self.inner.begin_step(ctx)

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        return self.inner.end_step(ctx, latents)

    def reset(self) -> None:
        self.inner.reset()
        self.sum, self.count = None, 0

    def mean_maps(self, latent_hw: tuple[int, int]) -> Tensor | None:
        """(77, h, w) mean map per token at the recorded level, or None if nothing was recorded."""
        if self.sum is None:
            return None
        h, w = latent_hw[0] >> self.level, latent_hw[1] >> self.level
        return (self.sum / self.count).T.reshape(-1, h, w)  # (N, 77) -> (77, h, w), N = h * w


class TrajectoryRecorder(ControllerBase):
    """Plain attention; keeps the latents the loop hands to end_step, one (R, 4, h, w) per step."""

    def __init__(self) -> None:
        super().__init__()
        self.latents: list[Tensor] = []

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        self.latents.append(latents.detach().clone())
        return latents

    def reset(self) -> None:
        super().reset()
        self.latents.clear()
