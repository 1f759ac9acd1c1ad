"""The Stable Diffusion denoising UNet eps(z_t, t, c) (Rombach et al. 2022, LDM eq. 2), CompVis layout.

Module names equal the keys of the original checkpoint under `model.diffusion_model.`
(input_blocks / middle_block / output_blocks, in_layers / emb_layers / out_layers /
skip_connection, proj_in / transformer_blocks / proj_out, attn1 / attn2 / ff), so the original
weights load by stripping that prefix. docs/weights.md lists the architecture facts used here.
One class serves SD-1.x and SD-2.x: the differences (linear proj_in/proj_out, 64-wide heads,
1024-wide context, float32 attention, and whether the output is eps or v, which this module does
not interpret) are fields of UNetConfig.

Every attention layer gets a static `AttnSite` and every ResBlock a `ResSite` at construction,
numbered in execution order, so controllers select layers by query (`attn_sites()`), never by
counting calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.attention import Attention
from ldm.config import UNetConfig
from ldm.context import AttnContext, AttnSite, Place, ResSite


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (float64 for a float64 UNet: EDICT's exact inversion needs every
    operation in double) and cast back, as the original does for fp16 inference."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).type(x.dtype)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding, [cos, sin] order (diffusers' flip_sin_to_cos=True), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the time embedding as a per-channel bias, then again; 1x1 skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin, eps=eps), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, cout, eps=eps), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.site: ResSite | None = None

    def forward(self, x: Tensor, emb: Tensor, ctx: AttnContext | None) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        if ctx is not None:
            # Plug-and-Play swaps this residual branch between rows; the skip stays each row's own.
            assert self.site is not None, "ResBlock used under a controller without a site"
            h = ctx.features(h, self.site)
        return self.skip_connection(x) + h


class GEGLU(nn.Module):
    """Linear to 2x width; first half is the value, second half the gate: value * GELU(gate)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention on the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, ctx: AttnContext | None) -> Tensor:
        x = x + self.attn1(self.norm1(x), ctx=ctx)
        x = x + self.attn2(self.norm2(x), context, ctx=ctx)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, residual add."""

    def __init__(self, ch: int, heads: int, cfg: UNetConfig) -> None:
        super().__init__()
        head_dim = ch // heads
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.transformer_norm_eps)
        proj = (lambda: nn.Linear(ch, ch)) if self.linear else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, heads, head_dim, cfg.context_dim, cfg.upcast_attention)
            for _ in range(cfg.transformer_depth)
        )
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor, ctx: AttnContext | None) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        # SD-1 projects with 1x1 convs before flattening, SD-2 with linears after: the same map.
        if not self.linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")  # tokens in row-major pixel order
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, ctx)
        if self.linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # symmetric padding, unlike the VAE

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # bf16 nearest upsampling is missing from some torch builds; go through float32 there only
        up = x.float() if x.dtype == torch.bfloat16 else x
        return self.conv(F.interpolate(up, scale_factor=2.0, mode="nearest").type(x.dtype))


class Stage(nn.Sequential):
    """One entry of input_blocks / output_blocks (CompVis' TimestepEmbedSequential)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, ctx: AttnContext | None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, ctx)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, ctx)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        chans, n_levels, per_level = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        emb_dim = cfg.time_embed_dim

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, cfg.norm_groups, cfg.resnet_eps)

        def attn(level: int) -> SpatialTransformer:
            return SpatialTransformer(chans[level], cfg.num_heads[level], cfg)

        self.time_embed = nn.Sequential(nn.Linear(chans[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # Down path; record each stage's level for the sites, and the skip widths for the up path.
        self.input_blocks = nn.ModuleList([Stage(nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1))])
        levels: dict[Stage, tuple[Place, int]] = {}
        skips, ch = [chans[0]], chans[0]
        for level in range(n_levels):
            for _ in range(per_level):
                layers: list[nn.Module] = [res(ch, chans[level])]
                ch = chans[level]
                if cfg.attention_levels[level]:
                    layers.append(attn(level))
                self.input_blocks.append(Stage(*layers))
                levels[self.input_blocks[-1]] = ("down", level)
                skips.append(ch)
            if level != n_levels - 1:
                self.input_blocks.append(Stage(Downsample(ch)))
                skips.append(ch)

        last = n_levels - 1
        self.middle_block = Stage(res(ch, ch), attn(last), res(ch, ch))
        levels[self.middle_block] = ("mid", last)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(n_levels)):
            for i in range(per_level + 1):
                layers = [res(ch + skips.pop(), chans[level])]
                ch = chans[level]
                if cfg.attention_levels[level]:
                    layers.append(attn(level))
                if level != 0 and i == per_level:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Stage(*layers))
                levels[self.output_blocks[-1]] = ("up", level)

        self.out = nn.Sequential(
            GroupNorm32(cfg.norm_groups, ch, eps=cfg.resnet_eps), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )
        self._assign_sites(levels)

    def _assign_sites(self, levels: dict[Stage, tuple[Place, int]]) -> None:
        """Number transformer blocks and ResBlocks in execution order (the reference's `L`)."""
        names = {module: name for name, module in self.named_modules()}
        n_block, n_res, per_place_level = 0, 0, {}
        for stage in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            if stage not in levels:
                continue
            place, level = levels[stage]
            for layer in stage:
                if isinstance(layer, ResBlock):
                    block = per_place_level.get((place, level), 0)
                    per_place_level[place, level] = block + 1
                    layer.site = ResSite(n_res, place, level, block, names[layer])
                    n_res += 1
                elif isinstance(layer, SpatialTransformer):
                    for tb in layer.transformer_blocks:
                        for kind, a in (("self", tb.attn1), ("cross", tb.attn2)):
                            head_dim = a.to_q.out_features // a.heads
                            a.site = AttnSite(n_block, place, level, kind, a.heads, head_dim, names[a])
                        n_block += 1

    def attn_sites(self) -> list[AttnSite]:
        """All attention layers, in execution order (self before cross within a block)."""
        return [m.site for m in self.modules() if isinstance(m, Attention)]

    def res_sites(self) -> list[ResSite]:
        return [m.site for m in self.modules() if isinstance(m, ResBlock)]

    def forward(self, x: Tensor, t: Tensor | int, context: Tensor, ctx: AttnContext | None = None) -> Tensor:
        """x: (B, 4, h, w) latents; t: scalar or (B,) timesteps; context: (B, 77, context_dim)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype))
        run = _checkpointed if ctx is not None and ctx.checkpoint and torch.is_grad_enabled() else _direct
        hs, h = [], x
        for stage in self.input_blocks:
            h = run(stage, h, emb, context, ctx)
            hs.append(h)
        h = run(self.middle_block, h, emb, context, ctx)
        for stage in self.output_blocks:
            h = run(stage, torch.cat([h, hs.pop()], dim=1), emb, context, ctx)
        return self.out(h)


def _direct(stage: Stage, h: Tensor, emb: Tensor, context: Tensor, ctx: AttnContext | None) -> Tensor:
    return stage(h, emb, context, ctx)


def _checkpointed(stage: Stage, h: Tensor, emb: Tensor, context: Tensor, ctx: AttnContext | None) -> Tensor:
    """The stage's activations are recomputed in the backward pass instead of kept (AttnContext.checkpoint).
    Non-reentrant, so tensors reaching the stage through the context (a value input) get their gradients."""
    return checkpoint(stage, h, emb, context, ctx, use_reentrant=False)
