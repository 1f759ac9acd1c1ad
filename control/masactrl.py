"""MasaCtrl: mutual self-attention control (Cao et al. 2023, §4.2, eq. 4) as PIE-Bench runs it.

ALGORITHMS.md part B §4.2-§4.3, §6.1. From step `start_step` on, in the self-attention of every
transformer block numbered `start_layer` or later (the reference's layer index: blocks in execution
order, which is image-size independent; 10..15 are the decoder's 32x32 and 64x64 blocks of SD-1.4),
each target row queries the keys and values of the source row of the same CFG half:
O_tgt = attention(Q_tgt, K_src, V_src). Source rows and cross-attention are untouched. One fused
call with gathered rows; the 4096 x 4096 map is never built.
"""

from __future__ import annotations

from torch import Tensor

from control.base import ControllerBase
from kernels.attention import fused_attention, fused_attention_rows
from ldm.context import AttnContext, AttnSite


class MutualSelfAttention(ControllerBase):
    def __init__(self, start_step: int = 4, start_layer: int = 10) -> None:
        super().__init__()
        self.start_step = start_step
        self.start_layer = start_layer

    def active(self, site: AttnSite, step: int) -> bool:
        return site.kind == "self" and step >= self.start_step and site.index >= self.start_layer

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: AttnSite, ctx: AttnContext) -> Tensor:
        if not self.active(site, ctx.step):
            return fused_attention(q, k, v)
        self._touch(site)
        rows = list(range(q.shape[0]))
        kv_rows = rows.copy()
        for branch in ("uncond", "cond"):
            if ctx.layout.has("target", branch):
                kv_rows[ctx.layout.index("target", branch)] = ctx.layout.index("source", branch)
        return fused_attention_rows(q, k, v, rows, kv_rows, kv_rows)
