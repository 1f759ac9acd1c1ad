"""Multi-head attention with explicit Q/K/V projections and one call into the controller.

Attention(x, context) = to_out(softmax(Q K^T / sqrt(d)) V) with Q = to_q(x), K = to_k(context),
V = to_v(context) (Vaswani et al. 2017, eq. 1), as in SD's CrossAttention: no bias on the
projections, bias on the output. The layer never decides how Q, K and V are combined: it hands
them to the sampler's controllers through `AttnContext.attend` (docs/architecture.md), which pick
which rows feed which output row and call the fused kernel. Without a context (a plain network
call) the layer calls the fused kernel itself. A context may also carry a separate value input for
cross-attention (`ValueInput`, StyleDiffusion): at the sites it selects V = to_v(values), K still
from the text.

`upcast` (UNetConfig.upcast_attention, SD-2.1-768-v) hands Q, K and V to that call in float32
when the weights are fp16/bf16 and casts the result back, so scores, softmax and the weighted sum
are float32 on every backend and under every controller.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from kernels.attention import fused_attention
from ldm.context import AttnContext, AttnSite


class Attention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        # Set once by the UNet after construction: which layer this is, for controllers.
        self.site: AttnSite | None = None

    def forward(self, x: Tensor, context: Tensor | None = None, ctx: AttnContext | None = None) -> Tensor:
        context = x if context is None else context
        value_input = context
        if ctx is not None and ctx.values is not None and self.site is not None and ctx.values.applies(self.site):
            value_input = ctx.values.values.to(context.dtype)
        # (B, N, heads*d) -> (B, heads, N, d): the one layout every controller and kernel uses
        q, k, v = (
            rearrange(proj(src), "b n (h d) -> b h n d", h=self.heads)
            for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, value_input))
        )
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        if ctx is None:
            out = fused_attention(q, k, v)
        else:
            assert self.site is not None, "attention layer used under a controller without a site"
            out = ctx.attend(q, k, v, self.site)
        return self.to_out(rearrange(out.to(x.dtype), "b h n d -> b n (h d)"))
