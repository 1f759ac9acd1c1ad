"""Plug-and-Play (Tumanyan et al. 2023, §4: feature and self-attention injection) as PIE-Bench runs it.

ALGORITHMS.md part B §5 and part A §6.5. Rows: a `reference` row fed by the loop with the inversion
latent of the current step (conditioned on the empty prompt, never stepped), then the target's
uncond (negative prompt) and cond rows. For the first int(num_steps * attn_frac) steps, in the
self-attention of every decoder block except the first (SD-1.4's L = 8..15), both target rows
attend with the reference row's queries and keys and their own values:
O_tgt = attention(Q_ref, K_ref, V_tgt). For the first int(num_steps * feature_frac) steps the
residual branch of the second ResBlock of the decoder level just above the lowest one (diffusers'
up_blocks[1].resnets[1]) is replaced by the reference row's, before each row adds its own skip.
"""

from __future__ import annotations

from torch import Tensor

from control.base import ControllerBase, StepWindow, replace_rows
from kernels.attention import fused_attention, fused_attention_rows
from ldm.context import AttnContext, AttnSite, ResSite

NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"


class PlugAndPlay(ControllerBase):
    def __init__(self, attn_sites: list[AttnSite], res_sites: list[ResSite], num_steps: int,
                 feature_frac: float = 0.8, attn_frac: float = 0.5) -> None:
        super().__init__()
        up = sorted(s.index for s in attn_sites if s.place == "up" and s.kind == "self")
        self.qk_blocks = frozenset(up[1:])  # every decoder block but the first
        up_res = [s for s in res_sites if s.place == "up"]
        level = max(s.level for s in up_res) - 1
        picked = [s.index for s in up_res if s.level == level and s.block == 1]
        if len(picked) != 1:
            raise ValueError(f"no unique up ResBlock at level {level}, block 1 in {up_res}")
        self.feature_block = picked[0]
        self.qk_window = StepWindow.of(attn_frac, num_steps)
        self.feature_window = StepWindow.of(feature_frac, num_steps)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor:
        if site.kind != "self" or site.index not in self.qk_blocks or ctx.step not in self.qk_window:
            return fused_attention(q, k, v)
        self._touch(site)
        (ref,) = ctx.layout.indices("reference")
        rows = list(range(q.shape[0]))
        qk_rows = [ref if i in ctx.layout.indices("target") else i for i in rows]
        return fused_attention_rows(q, k, v, qk_rows, qk_rows, rows)

    def features(self, h: Tensor, site: ResSite, ctx: AttnContext) -> Tensor:
        if site.index != self.feature_block or ctx.step not in self.feature_window:
            return h
        self._touch(site)
        (ref,) = ctx.layout.indices("reference")
        return replace_rows(h, {i: h[ref] for i in ctx.layout.indices("target")})
