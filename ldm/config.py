"""Frozen configurations of the three SD-1.x networks, with the SD-1.4 values as defaults.

The facts people trip on are written next to the field they concern. The dataclasses describe any
diffusers `UNet2DConditionModel` / `AutoencoderKL` / `CLIPTextModel` of the SD-1 family (mirrored
down/up paths, one optional SpatialTransformer per ResBlock, conv proj_in/out), so the tiny random
pipeline the reference oracle ran on is just another config (`TINY`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    # Width of each resolution level; level 0 is the full latent resolution (64x64 at 512 px).
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Whether the ResBlocks of a level are followed by a SpatialTransformer. SD-1.4 has attention
    # on levels 0-2 and none at level 3 (8x8 at 512 px); the middle block always has one.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    # Heads per level (the middle block uses the last level's). SD-1.4: 8 everywhere, so the
    # head dims are 40, 80, 160 (and 160 in the middle). diffusers calls this field
    # `attention_head_dim` although it holds the head *count*.
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    layers_per_block: int = 2  # ResBlocks per level on the way down; one more on the way up
    context_dim: int = 768  # CLIP width; SD-2 uses 1024 (that is how we tell them apart)
    transformer_depth: int = 1
    norm_groups: int = 32
    resnet_eps: float = 1e-5  # GroupNorm32 in the ResBlocks and the final `out` norm
    transformer_norm_eps: float = 1e-6  # the SpatialTransformer's GroupNorm (hard-coded upstream)
    # SD-1 uses 1x1 *convolutions* for proj_in/proj_out; SD-2 switched to linear layers.
    use_linear_projection: bool = False

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.attention_levels) != n or len(self.num_heads) != n:
            raise ValueError("block_out_channels, attention_levels and num_heads need one entry per level")
        for ch, heads in zip(self.block_out_channels, self.num_heads):
            if ch % heads:
                raise ValueError(f"{ch} channels do not split into {heads} heads")
            if ch % self.norm_groups:
                raise ValueError(f"{ch} channels do not split into {self.norm_groups} groups")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def head_dim(self, level: int) -> int:
        return self.block_out_channels[level] // self.num_heads[level]


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder: 2 ResnetBlocks per level; decoder: 3
    latent_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6  # every VAE GroupNorm, unlike the UNet's 1e-5
    # Latents fed to the UNet are scale_factor * posterior mean; decode divides by it.
    scale_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x), not the erf GELU


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SDConfig":
        """Inverse of to_dict; unknown or missing fields are errors, lists become tuples."""

        def build(kind: type, values: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        unknown = set(data) - {"unet", "vae", "text"}
        if unknown:
            raise ValueError(f"unknown SDConfig sections: {sorted(unknown)}")
        return cls(
            unet=build(UNetConfig, data.get("unet", {})),
            vae=build(VAEConfig, data.get("vae", {})),
            text=build(TextConfig, data.get("text", {})),
        )


SD14 = SDConfig()

# The tiny random pipeline the reference oracle ran on (shared/oracle/tiny-sd): four levels,
# attention only at the middle two (32x32 and 16x16 latents at 512 px), 2 heads, context 32.
# Small enough for unit tests at 512 px on a CPU, and shaped like SD so every rule applies.
TINY = SDConfig(
    unet=UNetConfig(
        block_out_channels=(32, 32, 64, 64),
        attention_levels=(False, True, True, False),
        num_heads=(2, 2, 2, 2),
        context_dim=32,
    ),
    vae=VAEConfig(block_out_channels=(32, 32, 64, 64)),
    text=TextConfig(hidden_size=32, intermediate_size=37, num_layers=5, num_heads=4),
)
