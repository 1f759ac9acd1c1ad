"""Controllers that observe without editing: the target's cross-attention maps (for the per-word
picture of `invedit edit`), the latents after each step (a denoising trajectory), and the
cross-attention maps of one UNet call, site by site, with autograd (`CallMaps`: the maps the
gradient methods compare, StyleDiffusion's attention loss and pix2pix-zero's guidance).

Both compose with the editing controller in the loop's controller tuple (ldm/context.py): their
`attend` returns None after looking, so the call goes on to the method. `CrossMapRecorder` sums
softmax(Q K^T) of one named row over heads, sites and steps at the cross-attention sites of one
level (16x16 at 512 px, the maps P2P's LocalBlend reads). These are the row's own maps, as its
queries and keys produce them (before any P2P edit of the map).
"""

from __future__ import annotations

from torch import Tensor

from control.base import ControllerBase, SiteRule, attention_probs
from ldm.context import AttnContext, AttnSite, Role, RunInfo


class CrossMapRecorder(ControllerBase):
    reads_uncond_rows = False  # one role's conditional row

    def __init__(self, role: Role = "target", level: int = 2) -> None:
        super().__init__()
        self.role: Role = role
        self.rule = SiteRule(kind="cross", places=("down", "up"), min_level=level, max_level=level)
        self.level = level
        self.sum: Tensor | None = None  # (N, 77)
        self.count = 0
        self.latent_hw: tuple[int, int] | None = None

    def start(self, run: RunInfo) -> None:
        super().start(run)
        self.sum, self.count, self.latent_hw = None, 0, run.latent_hw
        self.row = run.layout.index(self.role, "cond") if run.layout.has(self.role, "cond") else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> None:
        if self.row is not None and self.rule.matches(site):
            maps = attention_probs(q[self.row], k[self.row]).sum(0)  # (N, 77), summed over heads
            self.sum = maps if self.sum is None else self.sum + maps
            self.count += site.heads
        return None

    def mean_maps(self) -> Tensor | None:
        """(77, h, w) mean map per token at the recorded level, or None if nothing was recorded."""
        if self.sum is None or self.latent_hw is None:
            return None
        h, w = self.latent_hw[0] >> self.level, self.latent_hw[1] >> self.level
        return (self.sum / self.count).T.reshape(-1, h, w)  # (N, 77) -> (77, h, w), N = h * w


class TrajectoryRecorder(ControllerBase):
    """Plain attention; keeps the latents the loop hands to end_step, one (R, 4, h, w) per step."""

    def __init__(self) -> None:
        super().__init__()
        self.latents: list[Tensor] = []

    def start(self, run: RunInfo) -> None:
        super().start(run)
        self.latents = []

    def end_step(self, ctx: AttnContext, latents: Tensor) -> Tensor:
        self.latents.append(latents.detach().clone())
        return latents


class CallMaps(ControllerBase):
    """Plain attention; keeps softmax(Q K^T / sqrt(d)) of every cross-attention site `rule` selects,
    for all rows of the call: `maps[site.index]` is (B, heads, N, 77) float32. Under autograd the
    maps carry their graph back to the latents and the value input. `clear()` before each call:
    the first map of a site is kept, so the recomputation a gradient-checkpointed backward pass
    makes (AttnContext.checkpoint) neither replaces it nor keeps a second graph alive."""

    def __init__(self, rule: SiteRule = SiteRule(kind="cross")) -> None:
        super().__init__()
        self.rule = rule
        self.maps: dict[int, Tensor] = {}

    def start(self, run: RunInfo) -> None:
        super().start(run)
        self.maps = {}

    def clear(self) -> None:
        self.maps = {}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> None:
        if site.kind == "cross" and self.rule.matches(site):
            self._touch(site)
            # computed on every call, so a checkpointed recomputation runs the same operations
            self.maps.setdefault(site.index, attention_probs(q, k))
        return None
