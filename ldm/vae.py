"""The SD-1.x autoencoder (Rombach et al. 2022, §3; KL-regularised, f = 8), CompVis layout.

encode(x) returns the diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)); editing uses
its mean times the scale factor 0.18215 (the caller applies it). Module names equal the original
checkpoint's keys under `first_stage_model.` (encoder.down.{i}.block.{j}, mid.attn_1 with 1x1-conv
q/k/v/proj_out, decoder.up.{i} where up.0 is the full-resolution level, quant convs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kernels.attention import fused_attention
from ldm.config import VAEConfig
from ldm.unet import Upsample  # the same nearest-x2 + 3x3 conv as the UNet's


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convolutions as projections."""

    def __init__(self, ch: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W, C)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = rearrange(fused_attention(q, k, v), "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Right/bottom zero padding only: the original's asymmetric pad, unlike the UNet's.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level: `block` ResnetBlocks and an optional resampler (CompVis naming)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # SD's attn_resolutions is empty: attention only in `mid`
        if resample is not None:
            self.add_module(name, resample)  # "downsample" / "upsample": the checkpoint's key
        self._resample_name = name

    @property
    def resample(self) -> nn.Module | None:
        return getattr(self, self._resample_name, None)


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int, eps: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, eps)
        self.attn_1 = AttnBlock(ch, groups, eps)
        self.block_2 = ResnetBlock(ch, ch, groups, eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans, g, eps = cfg.block_out_channels, cfg.norm_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = chans[0]
        for i, cout in enumerate(chans):
            blocks = []
            for _ in range(cfg.layers_per_block):
                blocks.append(ResnetBlock(ch, cout, g, eps))
                ch = cout
            self.down.append(Level(blocks, Downsample(ch) if i != len(chans) - 1 else None, "downsample"))
        self.mid = Mid(ch, g, eps)
        self.norm_out = nn.GroupNorm(g, ch, eps=eps)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans, g, eps = cfg.block_out_channels, cfg.norm_groups, cfg.norm_eps
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g, eps)
        levels: list[Level] = []
        for i in reversed(range(len(chans))):  # built lowest resolution first, stored as up.0 = full res
            blocks = []
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(ResnetBlock(ch, chans[i], g, eps))
                ch = chans[i]
            levels.insert(0, Level(blocks, Upsample(ch) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, ch, eps=eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z|x) from the encoder's moments (B, 2*latent, h, w): mean and clamped log-variance."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of the downsample factor."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """z: unscaled latents (divide UNet latents by the scale factor first) -> images in ~[-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
