"""LocalBlend: keep the source latent outside the region the edited words attend to.

docs/methods/prompt-to-prompt.md ("LocalBlend") (Prompt-to-Prompt, Hertz et al. 2022, §3.2 "local editing"), with the
PIE-Bench defaults (start 0.2, thresholds 0.3/0.3). The cross-attention maps of the conditional
source and target rows at the level that is 16x16 at 512 px (down and up blocks, as the
reference's `down_cross[2:4] + up_cross[:3]`) are summed over heads, layers and all steps so far;
after each step from `start` on, the blend-word columns give a per-row map, 3x3 max-pooled,
upsampled (nearest) to the latent, max-normalised and thresholded; the target keeps its latent
inside (source mask OR target mask) and takes the source latent elsewhere. What is stored for the
target row is its map after the P2P edit, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from control.base import SiteRule
from ldm.context import AttnSite


class LocalBlend:
    def __init__(self, source_cols: Tensor, target_cols: Tensor, start_step: int, threshold: float = 0.3,
                 level: int = 2) -> None:
        """source_cols / target_cols: (77,) 0/1 token columns of the blend words in each prompt."""
        self.cols = torch.stack([source_cols, target_cols]).float()  # (2, 77)
        self._cols = self.cols  # on the run's device from `start` on
        self.start_step = start_step
        self.threshold = threshold
        self.rule = SiteRule(kind="cross", places=("down", "up"), min_level=level, max_level=level)
        self.level = level
        self._sum: Tensor | None = None  # (2, N, 77): sum over steps, layers and heads
        self._maps_per_step: dict[int, int] = {}  # site index -> heads, to turn the sum into a mean

    def wants(self, site: AttnSite) -> bool:
        return self.rule.matches(site)

    def store(self, site: AttnSite, a_src: Tensor, a_tgt: Tensor) -> None:
        """a_src, a_tgt: (heads, N, 77) float32 maps of the conditional source and target rows."""
        maps = torch.stack([a_src.sum(0), a_tgt.sum(0)])  # (2, N, 77)
        self._sum = maps if self._sum is None else self._sum + maps
        self._maps_per_step[site.index] = site.heads

    def mask(self, latent_hw: tuple[int, int]) -> Tensor:
        """(2, 1, H, W) bool: row 0 the source mask, row 1 source OR target."""
        assert self._sum is not None, "LocalBlend has no stored maps"
        h, w = latent_hw[0] >> self.level, latent_hw[1] >> self.level
        count = sum(self._maps_per_step.values())
        m = (self._sum * self._cols[:, None, :]).sum(-1) / count  # (2, N)
        m = m.reshape(2, 1, h, w)  # N = h * w at this level
        m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=latent_hw)  # nearest, as the reference
        m = m / m.amax(dim=(2, 3), keepdim=True)
        mask = m > self.threshold
        return mask[:1] | mask

    def blend(self, step: int, latents: Tensor, src: int, tgt: int) -> Tensor:
        """After a step with index >= start: target = source + mask * (target - source)."""
        if step < self.start_step or self._sum is None:
            return latents
        mask = self.mask(tuple(latents.shape[-2:]))[1].to(latents.dtype)  # (1, H, W)
        x_src, x_tgt = latents[src], latents[tgt]
        new_tgt = x_src + mask * (x_tgt - x_src)
        return torch.stack([new_tgt if i == tgt else latents[i] for i in range(latents.shape[0])])

    def start(self, device: torch.device) -> None:
        """Forget the maps of an earlier run; the word columns go to the run's device once."""
        self._cols = self.cols.to(device)
        self._sum = None
        self._maps_per_step.clear()
